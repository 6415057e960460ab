"""Step 4 of ``diagnose``: explain the regime.

Explosion causes (learning rate, initialisation scale, depth amplification,
recurrence, bad batches) are named only for a run that exploded, vanishing
ones (saturating activations, depth, recurrence) only for one that
vanished, each from the figures that support it and with its remedies.
"""

from __future__ import annotations

import numpy as np

from gradtransforms.diagnose.findings import SATURATING_FACTOR
from gradtransforms.diagnose.regime import Figures, vanishing_signs
from gradtransforms.diagnose.series import Series


def _start_causes(r: Series, f: Figures) -> list[str]:
  causes = []
  healthy = r.healthy
  if r.first_bad is not None and r.first_bad < 5:
    causes.append(
        f"initialisation scale or learning rate: non-finite after only "
        f"{r.first_bad} step(s), so the very first updates were too large; use "
        "He/Xavier init, a smaller learning rate or warm-up, and clip from "
        "step 0 (gt.clip_by_global_norm)")
  if f.sustained:
    causes.append(
        f"learning rate: the gradient norm grows exponentially "
        f"(x{np.exp(f.growth):.2f} per step, doubling every {f.doubling:.2g} "
        "steps); lower the learning rate or add warm-up")
  if f.init_outlier:
    causes.append(
        f"initialisation scale or early learning rate: the first norm "
        f"({healthy[0]:.3g}) is {healthy[0] / np.median(healthy):.0f}x the "
        "run's median, in the early layers too; use He/Xavier init or a "
        "smaller init scale, warm-up, and clip from step 0")
  if f.early_rise:
    k = int(np.argmax(healthy[1:4])) + 1
    causes.append(
        f"initialisation scale or early learning rate: the norm rose "
        f"x{healthy[k] / healthy[0]:.3g} over the first {k} step(s), to "
        f"{healthy[k] / np.median(healthy):.0f}x the run's median: the first "
        "updates were too large for the initial weights; use warm-up or a "
        "smaller learning rate, He/Xavier init, and clip from step 0")
  return causes


def explosion(r: Series, f: Figures) -> tuple[list[str], list[str]]:
  """``(causes, remedies)`` of an exploding run."""
  causes = _start_causes(r, f)
  w = r.weights
  if f.depth is not None and f.depth > 10:
    causes.append(
        f"depth: gradients are amplified {f.depth:.3g}x from {w[-1]} to "
        f"{w[0]}; add normalisation, residual connections or "
        "better-scaled init")
  if f.recurrent and (r.first_bad is not None or f.sustained or f.early_rise
                      or (f.depth is not None and f.depth > 10)):
    causes.append(
        f"recurrence: recurrent weights ({', '.join(f.recurrent[:3])}) multiply "
        "gradients through time; clip the global norm, shorten BPTT, or use a "
        "gated cell (LSTM/GRU)")
  if f.spikes:
    shown = ", ".join(str(r.first_step + t) for t in f.spikes[:5]) + (
        " ..." if len(f.spikes) > 5 else "")
    causes.append(
        f"bad batches: isolated norm spikes at step(s) {shown} in an otherwise "
        "steady run (a data fault or outlier batch); skip them with "
        "gt.guard(..., on=('spike',)) or bound them with gt.zclip()")
  remedies = ["lower the learning rate or add warm-up", "He/Xavier init",
              "gradient clipping (gt.clip_by_global_norm, gt.zclip)"]
  return causes, remedies


def vanishing(r: Series, f: Figures) -> tuple[list[str], list[str]]:
  """``(causes, remedies)`` of a vanishing run."""
  vanish_depth, vanish_ratio, vanish_time = vanishing_signs(f)
  causes: list[str] = []
  remedies: list[str] = []
  w, depth = r.weights, f.depth
  if vanish_depth or vanish_ratio:
    if len(w) >= 6 and f.factor is not None and f.factor <= SATURATING_FACTOR:
      causes.append(
          f"saturating activations: gradients shrink x{f.factor:.2g} per layer "
          f"over {len(w)} layers, as sigmoid (derivative <= 0.25) or "
          "saturated tanh units do; use ReLU with He init, add "
          "normalisation (batch/layer norm), or residual connections")
    causes.append(
        f"depth: the backward signal shrinks "
        f"{1 / depth if depth else np.inf:.3g}x from {w[-1]} to "
        f"{w[0]}, so the early layers barely learn; add normalisation "
        "(batch/layer norm) or residual connections")
    remedies += ["ReLU with He init", "batch or layer normalisation",
                 "residual connections"]
  if vanish_time:
    causes.append(
        f"recurrence: the gradient through time of a plain recurrent cell "
        f"({', '.join(f.recurrent[:3])}) shrinks with each step back when its "
        "recurrent weights contract (spectral radius below 1) or its tanh "
        "saturates, so long-range dependencies are not learnt; the loss "
        "stalls while no gradient explodes (per-leaf norms cannot show how "
        "far back the gradient reaches); use a gated cell (LSTM/GRU)")
  if vanish_time or (f.recurrent and (vanish_depth or vanish_ratio)):
    remedies.append("LSTM/GRU for recurrences")
  return causes, remedies


def explain(r: Series, f: Figures, regime: str) -> tuple[list[str], list[str]]:
  """Step 4: ``(causes, remedies)`` of ``regime``."""
  if regime == "exploding":
    return explosion(r, f)
  if regime == "vanishing":
    return vanishing(r, f)
  return [], []
