"""Step 1 of ``diagnose``: read the series.

A history (per-step ``gt.metrics`` dicts, or a dict of per-step sequences)
becomes one float64 series per key; the registry's roles say which keys
hold the global norm, the per-leaf norms and the update ratios, whatever
the transforms are called. :class:`Series` is everything the later steps
read: the norm, the loss, the first non-finite step, the per-leaf norms and
the layers in depth order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from gradtransforms import _registry

_PREFERRED = ("monitor", "detect_spikes")  # pure observers first
_WEIGHT = re.compile(r"(kernel|weight|(^|/)w[^/]*)$")
# Read-out layers sort last in the depth order, whatever their name's rank.
_READOUT = re.compile(r"(^|/)(out|output|head|readout|lm_head|classifier|"
                      r"logits)(/|$)", re.I)


def natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def depth_key(s: str):
  """Depth order: natural order of the names, read-out layers last."""
  return (bool(_READOUT.search(s)), natural(s))


def role_keys(role: str, keys: Sequence[str], per_leaf: bool = False
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


def series(history: Any) -> dict[str, np.ndarray]:
  """One float64 series per key of the history."""
  if isinstance(history, Mapping):
    return {k: np.asarray(v, np.float64).reshape(len(v), -1)[:, 0]
            for k, v in history.items() if np.ndim(v) >= 1}
  rows: Sequence[Mapping] = list(history)
  keys = sorted({k for r in rows for k in r})
  return {k: np.asarray([float(np.asarray(r.get(k, np.nan)).reshape(-1)[0])
                         if np.size(r.get(k, np.nan)) else np.nan for r in rows])
          for k in keys}


def from_dashboard(s: dict[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Rows of ``gt.dashboard`` read like ``gt.metrics`` rows: a guard's own
  detector figures (``guard/norm``) go back under the detector's
  registered name (``detect_spikes@guard/norm``) so the roles find them.
  Returns the series and ``{new key: the key as logged}``."""
  guards = {n for n, _ in _registry.with_role("skip")}
  detectors = [_registry.by_name(n) for n, _ in _registry.with_role("culprit")]
  out, shown = {}, {}
  for k, v in s.items():
    head, _, fig = k.partition("/")
    own = _registry.by_name(head.split("@")[0])
    det = next((d for d in detectors if d is not None and fig in d.figures),
               None)
    if (head.split("@")[0] in guards and own is not None and det is not None
        and fig not in own.figures):
      shown[f"{det.name}@{head}/{fig}"] = k
      k = f"{det.name}@{head}/{fig}"
    out[k] = v
  return out, shown


def per_leaf(s: Mapping[str, np.ndarray], role: str) -> dict[str, np.ndarray]:
  """Leaf name -> series of the first transform (observers first) that
  records ``role`` per leaf."""
  out: dict[str, np.ndarray] = {}
  for k in role_keys(role, list(s), per_leaf=True):
    out.setdefault(k.split("/", 2)[2], s[k])
  return out


_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


def layer_key(s: str):
  """Depth order of a segment name: layers not on a layer axis first (in
  natural order: ``layers/2`` before ``layers/10``), then the slices of
  stacked layers by their index ``[i]`` (every leaf of layer 0, then of
  layer 1, ...), read-out layers last (a slice of a stack is never the
  read-out: ``blocks/attn/out/kernel[0]`` is in block 0)."""
  m = _INDEX.match(s)
  base, i = (m.group(1), int(m.group(2))) if m else (s, -1)
  return (i < 0 and bool(_READOUT.search(base)), i, natural(base))


def depth_order(names: Sequence[str]) -> list[str]:
  """The weight leaves of ``names`` (every name if none is a weight) in
  depth order; a layer slice ``"blocks/w[3]"`` is a weight if its leaf is."""
  bare = lambda n: _INDEX.sub(r"\1", n)
  if any(_INDEX.match(n) for n in names):
    return sorted([n for n in names if _WEIGHT.search(bare(n))]
                  or list(names), key=layer_key)
  return sorted([n for n in names if _WEIGHT.search(n)] or list(names),
                key=depth_key)


def always_zero(leaves: Mapping[str, np.ndarray]) -> list[str]:
  """Leaves whose recorded norm is zero on every step with a finite one:
  zero by construction (a key bias under softmax attention, an unused
  parameter), not layers that stopped learning."""
  out = []
  for n, v in leaves.items():
    ok = np.isfinite(v)
    if ok.any() and not np.any(v[ok] != 0):
      out.append(n)
  return out


def segment_names(history: Any, head: str) -> list[str]:
  """The segment names of ``head``'s per-leaf figures in the order the
  history holds them (``gt.metrics`` writes them in the state's segment
  order, the order a ``culprit`` index counts in)."""
  keys = history.keys() if isinstance(history, Mapping) else (
      dict.fromkeys(k for r in history for k in r))
  by_fig: dict[str, list[str]] = {}
  for k in keys:
    h, _, rest = k.partition("/")
    fig, sep, leaf = rest.partition("/")
    if h == head and sep:
      by_fig.setdefault(fig, []).append(leaf)
  return next(iter(by_fig.values()), [])


def depth_profile(history: Any) -> tuple[list[str], np.ndarray]:
  """The recorded per-layer gradient norms in depth order.

  Returns ``(layers, norms)``: the weight leaves (``kernel``, ``weight``,
  ``w*``; every leaf if none is named so) from input to output, read-out
  layers (``out``, ``head``, ...) last, slices of stacked layers by their
  index (:func:`layer_key`), leaves zero on every step left out, and a ``(steps, layers)`` array of
  their norms (role ``leaf_norm``, from ``gt.monitor(per_leaf=True)``).
  Empty when no per-leaf norm was recorded.
  """
  s = series(history)
  leaves = per_leaf(s, "leaf_norm")
  zero = set(always_zero(leaves))
  weights = depth_order([n for n in sorted(leaves, key=natural)
                         if n not in zero])
  steps = len(next(iter(s.values()))) if s else 0
  if not weights:
    return [], np.zeros((steps, 0))
  return weights, np.stack([leaves[n] for n in weights], axis=1)


@dataclasses.dataclass
class Series:
  """A history as the later steps read it. ``end``: the first non-finite
  step (or ``steps``); ``healthy``: the finite, positive norms before it;
  ``leaves``/``ratios``: per-leaf norms / update ratios by leaf name;
  ``names``: the leaves with norms, natural order; ``weights``: the layers
  in depth order; ``bad_layers``: leaves non-finite at ``first_bad``;
  ``zero_leaves``: leaves zero on every step, left out of ``weights``;
  ``first_step``: the optimizer's 0-based step index of the first row
  (read from a recorded ``step`` counter; 0 without one): every step the
  report names is ``first_step + row``, the convention of ``gt.culprits``
  and the dashboard's culprit keys."""
  s: dict[str, np.ndarray]
  norm_key: str
  norm: np.ndarray
  steps: int
  loss: np.ndarray | None
  first_bad: int | None
  end: int
  healthy: np.ndarray
  leaves: dict[str, np.ndarray]
  names: list[str]
  ratios: dict[str, np.ndarray]
  weights: list[str]
  bad_layers: list[str]
  zero_leaves: list[str] = dataclasses.field(default_factory=list)
  first_step: int = 0  # the optimizer's index of the first row


def first_step(s: Mapping[str, np.ndarray], norm_key: str) -> int:
  """The 0-based index of the first row's step, from a ``step`` counter
  (update calls so far) that rises by one each row; 0 if none does."""
  head = norm_key.partition("/")[0]
  for k in [f"{head}/step"] + sorted(k for k in s if k.endswith("/step")):
    v = s.get(k)
    if (v is not None and len(v) and np.all(np.isfinite(v))
        and np.all(np.diff(v) == 1) and v[0] >= 1):
      return int(v[0]) - 1
  return 0


def read(history: Any, loss: Sequence[float] | None = None) -> Series:
  """Step 1: the history's series, or a ValueError saying what is missing."""
  if (not len(list(history)) if not isinstance(history, Mapping) else
      any(np.ndim(v) >= 1 and len(v) == 0 for v in history.values())):
    raise ValueError("diagnose: history is empty (no steps recorded); record "
                     "gt.metrics(state, per_leaf=True) once per step")
  s, shown = from_dashboard(series(history))
  norm_keys = role_keys("global_norm", list(s))
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
  leaves = per_leaf(s, "leaf_norm")
  names = sorted(leaves, key=natural)
  bad_layers = ([n for n in names if not np.isfinite(leaves[n][first_bad])]
                if first_bad is not None else [])
  end = first_bad if first_bad is not None else steps
  healthy = norm[:end][np.isfinite(norm[:end]) & (norm[:end] > 0)]
  ratios = per_leaf(s, "update_ratio")
  zero = always_zero(leaves)
  weights = depth_order([n for n in names if n not in zero]
                        or sorted(ratios, key=natural))  # ratios alone
  return Series(s, shown.get(norm_key, norm_key), norm, steps, loss_arr,
                first_bad, end, healthy, leaves, names, ratios, weights,
                bad_layers, zero, first_step(s, norm_key))
