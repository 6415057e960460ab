"""The main job (``make demo`` / ``gradtransforms demo``): every scenario x
method, a table, plots, and a diagnosis of the first explosion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from gradtransforms.demo import tables
from gradtransforms.demo.methods import METHODS, SCENARIOS, run, summarize
from gradtransforms.demo.progress import Steps
from gradtransforms.diagnose import diagnose

HEADER = ("scenario", "method", "diverged", "NaN at step", "final loss",
          "max grad norm", "skipped")


def table_rows(rows: list[dict]) -> list[tuple]:
  return [(r["scenario"], r["method"], r["diverged"], r["nan_step"],
           r["final_loss"], r["max_norm"], r["skipped"]) for r in rows]


def plot(histories: dict, path: Path) -> None:
  """Gradient norm and loss per scenario (one row each), one shared legend
  above the panels; the unclipped baseline ("none") is a wide grey line under
  the others, and a diverged run ends in an X at its last finite value."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
  scen = list(dict.fromkeys(s for s, _ in histories))
  methods = list(dict.fromkeys(m for _, m in histories))
  palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
  style: dict[str, dict[str, Any]] = {
      m: dict(color="#b0b0b0", lw=3.0, zorder=1) if m == "none" else
      dict(color=next(palette), lw=1.0, zorder=2) for m in methods}
  fig, axes = plt.subplots(len(scen), 2, figsize=(9, 1.9 * len(scen) + 0.8),
                           squeeze=False, sharex=True, layout="constrained")
  for i, sc in enumerate(scen):
    for m in methods:
      h = histories.get((sc, m))
      if h is None:
        continue
      for ax, key in ((axes[i, 0], "monitor/norm"), (axes[i, 1], "loss")):
        y = np.asarray(h[key], float)
        ax.plot(y, **style[m])
        finite = np.flatnonzero(np.isfinite(y))
        if len(finite) < len(y) and len(finite):  # diverged: mark its end
          t = finite[-1]
          ax.plot(t, y[t], "X", color=style[m]["color"], ms=9, mec="black",
                  mew=0.7, zorder=3)
    axes[i, 0].set_ylabel(sc, fontsize=8.5)
    for ax in axes[i]:
      ax.set_yscale("log")
      lo, hi = ax.get_ylim()
      if hi / lo < 20:  # under about a decade: label 2x and 5x ticks too
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
      else:
        ax.yaxis.set_minor_formatter(NullFormatter())
      ax.tick_params(which="both", labelsize=7.5)
  axes[0, 0].set_title("gradient norm (before clipping)", fontsize=9)
  axes[0, 1].set_title("loss", fontsize=9)
  for ax in axes[-1]:
    ax.set_xlabel("step", fontsize=8.5)
  handles = [plt.Line2D([], [], color=style[m]["color"], lw=max(style[m]["lw"], 2))
             for m in methods]
  handles.append(plt.Line2D([], [], ls="", marker="X", color="white", mec="black",
                            ms=8))
  fig.legend(handles, methods + ["diverged (at its last finite value)"],
             loc="outside upper center", ncol=min(len(handles), 4), fontsize=8,
             frameon=False)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(steps: int = 300, out: str | Path = "demo_results", scenarios=None,
         methods=None, seed: int = 0) -> list[dict]:
  """Runs the demo; writes ``curves.png``, ``summary.md`` and
  ``summary.json`` into ``out`` and returns the summary rows."""
  console = Console(width=110)
  scenarios = list(scenarios or SCENARIOS)
  methods = list(methods or METHODS)
  for name, known in ((scenarios, SCENARIOS), (methods, METHODS)):
    for n in name:
      if n not in known:
        raise ValueError(f"unknown name {n!r}; choose from {list(known)}")
  rows, histories = [], {}
  with Steps(len(scenarios) * len(methods), "runs", console=console) as progress:
    for sc in scenarios:
      for m in methods:
        progress.start(f"{sc} / {m}")
        h = run(sc, m, steps=steps, seed=seed)
        histories[(sc, m)] = h
        rows.append({"scenario": sc, "method": m, **summarize(h)})
        progress.done()
    elapsed = progress.elapsed
  title = f"{steps} steps of SGD+momentum, seed {seed} ({elapsed:.0f}s)"
  if console.is_terminal:
    console.print(tables.rich_table(HEADER, table_rows(rows), title=title))
  else:  # piped: plain markdown, nothing cut to a width
    print(f"{title}\n\n{tables.markdown(HEADER, table_rows(rows))}", flush=True)
  for sc in scenarios:
    console.print(f"[dim]{sc}: {SCENARIOS[sc].note}[/dim]")
  first = next(((s, m) for (s, m) in histories if m == "none"
                and summarize(histories[(s, m)])["diverged"]), None)
  if first:
    console.print(f"\n[bold]gt.diagnose[/bold] of {first[0]} / {first[1]}:")
    console.print(diagnose(histories[first],
                           loss=list(histories[first]["loss"])).report)
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  plot(histories, out_dir / "curves.png")
  (out_dir / "summary.md").write_text(tables.markdown(HEADER, table_rows(rows)))
  (out_dir / "summary.json").write_text(json.dumps(rows, indent=1))
  console.print(f"\nwrote {out_dir / 'curves.png'}, {out_dir / 'summary.md'}, "
                f"{out_dir / 'summary.json'}")
  return rows
