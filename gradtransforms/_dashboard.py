"""``dashboard(opt_state)``: the figures of one step as a dashboard takes them.

``gt.metrics`` is the raw reader: arrays, ``jit``-friendly, one key per
registered field, named after the state class that holds it (a guard's
detector reports as ``detect_spikes/...``), culprits as segment indices
with ``-1`` for "none". That is right for code and for ``gt.diagnose``, and
wrong for a plot. :func:`dashboard` is its host-side presentation, one call
per logged step:

- every value a Python ``float`` (bools 0/1);
- a guard's own detector under the guard's name (``guard/norm``,
  ``guard/norm_zscore``), not ``detect_spikes/`` (the user never built one);
- culprits as names in the key, with the step as the value:
  ``"guard/culprit/blocks/mlp_in/kernel[2]": 60.0`` (absent until there is
  one: no ``-1`` sentinel, no index to look up); likewise
  ``".../first_nonfinite/<leaf>"``; per-leaf sentinel entries (``-1``:
  "never") left out;
- every figure describes this step: on a step the guard flagged (or a
  ``gt.rewind`` took back), the figures of the transforms inside it are
  left out (the guard rolled their
  state back or fed them a zero gradient, so they describe the last applied
  step: a clip's norm would read the previous step's 0.6 while the real
  norm was 40); the guard's own ``norm`` is the step's;
- no duplicates: the global norm of a transform first in the guard's chain
  is the guard's norm on every applied step, so it is given once, as
  ``guard/norm``.

With ``per_leaf=True`` it adds the recorded per-layer figures (per-layer
norms where a transform records them: ``monitor/leaf_norm/<leaf>`` from
``gt.monitor(per_leaf=True)``, ``clip_by_leaf_norm/norm/<leaf>``), and for
a detector its running typical per-layer norm
(``guard/typical_leaf_norm/<leaf>``, ``exp`` of the running mean of
``log ||g_i||``; the detector keeps no per-step per-layer norm).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.tree_util import GetAttrKey, SequenceKey

from gradtransforms import _layout, _reading
from gradtransforms._registry import info

# Detector figures that are statistics, not figures of a step: shown as the
# typical per-layer norm (where observed), or left out.
_TYPICAL = ("leaf_log_mean", "leaf_observed")
_INDEX_ROLES = (("culprit", "culprit_step", "culprit"),
                ("first_nonfinite_leaf", "first_nonfinite_step",
                 "first_nonfinite"))


def _float(v: Any) -> float:
  return float(np.asarray(v).reshape(-1)[0])


def _first_in(rel: tuple) -> bool:
  """A path inside a guard's inner state that leads to the first transform
  of its chain (first elements of tuples, wrappers' inner states)."""
  return all((isinstance(k, SequenceKey) and k.idx == 0) or
             (isinstance(k, GetAttrKey) and k.name in _reading._WRAPPER_KEYS)
             for k in rel)


def _flag(state: Any) -> bool | None:
  """A wrapper's "this step was taken back" flag (role ``skip``: a guard;
  ``rewind``: a rewind); None for a state that is no such wrapper."""
  roles = info(type(state)).roles
  for role in ("skip", "rewind"):
    if role in roles:
      return bool(np.asarray(getattr(state, roles[role])))
  return None


def _state_figures(name: str, state: Any, per_leaf: bool,
                   skip_roles: tuple[str, ...] = ()) -> dict[str, float]:
  """One state's figures as floats, culprit indices resolved to names."""
  reg = info(type(state))
  segs = next((getattr(state, f).names for f in state._fields
               if isinstance(getattr(state, f), _layout.PerLeaf)), ())
  index_figs = set()
  out: dict[str, float] = {}
  for role, step_role, label in _INDEX_ROLES:
    if role in reg.roles and step_role in reg.roles:
      index_figs |= {reg.roles[role], reg.roles[step_role]}
      i = int(np.asarray(getattr(state, reg.roles[role])))
      if 0 <= i < len(segs):
        out[f"{name}/{label}/{segs[i]}"] = _float(
            getattr(state, reg.roles[step_role]))
  skip_figs = {reg.roles[r] for r in skip_roles if r in reg.roles}
  if "clip_peak" in reg.roles and np.isnan(
      np.asarray(getattr(state, reg.roles["clip_peak"]))):
    # not recorded (clip_by_value without record_peak): its peak and its
    # always-False "clipped" say nothing
    skip_figs |= {reg.roles[r] for r in ("clip_peak", "clipped")
                  if r in reg.roles}
  for fig in reg.figures:
    if fig in index_figs or fig in skip_figs:
      continue
    value = getattr(state, fig)
    if not isinstance(value, _layout.PerLeaf):
      out[f"{name}/{fig}"] = _float(value)
    elif per_leaf:
      out.update(_leaf_figures(name, fig, value))
  if per_leaf and all(hasattr(state, f) for f in _TYPICAL):
    mean, seen = (np.asarray(getattr(state, f).values) for f in _TYPICAL)
    for seg, m, n in zip(getattr(state, _TYPICAL[0]).names, mean, seen):
      if n > 0:
        out[f"{name}/typical_leaf_norm/{seg}"] = float(np.exp(m))
  return out


def _leaf_figures(name: str, fig: str, value: Any) -> dict[str, float]:
  if fig in _TYPICAL:
    return {}
  v = np.asarray(value.values)
  sentinel = np.issubdtype(v.dtype, np.integer)  # -1: "never"
  return {f"{name}/{fig}/{seg}": float(x) for seg, x in zip(value.names, v)
          if not (sentinel and x < 0)}


def dashboard(opt_state: Any, per_leaf: bool = False) -> dict[str, float]:
  """The figures of the last step as ``{name: float}``, for a dashboard.

  Call it on the host once per logged step (``wandb.log(gt.dashboard(opt),
  step=step)``); inside ``jit`` use :func:`gradtransforms.metrics`. Names
  are ``gt.metrics``' with these differences: a guard's detector figures
  are the guard's (``guard/norm``, not ``detect_spikes/norm``), culprits
  are keys naming the layer (``guard/culprit/<leaf>: step``, absent until
  one is blamed), sentinel values are left out, a transform's figures are
  left out on a step the guard around it flagged (they would describe the
  last applied step), and the norm of the transform first in a guard's
  chain is given once, as the guard's.

  Args:
    opt_state: an optimizer state or a Flax ``nnx.Optimizer``, as for
      ``gt.metrics``. No params are needed: leaf names come from the state.
    per_leaf: also the recorded per-leaf (per layer slice) figures.

  Returns:
    A dict of Python floats, sorted by key.

  Raises:
    ValueError: ``opt_state`` holds no gradtransforms state.
  """
  if not isinstance(per_leaf, bool):
    raise TypeError(f"per_leaf must be a bool, got {per_leaf!r}")
  tree = _reading._root(opt_state)
  found = list(_reading._find(tree, ()))
  if not found:
    raise ValueError("dashboard: no gradtransforms state found in opt_state "
                     f"(type {type(opt_state).__name__}); pass the state of an "
                     "optimizer built with gradtransforms transforms")
  names = [n for n, _ in _reading._states(tree)]
  injected = _reading._injected(tree)
  hps = [injected.get(id(s), {}) for _, s in found]
  found, hps = jax.device_get((found, hps))  # one transfer
  guards = [(p, n, s) for (p, s), n in zip(found, names)
            if _flag(s) is not None]
  out: dict[str, float] = {}
  for (path, state), name, hp_of in zip(found, names, hps):
    owners = [(gp, gn, gs) for gp, gn, gs in guards
              if len(path) > len(gp) and path[:len(gp)] == gp]
    if any(_flag(gs) for gp, _, gs in owners[:-1]):
      continue  # an outer wrapper (a rewind) took this step back
    owner = owners[-1] if owners else None
    skip_roles: tuple[str, ...] = ()
    if owner is not None:
      gp, gn, gs = owner
      rel = path[len(gp):]
      if len(rel) == 1:  # the guard's own detector: the guard's figures
        for k, v in _state_figures(gn, state, per_leaf).items():
          out.setdefault(k, v)
        continue
      if _flag(gs):
        continue  # rolled back: it describes the last applied step
      if _first_in(rel[1:]):
        skip_roles = ("global_norm",)  # the guard's norm, given once
    out.update(_state_figures(name, state, per_leaf, skip_roles))
    for hp, value in hp_of.items():  # an injected hyperparameter's value
      out.setdefault(f"{name}/{hp}", _float(value))
  return dict(sorted(out.items()))
