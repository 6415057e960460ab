"""The benchmark's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtransforms.bench.lm_stability.analysis import UNIFORM_BITS, smooth
from gradtransforms.bench.lm_stability.train import FAULTS

def _style(name: str) -> str:
  """Solid lines for gradtransforms (and none), dashed for the baselines."""
  return "-" if name == "none" or name.startswith("gt.") else "--"


def plot(res: dict, rows: list[dict], out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cfg = res["env"]["config"]
  names = [r["method"] for r in rows]
  colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
  fig, axes = plt.subplots(1, 3, figsize=(19, 6))
  ax = axes[0]
  for r, c in zip(rows, colors):
    lrs = cfg["rates"]
    m = [r["by_lr"][lr]["mean"] for lr in lrs]
    lo = [r["by_lr"][lr]["min"] for lr in lrs]
    hi = [r["by_lr"][lr]["max"] for lr in lrs]
    top = UNIFORM_BITS + 0.5
    clip = lambda v: [min(x, top) if np.isfinite(x) else top for x in v]
    ax.plot(lrs, clip(m), "o" + _style(r["method"]), color=c, label=r["method"],
            lw=1.2, ms=4)
    ax.fill_between(lrs, clip(lo), clip(hi), color=c, alpha=0.12)
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final held-out bits/byte (mean, min-max over seeds)")
  ax.set_title(f"final loss vs learning rate (above {UNIFORM_BITS:g}, the "
               f"uniform guess: drawn at {UNIFORM_BITS + 0.5:g})", fontsize=10)
  ax.legend(fontsize=7)
  ax = axes[1]
  for r, c in zip(rows, colors):
    lr = r["largest_stable_lr"]
    if lr is None:
      continue
    loss = res["_curves"][(r["method"], lr, 0)] / np.log(2.0)
    ax.plot(smooth(loss), _style(r["method"]), color=c, lw=1,
            label=f"{r['method']} (lr {lr:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("training bits/byte (10-step mean), seed 0")
  ax.set_title("training loss at each method's largest stable LR", fontsize=10)
  ax.set_ylim(top=UNIFORM_BITS + 0.5)
  ax.legend(fontsize=7)
  ax = axes[2]
  faults = res["faults"]
  grid = np.array([[next((f["delta_bpb"] for f in faults if f["method"] == n
                          and f["fault"] == k), np.nan) for k in FAULTS]
                   for n in names])
  shown = np.where(np.isfinite(grid), grid, np.nan)
  lim = np.nanmax(np.abs(shown)) if np.isfinite(shown).any() else 1.0
  ax.imshow(shown, cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
  for i in range(len(names)):
    for j in range(len(FAULTS)):
      v = grid[i, j]
      ax.text(j, i, "NaN" if not np.isfinite(v) else f"{v:+.3f}", ha="center",
              va="center", fontsize=8)
  ax.set_xticks(range(len(FAULTS)), FAULTS)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_title("fault runs: final bits/byte minus clean run")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def plot_layers(res: dict, out: Path, method: str = "none") -> None:
  """Gradient norm per stacked layer over steps, x1000 fault run (issue 15)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = res["_layer_curves"].get(method)
  if curves is None:
    return
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
  for ax, key in zip(axes, ("clean", "fault")):
    ln = curves[key]
    for layer in range(ln.shape[1]):
      ax.plot(ln[:, layer], lw=1, label=f"layer {layer}" + (
          " (injected)" if key == "fault" and layer == res["fault_layer"] else ""))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{method}: {'clean run' if key == 'clean' else 'x1000 on layer '}"
                 + ("" if key == "clean" else f"{res['fault_layer']} at step "
                    f"{res['fault_step']}"))
    ax.legend(fontsize=8)
  axes[0].set_ylabel("gradient norm of the stacked blocks, per layer")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
