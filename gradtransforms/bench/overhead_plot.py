"""The overhead benchmark's plots: step time per method and workload, and
compile time against the number of leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradtransforms.bench.overhead_steps import GROUP

def _kind(r: dict) -> str:
  return r.get("kind") or ("model" if r["workload"].endswith("train step")
                           else "tree")


def plot(rows: list[dict], path: Path, title: str = "") -> None:
  """Dot plot, one panel per workload size: each method's ratio to Adam
  alone (colour: number of leaves; x: the optax equivalent), its target as a
  labelled dashed segment."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels: dict[str, list[dict]] = {}
  for r in rows:
    kind = _kind(r)
    key = {"tree": f"{r['params'] / 1e6:g}M params",
           "stacked": f"{r['params'] / 1e6:g}M params, stacked layers",
           "model": "full training steps"}[kind]
    panels.setdefault(key, []).append(r)
  order = {"static": 0, "adaptive": 1, "detection": 2, "reference": 3}
  methods = sorted(dict.fromkeys(r["method"] for r in rows),
                   key=lambda m: (order.get(GROUP.get(m, next(
                       r["group"] for r in rows if r["method"] == m)), 9)))
  y = {m: i for i, m in enumerate(methods)}
  n = len(panels)
  ncols = min(n, 4)  # wrap: readable at README width
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(
      max(2.5 * ncols + 1.6, 6.5),
      nrows * ((0.3 if nrows == 1 else 0.25) * len(methods) + 1.2) + 0.3),
                           sharey=True, squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  cmap = plt.get_cmap("viridis")
  xmax_cap = 3.0
  for ax, (label, prs) in zip(axes.flat, panels.items()):
    series = list(dict.fromkeys(
        r["workload"].split(" train step")[0] if _kind(r) == "model"
        else f"{r['leaves']} leaves" for r in prs))
    colors = {s: cmap(0.85 * i / max(len(series) - 1, 1)) for i, s in enumerate(series)}
    offs = {s: (i - (len(series) - 1) / 2) * 0.22 for i, s in enumerate(series)}
    for r in prs:
      s = (r["workload"].split(" train step")[0] if _kind(r) == "model"
           else f"{r['leaves']} leaves")
      yy = y[r["method"]] + offs[s]
      v = min(r["vs_adam"], xmax_cap)
      ax.plot([1.0, v], [yy, yy], color=colors[s], lw=0.8, alpha=0.5)
      ax.plot(v, yy, "o" if r["vs_adam"] <= xmax_cap else ">", color=colors[s],
              ms=4.5)
      if r.get("optax_vs_adam") is not None and np.isfinite(r["optax_vs_adam"]):
        ax.plot(min(r["optax_vs_adam"], xmax_cap), yy, "x", color="black", ms=4.5,
                mew=1.0)
    # Target per group, a labelled segment over the group's rows.
    by_target: dict[float, list[int]] = {}
    for m in methods:
      t = next((r["target"] for r in prs if r["method"] == m), float("nan"))
      if np.isfinite(t):
        by_target.setdefault(t, []).append(y[m])
    for t, ys in by_target.items():
      for grp in np.split(np.array(sorted(ys)),
                          np.flatnonzero(np.diff(sorted(ys)) > 1) + 1):
        ax.plot([t, t], [grp[0] - 0.45, grp[-1] + 0.45], ls="--", color="crimson",
                lw=1)
        ax.text(t, grp[0] - 0.5, f" target {t:.2f}", color="crimson",
                fontsize=6.5, va="bottom", ha="left")
    ax.axvline(1.0, color="black", lw=0.8)
    lo = min([0.8] + [r[k] - 0.05 for r in prs for k in ("vs_adam", "optax_vs_adam")
                      if r.get(k) is not None and np.isfinite(r[k])])
    ax.set_xlim(lo, min(xmax_cap, max(1.5, max(r["vs_adam"] for r in prs))) + 0.15)
    ax.set_title(label, fontsize=9)
    ax.grid(axis="x", lw=0.3)
    ax.tick_params(labelsize=7.5)
    ax.set_xlabel("step time / Adam alone", fontsize=8)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[s], ms=5)
               for s in series]
    handles.append(plt.Line2D([], [], ls="", marker="x", color="black"))
    ax.legend(handles, series + ["optax equivalent"], fontsize=6.5,
              loc="lower right", frameon=True, framealpha=0.9)
  axes[0, 0].set_yticks(range(len(methods)), methods)
  axes[0, 0].invert_yaxis()  # sharey: every row follows
  fig.suptitle(title or "Step time with Adam / Adam alone (> at the edge: "
               "beyond 3x)", fontsize=9.5, x=0.02, ha="left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_compile(compiles: list[dict], path: Path) -> None:
  """Compile time against the number of leaves, Adam and each method (log-log),
  one panel per group, with the 2x-Adam line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = list(dict.fromkeys(r["group"] for r in compiles))
  fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups) + 0.6, 3.4),
                           sharey=True, squeeze=False)
  leaves = sorted({r["leaves"] for r in compiles})
  adam = [min(r["adam_compile_s"] for r in compiles if r["leaves"] == n)
          for n in leaves]
  cmap = plt.get_cmap("tab10")
  for ax, group in zip(axes.flat, groups):
    ax.plot(leaves, adam, "k-o", ms=3.5, lw=1.4, label="Adam")
    ax.plot(leaves, [2 * a for a in adam], "--", color="crimson", lw=1,
            label="2x Adam")
    methods = list(dict.fromkeys(r["method"] for r in compiles
                                 if r["group"] == group))
    for i, m in enumerate(methods):
      pts = sorted((r["leaves"], r["compile_s"]) for r in compiles
                   if r["method"] == m)
      ax.plot(*zip(*pts), "-o", ms=3, lw=1, color=cmap(i % 10), label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(group, fontsize=9)
    ax.set_xlabel("leaves", fontsize=8)
    ax.grid(lw=0.3, which="both")
    ax.tick_params(labelsize=7.5)
    ax.legend(fontsize=6.5, loc="upper left", frameon=True, framealpha=0.9)
  axes[0, 0].set_ylabel("compile s (step with Adam)", fontsize=8)
  fig.suptitle("Compile time of the donated training step vs number of leaves",
               fontsize=9.5, x=0.02, ha="left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
