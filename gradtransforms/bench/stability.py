"""Stability: the methods on every scenario, several seeds.

For each (scenario, method) it reports the divergence rate (runs with a
non-finite loss), the median final loss of the runs that stayed finite, the
median count of loss spikes (a loss above 5x the median of the 20 steps
before it), and the steps a guard skipped. Scenarios and methods are the
demo's (``gradtransforms.demo.methods``: catalogue transforms around SGD with
momentum 0.9); with no --methods, the vanishing and over-tight-clip
scenarios run only their few methods (``FOCUS``), the others every one.
Writes ``stability.{md,json,png}`` into --out.
"""

from __future__ import annotations

from gradtransforms._extras import require

require("demo", "flax", "matplotlib", "rich", what="gradtransforms bench")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from gradtransforms.bench import (HelpFormatter, add_results_args,  # noqa: E402
                                  positive_int, write_results)
from gradtransforms.demo import tables  # noqa: E402
from gradtransforms.demo.methods import (METHODS, SCENARIOS, pairs, run,  # noqa: E402
                                         summarize)
from gradtransforms.demo.progress import Steps  # noqa: E402


def loss_spikes(loss: np.ndarray, factor: float = 5.0, window: int = 20) -> int:
  """Steps whose loss exceeds ``factor`` x the median finite loss of the
  ``window`` steps before."""
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


def _cell(r: dict) -> str:
  loss = tables.fmt(r["final_loss"])
  extra = f"{r['spikes']:g} spk" + (f", {r['skipped']:g} skip" if r["skipped"] else "")
  return f"{r['diverged']}/{r['runs']}, {loss} ({extra})"


def to_markdown(rows: list[dict], header: str) -> str:
  methods = list(dict.fromkeys(r["method"] for r in rows))
  scen = list(dict.fromkeys(r["scenario"] for r in rows))
  cell = {(r["scenario"], r["method"]): r for r in rows}
  body = [[s] + [_cell(cell[(s, m)]) if (s, m) in cell else "-"
                 for m in methods] for s in scen]
  return (f"{header}\n\nDiverged runs / runs, then median final loss of the "
          "finite runs (median loss spikes; steps skipped where a guard "
          "ran); - : not run.\n\n" + tables.markdown(["scenario"] + methods,
                                                     body))


RELATIVE_MAX = 3.0  # colour scale: final loss / best in its row, clipped here


def plot(rows: list[dict], path: Path) -> None:
  """One heatmap: colour = final loss relative to the best method of the
  scenario (log scale, 1x to >= 3x), so one huge loss does not wash out the
  rest; every run diverged: dark grey; some runs diverged: hatched."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm
  from matplotlib.patches import Patch, Rectangle
  methods = list(dict.fromkeys(r["method"] for r in rows))
  scen = list(dict.fromkeys(r["scenario"] for r in rows))
  cell = {(r["scenario"], r["method"]): r for r in rows}
  loss = np.array([[cell[(s, m)]["final_loss"] if (s, m) in cell else np.nan
                    for m in methods] for s in scen], float)
  best = np.nanmin(np.where(np.isfinite(loss), loss, np.nan), axis=1,
                   initial=np.inf, where=np.isfinite(loss))
  rel = np.clip(loss / best[:, None], 1.0, RELATIVE_MAX)
  fig, ax = plt.subplots(figsize=(1.15 * len(methods) + 2.6, 0.62 * len(scen) + 2.0))
  cmap = plt.get_cmap("YlOrRd").with_extremes(bad="#3a3a3a")
  im = ax.imshow(np.ma.masked_invalid(rel), cmap=cmap,
                 norm=LogNorm(1.0, RELATIVE_MAX), aspect="auto")
  for i, s in enumerate(scen):
    for j, m in enumerate(methods):
      r = cell.get((s, m))
      if r is None:  # not run: blank, not the colour of "every run diverged"
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fc="white", lw=0))
        continue
      if r["diverged"] == r["runs"]:
        text, color = f"diverged\n{r['diverged']}/{r['runs']}", "white"
      else:
        text = tables.fmt(r["final_loss"])
        if r["diverged"]:
          text += f"\n{r['diverged']}/{r['runs']} diverged"
          ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                 hatch="///", ec="#3a3a3a", lw=0))
        color = "white" if rel[i, j] > 2 else "black"
      if r.get("skipped"):
        text += f"\n{r['skipped']:g} skipped"
      ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color=color)
  ax.set_xticks(range(len(methods)), methods, rotation=25, ha="right", fontsize=8.5)
  ax.set_yticks(range(len(scen)), scen, fontsize=8.5)
  ax.set_xticks(np.arange(len(methods) + 1) - 0.5, minor=True)
  ax.set_yticks(np.arange(len(scen) + 1) - 0.5, minor=True)
  ax.grid(which="minor", color="white", lw=1.5)
  ax.tick_params(which="minor", length=0)
  cb = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
  cb.set_label("final loss / best in its row", fontsize=8)
  cb.set_ticks([1, 1.5, 2, 3], labels=["1x", "1.5x", "2x", ">=3x"])
  cb.ax.tick_params(labelsize=7.5)
  ax.legend(handles=[Patch(fc="#3a3a3a", label="every run diverged"),
                     Patch(fc="white", ec="#3a3a3a", hatch="///",
                           label="some runs diverged (loss: finite runs)")],
            loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
            fontsize=7.5, frameon=False)
  ax.set_title("Median final loss of the finite runs; colour: relative to the "
               "best method on that scenario", fontsize=9.5)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                               formatter_class=HelpFormatter)
  ap.add_argument("--seeds", type=positive_int, default=3, help="runs per cell")
  ap.add_argument("--steps", type=positive_int, default=300,
                  help="training steps per run")
  ap.add_argument("--scenarios", nargs="+", default=None, choices=list(SCENARIOS),
                  metavar="NAME", help="scenarios (default: all); choose from "
                  f"{', '.join(SCENARIOS)}")
  ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                  metavar="NAME", help="methods (default: all); choose from "
                  f"{', '.join(METHODS)}")
  add_results_args(ap, "stability.{md,json,png}")
  return ap


def _load_rows(data) -> list[dict]:
  return data["rows"] if isinstance(data, dict) else data  # before 0.2.0: a list


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  args = parser(prog).parse_args(argv)
  if args.replot_from is not None:
    rows = _load_rows(json.loads(args.replot_from.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (args.replot_from.stem + ".png")
    plot(rows, path)
    print(f"wrote {path}")
    return 0
  cells = pairs(args.scenarios, args.methods)
  rows = []
  with Steps(len(cells) * args.seeds, "runs") as progress:
    for s, m in cells:
      runs = []
      for seed in range(args.seeds):
        progress.start(f"{s} / {m} / seed {seed}")
        h = run(s, m, steps=args.steps, seed=seed)
        runs.append(dict(summarize(h), spikes=loss_spikes(h["loss"])))
        progress.done()
      rows.append({"scenario": s, "method": m, **aggregate(runs)})
    elapsed = progress.elapsed
  header = (f"Stability: {args.seeds} seeds x {args.steps} steps of "
            f"SGD+momentum per cell ({elapsed:.0f}s).")
  write_results(args.out, "stability", to_markdown(rows, header),
                {"seeds": args.seeds, "steps": args.steps, "rows": rows},
                lambda path: plot(rows, path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
