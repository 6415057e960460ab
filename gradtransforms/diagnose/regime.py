"""Steps 2 and 3 of ``diagnose``: measure the run, then find its regime.

:func:`measure` derives the figures every conclusion rests on (growth rate,
spikes, depth profile, update ratios, loss change, a suggested clip);
:func:`find_regime` decides exploding, vanishing or healthy from them and
lists the evidence.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from gradtransforms.diagnose.findings import (SPIKE_FACTOR, STALL,
                                              UPDATE_RATIO_FLOOR,
                                              VANISHING_RATIO)
from gradtransforms.diagnose.series import Series

_RECURRENT = re.compile(r"(recur|rnn|lstm|gru|hh|hidden|cell)", re.I)


@dataclasses.dataclass
class Figures:
  """What :func:`measure` derived from a :class:`Series`."""
  growth: float | None  # mean d log||g|| / d step over the last healthy steps
  doubling: float | None
  window: int  # healthy steps the growth is fitted over
  suggested: float | None  # 90th percentile of the calm healthy norms
  depth: float | None  # first / last layer norm, median over healthy steps
  factor: float | None  # per-layer factor (geometric)
  recurrent: list[str]
  dead: list[str]  # zero gradient over the second half
  first_ur: float | None  # median update ratio, first / last layer
  last_ur: float | None
  loss_change: float | None
  stalled: bool
  spikes: list[int]
  sustained: bool  # exponential growth over an order of magnitude
  init_outlier: bool  # a first norm far above the rest, early layers
  early_rise: bool  # the first updates blew the norm up


def _median_ratio(a: np.ndarray, b: np.ndarray) -> float | None:
  ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
  return float(np.median(a[ok] / b[ok])) if ok.any() else None


def _finite_median(x: np.ndarray) -> float | None:
  x = x[np.isfinite(x)]
  return float(np.median(x)) if x.size else None


def spikes(norm: np.ndarray, end: int, window: int = 20) -> list[int]:
  """Steps ``t >= 1`` before ``end`` whose norm exceeds ``SPIKE_FACTOR`` x the
  median of the (up to) ``window`` finite norms before it (at least 5)."""
  out = []
  for t in range(1, end):
    past = norm[max(0, t - window):t]
    past = past[np.isfinite(past) & (past > 0)]
    if len(past) >= 5 and norm[t] > SPIKE_FACTOR * np.median(past):
      out.append(t)
  return out


def _growth(healthy: np.ndarray) -> tuple[float | None, float | None, int]:
  growth = doubling = None
  window = min(len(healthy), 50)
  if len(healthy) >= 3:
    logs = np.log(healthy[-window:])
    growth = float(np.polyfit(np.arange(len(logs)), logs, 1)[0])
    doubling = float(np.log(2) / growth) if growth > 1e-9 else None
  return growth, doubling, window


def _suggested(healthy: np.ndarray) -> float | None:
  if len(healthy) < 5:
    return None
  typical = np.median(healthy)
  calm = healthy[healthy < 10 * typical]
  return float(np.percentile(calm if len(calm) else healthy, 90))


def _loss_change(r: Series) -> float | None:
  """Median of the last 20% of the losses against the 20% around the middle
  (wide windows: a batch loss is noisy), relative."""
  if r.loss is None or r.first_bad is not None or r.steps < 20:
    return None
  steps, w = r.steps, max(r.steps // 5, 2)
  mid = np.median(r.loss[steps // 2 - w // 2: steps // 2 + w - w // 2])
  last = np.median(r.loss[-w:])
  return float((last - mid) / abs(mid)) if mid != 0 else None


def _start_outliers(r: Series, depth: float | None) -> tuple[bool, bool]:
  """``(init_outlier, early_rise)``. The first steps (too few before them
  for the spike rule): norms past the spike factor x the run's median that
  rose over 10x after step 0 are the first updates blowing up. A first norm
  far above the rest is an init-scale sign only past the spike factor (some
  10x the median is the ordinary first fit of a large initial error), only
  where it sits in the early layers (a shrinking profile puts it in the
  read-out, its first fit, as in a saturating net), and not where it is the
  first fit of a large first loss."""
  healthy, end, weights = r.healthy, r.end, r.weights
  big_start = (len(healthy) >= 5
               and healthy[:4].max() > SPIKE_FACTOR * np.median(healthy))
  early_rise = bool(big_start and healthy[1:4].max() > 10 * healthy[0])
  init_outlier = bool(not early_rise and len(healthy) >= 5
                      and healthy[0] > SPIKE_FACTOR * np.median(healthy))
  if init_outlier and len(weights) >= 2 and r.names:
    first = r.leaves[weights[0]][:end]
    ok = first[np.isfinite(first) & (first > 0)]
    init_outlier = bool(len(ok) >= 5 and ok[0] > SPIKE_FACTOR * np.median(ok)
                        and (depth is None or depth >= VANISHING_RATIO))
  if init_outlier and r.loss is not None and len(healthy) >= 5:
    init_outlier = not r.loss[0] > 2 * np.median(r.loss[:end])
  return init_outlier, early_rise


def measure(r: Series) -> Figures:
  """Step 2: the figures of the run before its first non-finite step."""
  end, weights, leaves = r.end, r.weights, r.leaves
  growth, doubling, window = _growth(r.healthy)
  depth = factor = None
  if len(weights) >= 2 and r.names:
    depth = _median_ratio(leaves[weights[0]][:end], leaves[weights[-1]][:end])
    if depth is not None:
      factor = float(depth ** (1.0 / (len(weights) - 1)))
  # Layers whose gradient is exactly zero on 90% of the second half of the
  # healthy steps: saturated (tanh/sigmoid) or dead (ReLU) units.
  dead = [n for n in weights if end >= 4 and n in leaves
          and np.mean(leaves[n][end // 2:end] == 0) >= 0.9]
  first_ur = last_ur = None
  if weights and weights[0] in r.ratios and weights[-1] in r.ratios:
    first_ur = _finite_median(r.ratios[weights[0]][:end])
    last_ur = _finite_median(r.ratios[weights[-1]][:end])
  loss_change = _loss_change(r)
  sustained = (growth is not None and growth > 0.05
               and growth * (window - 1) >= np.log(10))
  init_outlier, early_rise = _start_outliers(r, depth)
  return Figures(
      growth, doubling, window, _suggested(r.healthy), depth, factor,
      [n for n in r.names if _RECURRENT.search(n)], dead, first_ur, last_ur,
      loss_change, loss_change is not None and loss_change > -STALL,
      spikes(r.norm, end), sustained, init_outlier, early_rise)


def exploding(r: Series, f: Figures) -> bool:
  return (r.first_bad is not None or f.sustained or bool(f.spikes)
          or f.init_outlier or f.early_rise)


def vanishing_signs(f: Figures) -> tuple[bool, bool, bool]:
  """``(by depth profile, by update ratios, through time)``."""
  vanish_depth = f.depth is not None and f.depth < VANISHING_RATIO
  vanish_ratio = (f.first_ur is not None and f.last_ur is not None
                  and f.first_ur < UPDATE_RATIO_FLOOR
                  and f.last_ur >= 100 * f.first_ur)
  vanish_time = bool(f.recurrent) and f.stalled and not vanish_depth
  return vanish_depth, vanish_ratio, vanish_time


def find_regime(r: Series, f: Figures) -> tuple[str, list[str]]:
  """Step 3: ``(regime, evidence)``."""
  evidence: list[str] = []
  if exploding(r, f):
    if r.first_bad is not None:
      evidence.append(f"non-finite at step {r.first_step + r.first_bad}")
    if f.sustained:
      evidence.append(f"norm grows x{np.exp(f.growth):.2f} per step")
    if f.spikes:
      evidence.append(f"{len(f.spikes)} norm spike(s) over {SPIKE_FACTOR:g}x "
                      "the recent median")
    if f.init_outlier:
      evidence.append("first norm far above the rest")
    if f.early_rise:
      k = int(np.argmax(r.healthy[1:4])) + 1
      evidence.append(f"norm rose from {r.healthy[0]:.3g} to "
                      f"{r.healthy[k]:.3g} at step {k}")
    return "exploding", evidence
  vanish_depth, vanish_ratio, vanish_time = vanishing_signs(f)
  w = r.weights
  if vanish_depth:
    evidence.append(f"||{w[0]}|| / ||{w[-1]}|| = {f.depth:.2g}")
  if vanish_ratio:
    evidence.append(f"update/param ratio {f.first_ur:.2g} in {w[0]} "
                    f"against {f.last_ur:.2g} in {w[-1]}")
  if vanish_time:
    evidence.append("loss stalled in a recurrent model")
  if not (vanish_depth or vanish_ratio or vanish_time):
    return "healthy", evidence
  if f.loss_change is not None and f.stalled and not vanish_time:
    evidence.append(f"loss stalled ({100 * f.loss_change:+.1f}% over the "
                    "second half)")
  return "vanishing", evidence
