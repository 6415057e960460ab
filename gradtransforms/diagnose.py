"""``diagnose``: a host-side reading of recorded metrics, in plain language.

It tells three gradient regimes apart and names likely causes only from the
figures that support them:

- **exploding**: a non-finite gradient or loss, sustained exponential growth
  of the norm (over an order of magnitude), norm spikes (``SPIKE_FACTOR`` x
  the recent median), or a first norm that far above the rest, sitting in
  the early layers and not the first fit of a large initial loss. Only then are explosion causes (learning rate,
  initialisation scale, depth amplification, recurrence, bad batches) named.
- **vanishing**: the early layers' gradient norms orders of magnitude below
  the last layers' (the depth profile), the early layers' update-to-parameter
  ratios far below the usual 1e-4..1e-2 while the last layers' are not, or a
  recurrent model whose loss stalls without any explosion.
- **healthy**: neither.

Independently of the regime it reads every clip in the history (roles
``clip_scale``, ``clipped``, ``threshold``): a clip that acts on most steps
with a small scale lowers the effective learning rate; a fixed threshold
that is never reached does nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from gradtransforms import _registry

_PREFERRED = ("monitor", "detect_spikes")  # pure observers first
_WEIGHT = re.compile(r"(kernel|weight|(^|/)w[^/]*)$")
_RECURRENT = re.compile(r"(recur|rnn|lstm|gru|hh|hidden|cell)", re.I)
# Read-out layers sort last in the depth order, whatever their name's rank.
_READOUT = re.compile(r"(^|/)(out|output|head|readout|lm_head|classifier|"
                      r"logits)(/|$)", re.I)

VANISHING_RATIO = 1e-2
"""First / last layer gradient norm below which the profile counts as
vanishing (two orders of magnitude)."""
SATURATING_FACTOR = 0.5
"""Per-layer shrink factor at or below which saturating activations are
named (sigmoid's derivative is at most 0.25; ReLU with He init keeps about
1)."""
UPDATE_RATIO_FLOOR = 1e-5
"""``||u|| / ||p||`` below which a layer's steps count as far below the
usual 1e-4..1e-2 range (an order of magnitude under its bottom)."""
STALL = 0.05
"""Relative loss change over the second half of a run below which the loss
counts as stalled."""
SPIKE_FACTOR = 20.0
"""A norm this many times the median of the 20 steps before it is a spike."""
TIGHT_ACTIVE, TIGHT_SCALE = 0.5, 0.5
"""A clip acting on at least this fraction of steps with a median scale
below this is over-tight."""


@dataclasses.dataclass
class ClipFinding:
  """What :func:`diagnose` read from one clip of the optimizer.

  ``verdict``: ``"over-tight"`` (acts on most steps with a small scale),
  ``"never reached"`` (a fixed threshold that never acted) or ``"ok"``.
  ``median_scale`` is the median factor the clip multiplied the gradient by
  over the healthy steps: for SGD-like optimizers, the effective learning
  rate as a fraction of the nominal one.
  """
  name: str
  verdict: str
  active_fraction: float
  median_scale: float | None
  threshold: float | None  # median bound in force (None: not recorded)
  adaptive: bool  # the threshold moved during the run
  max_norm: float | None  # largest finite pre-clip norm


@dataclasses.dataclass
class Diagnosis:
  """What :func:`diagnose` found. ``report`` is the plain-language summary;
  ``regime`` is ``"exploding"``, ``"vanishing"`` or ``"healthy"``;
  ``causes`` name the likely causes of that regime (and an over-tight clip),
  each with its remedies; ``evidence`` the figures behind the regime."""
  steps: int
  first_nonfinite_step: int | None
  first_nonfinite_layers: list[str]
  growth_per_step: float | None  # mean d log||g|| / d step before blow-up
  doubling_steps: float | None
  depth_ratio: float | None  # first-layer / last-layer gradient norm (median)
  first_layer: str | None
  last_layer: str | None
  suggested_clip: float | None
  causes: list[str]
  report: str
  regime: str = "healthy"
  evidence: list[str] = dataclasses.field(default_factory=list)
  remedies: list[str] = dataclasses.field(default_factory=list)
  layer_factor: float | None = None  # per-layer shrink/growth (geometric)
  spike_steps: list[int] = dataclasses.field(default_factory=list)
  first_update_ratio: float | None = None  # median ||u||/||p||, first layer
  last_update_ratio: float | None = None
  loss_change: float | None = None  # relative, over the second half
  dead_layers: list[str] = dataclasses.field(default_factory=list)
  clips: list[ClipFinding] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    return self.report


def _natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _depth_key(s: str):
  """Depth order: natural order of the names, read-out layers last."""
  return (bool(_READOUT.search(s)), _natural(s))


def _role_keys(role: str, keys: Sequence[str], per_leaf: bool = False
               ) -> list[str]:
  """Keys of ``keys`` that hold ``role`` (``"<name>[@where]/<figure>"``,
  plus ``"/<leaf>"`` for per-leaf figures), observers first."""
  pairs = sorted(_registry.with_role(role),
                 key=lambda p: p[0] not in _PREFERRED)
  # An observer that records update ratios sits after the optimizer: its
  # norms are the updates', so it comes last for the gradient's roles.
  after = {k.partition("/")[0] for k in keys
           if any(k.partition("/")[2].startswith(f + "/") and
                  k.split("@")[0].split("/")[0] == n
                  for n, f in _registry.with_role("update_ratio"))}
  ordered = sorted(keys, key=lambda k: k.partition("/")[0] in after)
  out = []
  for name, fig in pairs:
    for k in ordered:
      head, _, rest = k.partition("/")
      if head.split("@")[0] != name:
        continue
      if per_leaf and rest.startswith(fig + "/"):
        out.append(k)
      elif not per_leaf and rest == fig:
        out.append(k)
  return out


def _series(history: Any) -> dict[str, np.ndarray]:
  if isinstance(history, Mapping):
    return {k: np.asarray(v, np.float64).reshape(len(v), -1)[:, 0]
            for k, v in history.items() if np.ndim(v) >= 1}
  rows: Sequence[Mapping] = list(history)
  keys = sorted({k for r in rows for k in r})
  return {k: np.asarray([float(np.asarray(r.get(k, np.nan)).reshape(-1)[0])
                         if np.size(r.get(k, np.nan)) else np.nan for r in rows])
          for k in keys}


def _per_leaf(s: Mapping[str, np.ndarray], role: str) -> dict[str, np.ndarray]:
  """Leaf name -> series of the first transform (observers first) that
  records ``role`` per leaf."""
  out: dict[str, np.ndarray] = {}
  for k in _role_keys(role, list(s), per_leaf=True):
    out.setdefault(k.split("/", 2)[2], s[k])
  return out


def depth_profile(history: Any) -> tuple[list[str], np.ndarray]:
  """The recorded per-layer gradient norms in depth order.

  Returns ``(layers, norms)``: the weight leaves (``kernel``, ``weight``,
  ``w*``; every leaf if none is named so) from input to output, read-out
  layers (``out``, ``head``, ...) last, and a ``(steps, layers)`` array of
  their norms (role ``leaf_norm``, from ``gt.monitor(per_leaf=True)``).
  Empty when no per-leaf norm was recorded.
  """
  s = _series(history)
  leaves = _per_leaf(s, "leaf_norm")
  names = sorted(leaves, key=_natural)
  weights = sorted([n for n in names if _WEIGHT.search(n)] or names,
                   key=_depth_key)
  steps = len(next(iter(s.values()))) if s else 0
  if not weights:
    return [], np.zeros((steps, 0))
  return weights, np.stack([leaves[n] for n in weights], axis=1)


def _median_ratio(a: np.ndarray, b: np.ndarray) -> float | None:
  ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
  return float(np.median(a[ok] / b[ok])) if ok.any() else None


def _finite_median(x: np.ndarray) -> float | None:
  x = x[np.isfinite(x)]
  return float(np.median(x)) if x.size else None


def _spikes(norm: np.ndarray, end: int, window: int = 20) -> list[int]:
  """Steps ``t >= 1`` before ``end`` whose norm exceeds ``SPIKE_FACTOR`` x the
  median of the (up to) ``window`` finite norms before it (at least 5)."""
  out = []
  for t in range(1, end):
    past = norm[max(0, t - window):t]
    past = past[np.isfinite(past) & (past > 0)]
    if len(past) >= 5 and norm[t] > SPIKE_FACTOR * np.median(past):
      out.append(t)
  return out


def _clips(s: Mapping[str, np.ndarray], end: int, pre_norm: np.ndarray
           ) -> list[ClipFinding]:
  """One finding per transform instance recording a clip scale or a
  threshold. The scale is read (``clip_scale``; per-leaf scales: their
  median over leaves at each step) or derived as ``min(1, threshold /
  norm)``; the instance's own pre-clip norm is used where it records one."""
  heads: dict[str, dict[str, Any]] = {}
  for role in ("clip_scale", "threshold", "clipped", "global_norm"):
    for name, fig in _registry.with_role(role):
      for k in s:
        head, _, rest = k.partition("/")
        if head.split("@")[0] != name:
          continue
        if rest == fig:
          heads.setdefault(head, {})[role] = s[k][:end]
        elif role == "clip_scale" and rest.startswith(fig + "/"):
          heads.setdefault(head, {}).setdefault("leaf_scales", []).append(
              s[k][:end])
  found = []
  for head in sorted(heads):
    f = heads[head]
    if not ({"clip_scale", "leaf_scales", "threshold"} & set(f)):
      continue
    norm = f.get("global_norm", pre_norm[:end])
    thr = f.get("threshold")
    if "clip_scale" in f:
      scale = f["clip_scale"]
    elif "leaf_scales" in f:
      scale = np.nanmedian(np.stack(f["leaf_scales"], 1), axis=1)
    elif thr is not None and "global_norm" in f:
      with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.minimum(1.0, thr / norm)
    else:
      scale = None
    ok = np.isfinite(norm)
    if scale is not None:
      ok &= np.isfinite(scale)
    if not ok.any():
      continue
    if scale is not None:
      active = scale[ok] < 1 - 1e-6
    else:
      active = f["clipped"][ok] > 0 if "clipped" in f else np.zeros(ok.sum(), bool)
    if thr is None and scale is not None and "clip_scale" in f and active.any():
      thr = norm * scale  # the bound a norm clip scaled down to
      thr = np.where(scale < 1 - 1e-6, thr, np.nan)
    thr_ok = thr[ok][np.isfinite(thr[ok])] if thr is not None else np.array([])
    threshold = float(np.median(thr_ok)) if thr_ok.size else None
    adaptive = bool(thr_ok.size and np.ptp(thr_ok) > 1e-3 * abs(np.median(thr_ok)))
    median_scale = float(np.median(scale[ok])) if scale is not None else None
    frac = float(active.mean())
    if (frac >= TIGHT_ACTIVE and median_scale is not None
        and median_scale < TIGHT_SCALE):
      verdict = "over-tight"
    elif not active.any() and not adaptive:
      verdict = "never reached"
    else:
      verdict = "ok"
    finite_norm = norm[ok][np.isfinite(norm[ok])]
    found.append(ClipFinding(head, verdict, frac, median_scale, threshold,
                             adaptive, float(finite_norm.max())
                             if finite_norm.size else None))
  return found


def diagnose(history: Any, loss: Sequence[float] | None = None) -> Diagnosis:
  """Reads a run's recorded metrics: exploding, vanishing or healthy, why,
  and what the clips did.

  Args:
    history: a list of ``gt.metrics(state, per_leaf=True)`` dicts, one per
      step (arrays or numbers), or a dict of per-step sequences with the
      same keys. It needs a global norm (``monitor/norm`` or another
      ``*/norm`` figure); per-leaf norms (``gt.monitor(per_leaf=True)``)
      add the depth profile and layer names; update-to-parameter ratios
      (``gt.monitor(update_ratio=True)`` chained after the optimizer) and
      clip scales/thresholds add their findings.
    loss: optional per-step losses (non-finite losses mark blow-up too; a
      stalled loss supports vanishing).

  Returns:
    a :class:`Diagnosis`: the regime and its evidence, first non-finite
    step and layers, exponential growth rate of the norm, spikes, depth
    profile (first / last layer norm ratio and the per-layer factor),
    update ratios, the loss change over the second half, a finding per clip,
    a suggested clip threshold (the 90th percentile of the healthy norms),
    and a report naming likely causes and remedies. Explosion causes
    (learning rate, initialisation scale, depth amplification, recurrence,
    bad batches) are named only for a run that exploded; vanishing ones
    (saturating activations, depth, recurrence) only for one that vanished.
  """
  if (not len(list(history)) if not isinstance(history, Mapping) else
      any(np.ndim(v) >= 1 and len(v) == 0 for v in history.values())):
    raise ValueError("diagnose: history is empty (no steps recorded); record "
                     "gt.metrics(state, per_leaf=True) once per step")
  s = _series(history)
  norm_keys = _role_keys("global_norm", list(s))
  if not norm_keys:
    raise ValueError("diagnose: history has no global-norm figure; put "
                     "gt.monitor() (or a detector or clip) in the optimizer")
  norm_key = norm_keys[0]
  norm = s[norm_key]
  steps = len(norm)
  if steps == 0:
    raise ValueError("diagnose: history has no steps")
  bad = ~np.isfinite(norm)
  loss_arr = None
  if loss is not None:
    loss_arr = np.asarray(loss, np.float64).reshape(-1)
    if len(loss_arr) != steps:
      raise ValueError(f"diagnose: loss has {len(loss_arr)} values but the "
                       f"history has {steps} steps; pass one loss per step")
    bad |= ~np.isfinite(loss_arr)
  first_bad = int(np.argmax(bad)) if bad.any() else None
  leaves = _per_leaf(s, "leaf_norm")
  names = sorted(leaves, key=_natural)
  bad_layers = ([n for n in names if not np.isfinite(leaves[n][first_bad])]
                if first_bad is not None else [])

  end = first_bad if first_bad is not None else steps
  healthy = norm[:end][np.isfinite(norm[:end]) & (norm[:end] > 0)]
  growth = doubling = None
  window = min(len(healthy), 50)
  if len(healthy) >= 3:
    logs = np.log(healthy[-window:])
    growth = float(np.polyfit(np.arange(len(logs)), logs, 1)[0])
    doubling = float(np.log(2) / growth) if growth > 1e-9 else None
  suggested = None
  if len(healthy) >= 5:
    typical = np.median(healthy)
    calm = healthy[healthy < 10 * typical]
    suggested = float(np.percentile(calm if len(calm) else healthy, 90))

  # Depth profile: first weight layer against the last (read-out last).
  depth = factor = None
  ratios = _per_leaf(s, "update_ratio")
  layer_names = names or sorted(ratios, key=_natural)  # ratios alone: theirs
  weights = sorted([n for n in layer_names if _WEIGHT.search(n)] or layer_names,
                   key=_depth_key)
  if len(weights) >= 2 and names:
    depth = _median_ratio(leaves[weights[0]][:end], leaves[weights[-1]][:end])
    if depth is not None:
      factor = float(depth ** (1.0 / (len(weights) - 1)))
  recurrent = [n for n in names if _RECURRENT.search(n)]
  # Layers whose gradient is exactly zero on 90% of the second half of the
  # healthy steps: saturated (tanh/sigmoid) or dead (ReLU) units.
  dead = [n for n in weights if end >= 4 and n in leaves
          and np.mean(leaves[n][end // 2:end] == 0) >= 0.9]

  # Update-to-parameter ratios, first and last layer.
  first_ur = last_ur = None
  if weights and weights[0] in ratios and weights[-1] in ratios:
    first_ur = _finite_median(ratios[weights[0]][:end])
    last_ur = _finite_median(ratios[weights[-1]][:end])

  # Loss over the second half: median of the last 20% of the steps against
  # the 20% around the middle (wide windows: a batch loss is noisy).
  loss_change = None
  if loss_arr is not None and first_bad is None and steps >= 20:
    w = max(steps // 5, 2)
    mid = np.median(loss_arr[steps // 2 - w // 2: steps // 2 + w - w // 2])
    last = np.median(loss_arr[-w:])
    if mid != 0:
      loss_change = float((last - mid) / abs(mid))
  stalled = loss_change is not None and loss_change > -STALL

  # --- exploding? -------------------------------------------------------------
  spikes = _spikes(norm, end)
  sustained = (growth is not None and growth > 0.05
               and growth * (window - 1) >= np.log(10))
  # The first steps (too few before them for the spike rule): norms past
  # the spike factor x the run's median that rose over 10x after step 0 are
  # the first updates blowing up. A first norm far above the rest is an
  # init-scale sign only past the spike factor (some 10x the median is the
  # ordinary first fit of a large initial error), ...
  big_start = (len(healthy) >= 5
               and healthy[:4].max() > SPIKE_FACTOR * np.median(healthy))
  early_rise = bool(big_start and healthy[1:4].max() > 10 * healthy[0])
  init_outlier = bool(not early_rise and len(healthy) >= 5
                      and healthy[0] > SPIKE_FACTOR * np.median(healthy))
  if init_outlier and len(weights) >= 2 and names:
    # And only where it sits in the early layers: a shrinking profile puts
    # it in the read-out (its first fit), as in a saturating net.
    first = leaves[weights[0]][:end]
    ok = first[np.isfinite(first) & (first > 0)]
    init_outlier = bool(len(ok) >= 5 and ok[0] > SPIKE_FACTOR * np.median(ok)
                        and (depth is None or depth >= VANISHING_RATIO))
  if init_outlier and loss_arr is not None and len(healthy) >= 5:
    # ... nor where it is the first fit of a large first loss (the norm did
    # not rise tenfold after it: the first updates did not blow up).
    init_outlier = not loss_arr[0] > 2 * np.median(loss_arr[:end])
  exploding = (first_bad is not None or sustained or bool(spikes)
               or init_outlier or early_rise)

  causes: list[str] = []
  remedies: list[str] = []
  evidence: list[str] = []
  if exploding:
    regime = "exploding"
    if first_bad is not None:
      evidence.append(f"non-finite at step {first_bad}")
    if sustained:
      evidence.append(f"norm grows x{np.exp(growth):.2f} per step")
    if spikes:
      evidence.append(f"{len(spikes)} norm spike(s) over {SPIKE_FACTOR:g}x the "
                      "recent median")
    if init_outlier:
      evidence.append("first norm far above the rest")
    if early_rise:
      k = int(np.argmax(healthy[1:4])) + 1
      evidence.append(f"norm rose from {healthy[0]:.3g} to {healthy[k]:.3g} "
                      f"at step {k}")
    if first_bad is not None and first_bad < 5:
      causes.append(
          f"initialisation scale or learning rate: non-finite after only "
          f"{first_bad} step(s), so the very first updates were too large; use "
          "He/Xavier init, a smaller learning rate or warm-up, and clip from "
          "step 0 (gt.clip_by_global_norm)")
    if sustained:
      causes.append(
          f"learning rate: the gradient norm grows exponentially "
          f"(x{np.exp(growth):.2f} per step, doubling every {doubling:.2g} "
          "steps); lower the learning rate or add warm-up")
    if init_outlier:
      causes.append(
          f"initialisation scale or early learning rate: the first norm "
          f"({healthy[0]:.3g}) is {healthy[0] / np.median(healthy):.0f}x the "
          "run's median, in the early layers too; use He/Xavier init or a "
          "smaller init scale, warm-up, and clip from step 0")
    if early_rise:
      causes.append(
          f"initialisation scale or early learning rate: the norm rose "
          f"x{healthy[k] / healthy[0]:.3g} over the first {k} step(s), to "
          f"{healthy[k] / np.median(healthy):.0f}x the run's median: the first "
          "updates were too large for the initial weights; use warm-up or a "
          "smaller learning rate, He/Xavier init, and clip from step 0")
    if depth is not None and depth > 10:
      causes.append(
          f"depth: gradients are amplified {depth:.3g}x from {weights[-1]} to "
          f"{weights[0]}; add normalisation, residual connections or "
          "better-scaled init")
    if recurrent and (first_bad is not None or sustained or early_rise or
                      (depth is not None and depth > 10)):
      causes.append(
          f"recurrence: recurrent weights ({', '.join(recurrent[:3])}) multiply "
          "gradients through time; clip the global norm, shorten BPTT, or use a "
          "gated cell (LSTM/GRU)")
    if spikes:
      shown = ", ".join(map(str, spikes[:5])) + (" ..." if len(spikes) > 5 else "")
      causes.append(
          f"bad batches: isolated norm spikes at step(s) {shown} in an otherwise "
          "steady run (a data fault or outlier batch); skip them with "
          "gt.guard(..., on=('spike',)) or bound them with gt.zclip()")
    remedies += ["lower the learning rate or add warm-up",
                 "He/Xavier init", "gradient clipping (gt.clip_by_global_norm, "
                 "gt.zclip)"]
  else:
    vanish_depth = depth is not None and depth < VANISHING_RATIO
    vanish_ratio = (first_ur is not None and last_ur is not None
                    and first_ur < UPDATE_RATIO_FLOOR
                    and last_ur >= 100 * first_ur)
    vanish_time = bool(recurrent) and stalled and not vanish_depth
    if vanish_depth:
      evidence.append(f"||{weights[0]}|| / ||{weights[-1]}|| = {depth:.2g}")
    if vanish_ratio:
      evidence.append(f"update/param ratio {first_ur:.2g} in {weights[0]} "
                      f"against {last_ur:.2g} in {weights[-1]}")
    if vanish_time:
      evidence.append("loss stalled in a recurrent model")
    if vanish_depth or vanish_ratio or vanish_time:
      regime = "vanishing"
      if loss_change is not None and stalled and not vanish_time:
        evidence.append(f"loss stalled ({100 * loss_change:+.1f}% over the "
                        "second half)")
      if vanish_depth or vanish_ratio:
        deep = len(weights) >= 6
        if deep and factor is not None and factor <= SATURATING_FACTOR:
          causes.append(
              f"saturating activations: gradients shrink x{factor:.2g} per layer "
              f"over {len(weights)} layers, as sigmoid (derivative <= 0.25) or "
              "saturated tanh units do; use ReLU with He init, add "
              "normalisation (batch/layer norm), or residual connections")
        causes.append(
            f"depth: the backward signal shrinks "
            f"{1 / depth if depth else np.inf:.3g}x from {weights[-1]} to "
            f"{weights[0]}, so the early layers barely learn; add normalisation "
            "(batch/layer norm) or residual connections")
        remedies += ["ReLU with He init", "batch or layer normalisation",
                     "residual connections"]
      if vanish_time:
        causes.append(
            f"recurrence: the gradient through time of a plain recurrent cell "
            f"({', '.join(recurrent[:3])}) shrinks with each step back when its "
            "recurrent weights contract (spectral radius below 1) or its tanh "
            "saturates, so long-range dependencies are not learnt; the loss "
            "stalls while no gradient explodes (per-leaf norms cannot show how "
            "far back the gradient reaches); use a gated cell (LSTM/GRU)")
      if vanish_time or (recurrent and (vanish_depth or vanish_ratio)):
        remedies.append("LSTM/GRU for recurrences")
    else:
      regime = "healthy"

  clips = _clips(s, end, norm)
  # How far the pre-clip norm fell over the run (first against last 10%):
  # a clip acting on norms that fall by orders of magnitude may be holding
  # back an explosion rather than starving healthy training.
  fell = None
  if len(healthy) >= 10:
    w10 = max(len(healthy) // 10, 1)
    fell = float(np.median(healthy[:w10]) / np.median(healthy[-w10:]))
  clip_lines = []
  for c in clips:
    thr = f" (threshold {c.threshold:.3g})" if c.threshold is not None else ""
    if c.verdict == "over-tight":
      assert c.median_scale is not None
      if c.adaptive:
        fix = ("loosen it (a higher percentile for gt.autoclip, a higher z "
               "for gt.zclip)")
      elif fell is not None and fell > 10:
        fix = (f"but the pre-clip norm fell {fell:.3g}x over the run, so the "
               "clip may be holding back an explosion (init scale, depth): "
               "fix that first, then set the threshold from the settled norms "
               "or use an adaptive clip (gt.zclip(), gt.autoclip())")
      else:
        fix = (f"use gt.clip_by_global_norm({suggested:.3g}) (90th percentile "
               "of the pre-clip norms) " if suggested is not None else "") + (
               "or an adaptive clip that follows the norms (gt.zclip(), "
               "gt.autoclip())")
      text = (f"over-tight clipping: {c.name}{thr} scaled the gradient on "
              f"{100 * c.active_fraction:.0f}% of the steps, by a median "
              f"{c.median_scale:.2g}: the effective learning rate is ~"
              f"{c.median_scale:.2g} of the nominal (for SGD-like optimizers; "
              f"Adam-like ones undo a steady scale); {fix}")
      causes.append(text)
      clip_lines.append(f"- clip {c.name}: over-tight, effective learning rate "
                        f"~{c.median_scale:.2g} of the nominal")
    elif c.verdict == "never reached":
      most = f", largest pre-clip norm {c.max_norm:.3g}" if c.max_norm else ""
      sug = (f"; a threshold near {suggested:.3g} (90th percentile of the "
             "pre-clip norms) would bound the largest 10% of steps, or use "
             "gt.zclip() for spikes only" if suggested is not None else "")
      clip_lines.append(f"- clip {c.name}{thr}: never reached in {end} steps"
                        f"{most}; it does nothing{sug}")
    else:
      sc = (f", median scale {c.median_scale:.2g}" if c.median_scale is not None
            else "")
      clip_lines.append(f"- clip {c.name}{thr}: active on "
                        f"{100 * c.active_fraction:.0f}% of the steps{sc}")

  lines = [f"Gradient diagnosis over {steps} steps ({norm_key}):"]
  headline = {"exploding": "EXPLODING", "vanishing": "VANISHING",
              "healthy": "healthy gradients (no explosion, no vanishing)"
              + (", but the clip below starves the steps"
                 if any(c.verdict == "over-tight" for c in clips) else "")
              }[regime]
  lines.append(f"- regime: {headline}" + (f" ({'; '.join(evidence)})"
                                           if evidence else ""))
  if first_bad is not None:
    shown = ", ".join(bad_layers[:4]) + (
        f" and {len(bad_layers) - 4} more" if len(bad_layers) > 4 else "")
    where = f" in {shown}" if bad_layers else ""
    lines.append(f"- first non-finite gradient at step {first_bad}{where}")
  else:
    lines.append("- no non-finite gradient")
  if growth is not None:
    lines.append(f"- norm growth: x{np.exp(growth):.3f} per step over the last "
                 f"{window} healthy steps")
  if depth is not None:
    per = (f"; x{factor:.2g} per layer over {len(weights)} layers"
           if factor is not None and len(weights) > 2 and not recurrent
           else "")
    lines.append(f"- depth profile: ||{weights[0]}|| / ||{weights[-1]}|| = "
                 f"{depth:.3g} (median over healthy steps{per})")
  if dead:
    lines.append(f"- zero gradient over the second half in {', '.join(dead[:4])}"
                 + (f" and {len(dead) - 4} more" if len(dead) > 4 else "")
                 + ": saturated (tanh/sigmoid) or dead (ReLU) units; these "
                 "layers no longer learn")
  if first_ur is not None and last_ur is not None:
    lines.append(f"- update/param ratio: {first_ur:.2g} in {weights[0]}, "
                 f"{last_ur:.2g} in {weights[-1]} (usual: 1e-4 to 1e-2)")
    if (regime != "vanishing" and max(first_ur, last_ur) < UPDATE_RATIO_FLOOR):
      over = any(c.verdict == "over-tight" for c in clips)
      lines.append("- steps are tiny in every layer: " + (
          "the over-tight clip below shrinks them" if over else
          "the learning rate is too small for these weights"))
  if loss_change is not None:
    lines.append(f"- loss: {100 * loss_change:+.1f}% over the second half"
                 + (" (stalled)" if stalled else ""))
  if suggested is not None and regime == "exploding":
    lines.append(f"- suggested clip: gt.clip_by_global_norm({suggested:.3g}) "
                 "(90th percentile of healthy norms), or gt.zclip()")
  lines += clip_lines
  lines += [f"- likely cause: {c}" for c in causes]
  if regime == "healthy" and not causes:
    lines.append("- no explosion pattern found, no vanishing gradient")
  return Diagnosis(steps, first_bad, bad_layers, growth, doubling, depth,
                   weights[0] if weights else None,
                   weights[-1] if weights else None,
                   suggested, causes, "\n".join(lines), regime=regime,
                   evidence=evidence, remedies=remedies, layer_factor=factor,
                   spike_steps=spikes, first_update_ratio=first_ur,
                   last_update_ratio=last_ur, loss_change=loss_change,
                   dead_layers=dead, clips=clips)
