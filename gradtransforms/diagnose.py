"""``diagnose``: a host-side reading of recorded metrics, in plain language."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from gradtransforms import _registry

_PREFERRED = ("monitor", "detect_spikes")  # pure observers first
_WEIGHT = re.compile(r"(kernel|weight|(^|/)w[^/]*)$")
_RECURRENT = re.compile(r"(recur|rnn|lstm|gru|hh|hidden|cell)", re.I)


@dataclasses.dataclass
class Diagnosis:
  """What :func:`diagnose` found. ``report`` is the plain-language summary."""
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

  def __str__(self) -> str:
    return self.report


def _natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _role_keys(role: str, keys: Sequence[str], per_leaf: bool = False
               ) -> list[str]:
  """Keys of ``keys`` that hold ``role`` (``"<name>[@where]/<figure>"``,
  plus ``"/<leaf>"`` for per-leaf figures), observers first."""
  pairs = sorted(_registry.with_role(role),
                 key=lambda p: p[0] not in _PREFERRED)
  out = []
  for name, fig in pairs:
    for k in keys:
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


def diagnose(history: Any, loss: Sequence[float] | None = None) -> Diagnosis:
  """Reads a run's recorded metrics and names the likely causes of explosion.

  Args:
    history: a list of ``gt.metrics(state)`` dicts, one per step (arrays or
      numbers), or a dict of per-step sequences with the same keys. It needs
      a global norm (``monitor/norm`` or another ``*/norm`` figure); per-leaf
      norms (``gt.monitor(per_leaf=True)``) add the depth profile and layer
      names.
    loss: optional per-step losses (non-finite losses mark blow-up too).

  Returns:
    a :class:`Diagnosis`: first non-finite step and layers, exponential
    growth rate of the norm, depth profile (first / last layer norm ratio),
    a suggested clip threshold (the 90th percentile of healthy norms), and
    a report naming likely causes: learning rate, initialisation scale,
    depth, recurrence.
  """
  if not isinstance(history, Mapping) and not len(list(history)):
    raise ValueError("diagnose: history is empty; record gt.metrics(state, "
                     "per_leaf=True) once per step")
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
  if loss is not None:
    loss = np.asarray(loss, np.float64).reshape(-1)
    if len(loss) != steps:
      raise ValueError(f"diagnose: loss has {len(loss)} values but the history "
                       f"has {steps} steps; pass one loss per step")
    bad |= ~np.isfinite(loss)
  first_bad = int(np.argmax(bad)) if bad.any() else None
  leaves: dict[str, np.ndarray] = {}
  for k in _role_keys("leaf_norm", list(s), per_leaf=True):
    head, fig_leaf = k.split("/", 1)
    leaves.setdefault(fig_leaf.split("/", 1)[1], s[k])
  names = sorted(leaves, key=_natural)
  bad_layers = ([n for n in names if not np.isfinite(leaves[n][first_bad])]
                if first_bad is not None else [])

  end = first_bad if first_bad is not None else steps
  healthy = norm[:end][np.isfinite(norm[:end]) & (norm[:end] > 0)]
  growth = doubling = None
  if len(healthy) >= 3:
    window = np.log(healthy[-min(len(healthy), 50):])
    growth = float(np.polyfit(np.arange(len(window)), window, 1)[0])
    doubling = float(np.log(2) / growth) if growth > 1e-9 else None
  suggested = None
  if len(healthy) >= 5:
    typical = np.median(healthy)
    calm = healthy[healthy < 10 * typical]
    suggested = float(np.percentile(calm if len(calm) else healthy, 90))

  depth = None
  weights = [n for n in names if _WEIGHT.search(n)] or names
  if len(weights) >= 2:
    a, b = leaves[weights[0]][:end], leaves[weights[-1]][:end]
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    if ok.any():
      depth = float(np.median(a[ok] / b[ok]))

  causes = []
  if first_bad is not None and first_bad < 5:
    causes.append(
        f"initialisation scale or learning rate: non-finite after only "
        f"{first_bad} step(s), so the very first updates were too large; use "
        "He/Xavier init, a smaller learning rate or warm-up, and clip from "
        "step 0 (gt.clip_by_global_norm)")
  if growth is not None and growth > 0.05:
    causes.append(
        f"learning rate: the gradient norm grows exponentially (x{np.exp(growth):.2f}"
        f" per step, doubling every {doubling:.0f} steps); lower the learning "
        "rate or add warm-up")
  if len(healthy) >= 5 and healthy[0] > 10 * np.median(healthy):
    causes.append(
        f"initialisation scale: the first norm ({healthy[0]:.3g}) is "
        f"{healthy[0] / np.median(healthy):.0f}x the run's median; use He/Xavier "
        "init or a smaller init scale")
  if depth is not None and (depth > 10 or depth < 0.1):
    way = "amplified" if depth > 1 else "shrunk"
    causes.append(
        f"depth: gradients are {way} {max(depth, 1 / depth):.3g}x from "
        f"{weights[-1]} to {weights[0]}; add normalisation, residual connections "
        "or better-scaled init")
  recurrent = [n for n in names if _RECURRENT.search(n)]
  if recurrent and (first_bad is not None or (growth or 0) > 0.05 or
                    (depth is not None and depth > 10)):
    causes.append(
        f"recurrence: recurrent weights ({', '.join(recurrent[:3])}) multiply "
        "gradients through time; clip the global norm, shorten BPTT, or use a "
        "gated cell (LSTM/GRU)")

  lines = [f"Gradient diagnosis over {steps} steps ({norm_key}):"]
  if first_bad is not None:
    shown = ", ".join(bad_layers[:4]) + (
        f" and {len(bad_layers) - 4} more" if len(bad_layers) > 4 else "")
    where = f" in {shown}" if bad_layers else ""
    lines.append(f"- first non-finite gradient at step {first_bad}{where}")
  else:
    lines.append("- no non-finite gradient")
  if growth is not None:
    lines.append(f"- norm growth: x{np.exp(growth):.3f} per step over the last "
                 f"{min(len(healthy), 50)} healthy steps")
  if depth is not None:
    lines.append(f"- depth profile: ||{weights[0]}|| / ||{weights[-1]}|| = "
                 f"{depth:.3g} (median over healthy steps)")
  if suggested is not None:
    lines.append(f"- suggested clip: gt.clip_by_global_norm({suggested:.3g}) "
                 "(90th percentile of healthy norms), or gt.zclip()")
  lines += [f"- likely cause: {c}" for c in causes] or [
      "- no explosion pattern found"]
  return Diagnosis(steps, first_bad, bad_layers, growth, doubling, depth,
                   weights[0] if weights else None,
                   weights[-1] if weights else None,
                   suggested, causes, "\n".join(lines))
