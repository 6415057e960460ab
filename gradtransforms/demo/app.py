"""The main job (``make demo`` / ``gradtransforms demo``): every scenario x
method, a table, plots, and a diagnosis of the first explosion."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gradtransforms.diagnose import diagnose
from gradtransforms.tasks.scenarios import METHODS, SCENARIOS, run, summarize


def _fmt(x, spec=".3g"):
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def table(rows: list[dict], title: str) -> Table:
  t = Table(title=title)
  for col in ("scenario", "method", "diverged", "NaN at step", "final loss",
              "max grad norm", "skipped"):
    left = col in ("scenario", "method")
    t.add_column(col, justify="left" if left else "right", no_wrap=left)
  for r in rows:
    t.add_row(r["scenario"], r["method"], "yes" if r["diverged"] else "no",
              _fmt(r["nan_step"], "d"), _fmt(r["final_loss"]),
              _fmt(r["max_norm"]), str(r["skipped"]))
  return t


def markdown(rows: list[dict]) -> str:
  lines = ["| scenario | method | diverged | NaN at step | final loss | "
           "max grad norm | skipped |", "|---|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['scenario']} | {r['method']} | "
                 f"{'yes' if r['diverged'] else 'no'} | {_fmt(r['nan_step'], 'd')} | "
                 f"{_fmt(r['final_loss'])} | {_fmt(r['max_norm'])} | {r['skipped']} |")
  return "\n".join(lines) + "\n"


def plot(histories: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(dict.fromkeys(s for s, _ in histories))
  fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6),
                           squeeze=False)
  for j, sc in enumerate(names):
    for (s, m), h in histories.items():
      if s != sc:
        continue
      axes[0, j].plot(h["monitor/norm"], label=m, lw=1)
      axes[1, j].plot(h["loss"], label=m, lw=1)
    axes[0, j].set_title(sc, fontsize=9)
    for ax in axes[:, j]:
      ax.set_yscale("log")
      ax.set_xlabel("step", fontsize=8)
  axes[0, 0].set_ylabel("gradient norm (pre-clip)")
  axes[1, 0].set_ylabel("loss")
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(steps: int = 300, out: str = "demo_results", scenarios=None,
         methods=None, seed: int = 0) -> list[dict]:
  console = Console(width=110)
  scenarios = scenarios or list(SCENARIOS)
  methods = methods or list(METHODS)
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows, histories = [], {}
  t0 = time.perf_counter()
  with Progress(console=console, transient=True) as progress:
    task = progress.add_task("training", total=len(scenarios) * len(methods))
    for sc in scenarios:
      for m in methods:
        progress.update(task, description=f"{sc} / {m}")
        h = run(sc, m, steps=steps, seed=seed)
        histories[(sc, m)] = h
        rows.append({"scenario": sc, "method": m, **summarize(h)})
        progress.advance(task)
  elapsed = time.perf_counter() - t0
  console.print(table(rows, f"{steps} steps of SGD+momentum, seed {seed} "
                            f"({elapsed:.0f}s)"))
  for sc in scenarios:
    console.print(f"[dim]{sc}: {SCENARIOS[sc].note}[/dim]")
  first = next(((s, m) for (s, m) in histories if m == "none"
                and summarize(histories[(s, m)])["diverged"]), None)
  if first:
    console.print(f"\n[bold]gt.diagnose[/bold] of {first[0]} / {first[1]}:")
    console.print(diagnose(histories[first], loss=histories[first]["loss"]).report)
  plot(histories, out_dir / "curves.png")
  (out_dir / "summary.md").write_text(markdown(rows))
  (out_dir / "summary.json").write_text(json.dumps(rows, indent=1))
  console.print(f"\nwrote {out_dir / 'curves.png'}, {out_dir / 'summary.md'}")
  return rows
