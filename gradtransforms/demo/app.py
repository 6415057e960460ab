"""The main job (``make demo`` / ``gradtransforms demo``): every scenario with
its methods, a table, plots (norm, loss and the per-layer gradient-norm
profile), and diagnoses of the first explosion, the vanishing runs and the
over-tight clip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from gradtransforms.demo import tables
from gradtransforms.demo.methods import SCENARIOS, pairs, run, summarize
from gradtransforms.demo.progress import Steps
from gradtransforms.diagnose import depth_profile, diagnose

HEADER = ("scenario", "method", "diverged", "NaN at step", "final loss",
          "max grad norm", "skipped")


def table_rows(rows: list[dict]) -> list[tuple]:
  return [(r["scenario"], r["method"], r["diverged"], r["nan_step"],
           r["final_loss"], r["max_norm"], r["skipped"]) for r in rows]


SHOWCASE = (("mlp16-sigmoid", "none"), ("rnn-T50-rho0.5", "none"),
            ("mlp4-lr0.02-clip0.05", "none"))
"""Runs whose diagnosis the demo prints (if they ran), after the first
explosion: vanishing through depth, through time, and an over-tight clip."""


def profile(history: dict, frac: float = 0.1
            ) -> tuple[list[str], np.ndarray, np.ndarray] | None:
  """``(layers, early, late)``: each weight layer's median gradient norm
  over the first and the last ``frac`` of the finite steps, input to
  output (read-out last); None when no per-layer norm was recorded or
  fewer than 10 steps were finite."""
  layers, norms = depth_profile(history)
  if not layers:
    return None
  ok = np.all(np.isfinite(norms), axis=1)
  norms = norms[ok] if ok.any() else norms[:0]
  if len(norms) < 10:
    return None
  w = max(int(len(norms) * frac), 1)
  return layers, np.median(norms[:w], axis=0), np.median(norms[-w:], axis=0)


def _short(name: str) -> str:
  """A layer name short enough for a tick label: its last two parts, without
  a trailing ``kernel``."""
  parts = [p for p in name.split("/") if p not in ("kernel", "weight")]
  return "/".join(parts[-2:]) or name


def _plot_profile(ax, history: dict | None, which: str) -> None:
  p = profile(history) if history is not None else None
  if p is None:
    ax.text(0.5, 0.5, "no per-layer norms", ha="center", va="center",
            transform=ax.transAxes, fontsize=8, color="grey")
    ax.set_yscale("log")
    return
  layers, early, late = p
  x = np.arange(len(layers))
  for y, color in ((early, "#9ecae1"), (late, "#08519c")):  # log: 0 left out
    ax.plot(x, np.where(y > 0, y, np.nan), "o-", color=color, ms=3, lw=1.2)
  ax.set_yscale("log")
  zero = [_short(n) for n, v in zip(layers, late) if v == 0]
  if zero:
    ax.text(0.02, 0.05, f"zero gradient: {', '.join(zero[:3])}",
            transform=ax.transAxes, fontsize=7, color="#08519c")
  if len(layers) <= 5:
    ax.set_xticks(x, [_short(n) for n in layers], fontsize=7)
  else:
    ax.set_xticks([0, len(layers) - 1], ["layer 0", f"read-out ({len(layers)})"],
                  fontsize=7)
  ax.set_xlim(-0.5, len(layers) - 0.5)
  ax.text(0.02, 0.95, which, transform=ax.transAxes, fontsize=7, color="grey",
          va="top")
  ratio = late[0] / late[-1] if late[-1] > 0 else np.nan
  if np.isfinite(ratio) and ratio > 0 and not 1e-1 < ratio < 1e1:
    ax.text(0.98, 0.05, f"first/read-out: {ratio:.0e}", ha="right",
            transform=ax.transAxes, fontsize=7, color="#08519c")


def plot(histories: dict, path: Path) -> None:
  """Per scenario (one row each): gradient norm and loss over steps, and the
  per-layer gradient-norm profile (median norm of each weight layer, input
  to output, over the first and the last 10% of the steps, of the "none"
  run, or the first run with 10 finite steps where that diverged at once;
  log scale): a profile falling by orders of magnitude towards the input is
  vanishing at a glance. One shared legend above the
  panels; the unclipped baseline ("none") is a wide grey line under the
  others, and a diverged run ends in an X at its last finite value."""
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
  fig, axes = plt.subplots(len(scen), 3, figsize=(12, 1.9 * len(scen) + 0.8),
                           squeeze=False, layout="constrained",
                           gridspec_kw={"width_ratios": [1, 1, 0.75]})
  for i in range(1, len(scen)):  # steps shared down a column; layers not
    for j in (0, 1):
      axes[i, j].sharex(axes[0, j])
  for ax in axes[:-1, :2].flat:
    ax.tick_params(labelbottom=False)
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
    # The baseline's profile, or (it diverged at once) the first run with one.
    ran = [m for s, m in histories if s == sc]
    ran.sort(key=lambda m: m != "none")
    which = next((m for m in ran if profile(histories[(sc, m)]) is not None),
                 ran[0])
    _plot_profile(axes[i, 2], histories[(sc, which)], which)
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
  axes[0, 2].set_title("gradient norm by layer (input to read-out)",
                       fontsize=9)
  for ax in axes[-1, :2]:
    ax.set_xlabel("step", fontsize=8.5)
  axes[-1, 2].set_xlabel("layer", fontsize=8.5)
  handles = [plt.Line2D([], [], color=style[m]["color"], lw=max(style[m]["lw"], 2))
             for m in methods]
  handles.append(plt.Line2D([], [], ls="", marker="X", color="white", mec="black",
                            ms=8))
  labels = methods + ["diverged (at its last finite value)"]
  handles += [plt.Line2D([], [], color=c, marker="o", ms=3, lw=1.2)
              for c in ("#9ecae1", "#08519c")]
  labels += ["by layer: first 10% of steps", "by layer: last 10%"]
  fig.legend(handles, labels, loc="outside upper center",
             ncol=min(len(handles), 5), fontsize=8, frameon=False)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(steps: int = 300, out: str | Path = "demo_results", scenarios=None,
         methods=None, seed: int = 0) -> list[dict]:
  """Runs the demo; writes ``curves.png``, ``summary.md`` and
  ``summary.json`` into ``out`` and returns the summary rows."""
  console = Console(width=110)
  cells = pairs(scenarios, methods)
  scenarios = list(dict.fromkeys(s for s, _ in cells))
  rows, histories = [], {}
  with Steps(len(cells), "runs", console=console) as progress:
    for sc, m in cells:
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
  for cell in ([first] if first else []) + [c for c in SHOWCASE
                                            if c in histories]:
    console.print(f"\n[bold]gt.diagnose[/bold] of {cell[0]} / {cell[1]}:")
    console.print(diagnose(histories[cell],
                           loss=list(histories[cell]["loss"])).report,
                  markup=False)
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  plot(histories, out_dir / "curves.png")
  (out_dir / "summary.md").write_text(tables.markdown(HEADER, table_rows(rows)))
  (out_dir / "summary.json").write_text(json.dumps(rows, indent=1))
  console.print(f"\nwrote {out_dir / 'curves.png'}, {out_dir / 'summary.md'}, "
                f"{out_dir / 'summary.json'}")
  return rows
