"""Training stability: every method on every exploding scenario, several seeds.

For each (scenario, method) it reports the divergence rate (runs with a
non-finite loss), the median final loss of the runs that stayed finite, the
median count of loss spikes (a loss above 5x the median of the 20 steps
before it), and the steps a guard skipped. Scenarios and methods are the
ones of ``gradtransforms demo`` (``gradtransforms/tasks/scenarios.py``).

    python benchmarks/stability.py                 # make bench
    python benchmarks/stability.py --seeds 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from gradtransforms.tasks.scenarios import METHODS, SCENARIOS, run, summarize

RESULTS = Path(__file__).resolve().parent / "results"


def loss_spikes(loss: np.ndarray, factor: float = 5.0, window: int = 20) -> int:
  count = 0
  for t in range(window, len(loss)):
    past = loss[t - window:t]
    past = past[np.isfinite(past)]
    if past.size and np.isfinite(loss[t]) and loss[t] > factor * np.median(past):
      count += 1
  return count


def aggregate(runs: list[dict]) -> dict:
  finite = [r["final_loss"] for r in runs if not r["diverged"]]
  return {"diverged": sum(r["diverged"] for r in runs), "runs": len(runs),
          "final_loss": float(np.median(finite)) if finite else float("nan"),
          "spikes": float(np.median([r["spikes"] for r in runs])),
          "skipped": float(np.median([r["skipped"] for r in runs]))}


def to_markdown(rows: list[dict], header: str) -> str:
  methods = list(dict.fromkeys(r["method"] for r in rows))
  scen = list(dict.fromkeys(r["scenario"] for r in rows))
  cell = {(r["scenario"], r["method"]): r for r in rows}
  out = [header, "", "Diverged runs / runs, then median final loss of the "
         "finite runs (median loss spikes; steps skipped where a guard ran).",
         "", "| scenario | " + " | ".join(methods) + " |",
         "|---|" + "---|" * len(methods)]
  for s in scen:
    cols = []
    for m in methods:
      r = cell[(s, m)]
      loss = "-" if np.isnan(r["final_loss"]) else f"{r['final_loss']:.3g}"
      extra = f"; {r['spikes']:g} spk" + (f", {r['skipped']:g} skip"
                                          if r["skipped"] else "")
      cols.append(f"{r['diverged']}/{r['runs']}, {loss} ({extra[2:]})")
    out.append(f"| {s} | " + " | ".join(cols) + " |")
  return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = list(dict.fromkeys(r["method"] for r in rows))
  scen = list(dict.fromkeys(r["scenario"] for r in rows))
  cell = {(r["scenario"], r["method"]): r for r in rows}
  rate = np.array([[cell[(s, m)]["diverged"] / cell[(s, m)]["runs"]
                    for m in methods] for s in scen])
  loss = np.array([[cell[(s, m)]["final_loss"] for m in methods] for s in scen])
  fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(scen) + 2))
  for ax, data, title, fmt in ((axes[0], rate, "divergence rate", "{:.0%}"),
                               (axes[1], np.log10(loss), "log10 final loss "
                                "(finite runs)", "{:.2f}")):
    im = ax.imshow(data, cmap="Reds" if ax is axes[0] else "viridis",
                   aspect="auto")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(scen)), scen, fontsize=8)
    ax.set_title(title, fontsize=10)
    for i in range(len(scen)):
      for j in range(len(methods)):
        if np.isfinite(data[i, j]):
          ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center",
                  fontsize=7, color="black" if ax is axes[0] else "white")
    fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS),
                  choices=list(SCENARIOS))
  ap.add_argument("--methods", nargs="+", default=list(METHODS),
                  choices=list(METHODS))
  ap.add_argument("--out", default=str(RESULTS / "stability"))
  args = ap.parse_args(argv)
  console = Console(width=120)
  rows = []
  t0 = time.perf_counter()
  with Progress(console=console, transient=True) as progress:
    bar = progress.add_task("runs", total=len(args.scenarios) *
                            len(args.methods) * args.seeds)
    for s in args.scenarios:
      for m in args.methods:
        runs = []
        for seed in range(args.seeds):
          progress.update(bar, description=f"{s} / {m} / seed {seed}")
          h = run(s, m, steps=args.steps, seed=seed)
          runs.append(dict(summarize(h), spikes=loss_spikes(h["loss"])))
          progress.advance(bar)
        rows.append({"scenario": s, "method": m, **aggregate(runs)})
  header = (f"Stability: {args.seeds} seeds x {args.steps} steps of "
            f"SGD+momentum per cell ({time.perf_counter() - t0:.0f}s).")
  md = to_markdown(rows, header)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text(md)
  out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
  plot(rows, out.with_suffix(".png"))
  console.print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
