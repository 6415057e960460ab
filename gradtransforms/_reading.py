"""Reading figures: ``metrics(opt_state)``, ``leaf_names`` and ``culprits``.

:func:`metrics` walks any optimizer state (chained, nested, injected,
multi-stepped, partitioned, or held by a Flax ``nnx.Optimizer``), finds the
registered gradtransforms states (see ``_registry``) and returns their
figures flat, ``{"<name>/<figure>": array}``. Per-leaf figures are stored as
stacked vectors (``_layout.PerLeaf``) and unstacked here, by leaf name, only
when asked (``per_leaf=True``). Keys depend only on the optimizer's
structure; a transform that appears twice gets its position
(``"clip_by_global_norm@0/norm"``, ``"clip_by_global_norm@2.1/norm"``).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.tree_util import GetAttrKey

from gradtransforms import _layout
from gradtransforms._registry import info, lookup

# Path entries that only say "the wrapped optimizer's state": dropped from keys.
_WRAPPER_KEYS = {"inner_state", "inner_states", "inner_opt_state", "opt_state"}


def leaf_names(tree: Any, layer_axes: _layout.LayerAxes = None) -> list[str]:
  """Names of a tree's leaves in ``jax.tree.leaves`` order (``"layer1/w"``);
  with ``layer_axes``, one name per layer slice (``"blocks/w[3]"``)."""
  return list(_layout.layout(tree, layer_axes).names)


def _key(k: Any) -> str:
  return _layout.keystr((k,), simple=True, separator="/")


def _find(tree: Any, prefix: tuple) -> Iterator[tuple[tuple, Any]]:
  """Yields (path, state) for registered states, wrappers' inner ones too."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: lookup(type(x)) is not None)
  for path, state in flat:
    reg = lookup(type(state))
    if reg is None:
      continue
    yield prefix + path, state
    for field in state._fields:
      if field not in reg.figures:
        yield from _find(getattr(state, field), prefix + path + (GetAttrKey(field),))


def _root(opt_state: Any) -> Any:
  if hasattr(opt_state, "opt_state") and hasattr(opt_state, "model"):
    opt_state = opt_state.opt_state  # an nnx.Optimizer
  return _layout.unwrap(opt_state)


def _injected(tree: Any) -> dict[int, dict[str, Any]]:
  """``id(state) -> hyperparameters`` for registered states built by
  ``optax.inject_hyperparams`` (their current, possibly scheduled, values)."""
  is_inj = lambda x: (isinstance(x, tuple) and hasattr(x, "hyperparams") and
                      hasattr(x, "inner_state"))  # optax's inject states
  return {id(x.inner_state): dict(x.hyperparams)
          for x in jax.tree.leaves(tree, is_leaf=is_inj)
          if is_inj(x) and lookup(type(x.inner_state)) is not None}


def states(opt_state: Any) -> list[tuple[str, Any]]:
  """``(key prefix, state)`` for every registered state in ``opt_state``."""
  return _states(_root(opt_state))


def _states(tree: Any) -> list[tuple[str, Any]]:
  found = list(_find(tree, ()))
  names = [info(type(s)).name for _, s in found]
  out = []
  for (path, state), name in zip(found, names):
    if names.count(name) > 1:
      where = ".".join(_key(k) for k in path if _key(k) not in _WRAPPER_KEYS)
      name = f"{name}@{where}"
    out.append((name, state))
  return out


def _host(values: Any) -> Any:
  """A concrete array as NumPy (one transfer for all its entries)."""
  return values if isinstance(values, jax.core.Tracer) else np.asarray(values)


def metrics(opt_state: Any, per_leaf: bool = False) -> dict[str, Any]:
  """Flat ``{name: array}`` of the figures of every gradtransforms state.

  Args:
    opt_state: an optimizer state (any nesting of tuples, dicts and optax
      wrapper states), or a Flax ``nnx.Optimizer``.
    per_leaf: also give each per-leaf figure, one key per leaf (or layer
      slice), ``"<transform>/<figure>/<leaf path>"``.

  Returns:
    A dict sorted by key, except that one figure's per-leaf entries come
    in the state's segment order (leaf order of the params, layer slices
    ``[i]`` by index), the order ``culprit`` indices count in. Scalars are arrays (this also works inside
    ``jit``); per-leaf entries read on the host are NumPy scalars. A
    transform built by ``optax.inject_hyperparams`` also reports its
    hyperparameters' current values (``"clip_by_global_norm/max_norm"``).

  Raises:
    ValueError: ``opt_state`` holds no gradtransforms state.
  """
  if not isinstance(per_leaf, bool):
    raise TypeError(f"per_leaf must be a bool, got {per_leaf!r}")
  tree = _root(opt_state)
  found, injected = _states(tree), _injected(tree)
  if not found:
    raise ValueError("metrics: no gradtransforms state found in opt_state "
                     f"(type {type(opt_state).__name__}); pass the state of an "
                     "optimizer built with gradtransforms transforms")
  out: dict[tuple[str, int], tuple[str, Any]] = {}
  for name, state in found:
    for fig in info(type(state)).figures:
      value = getattr(state, fig)
      if isinstance(value, _layout.PerLeaf):
        if per_leaf:
          v = _host(value.values)
          for i, leaf in enumerate(value.names):
            out[(f"{name}/{fig}/", i)] = (f"{name}/{fig}/{leaf}", v[i])
      else:
        out[(f"{name}/{fig}", -1)] = (f"{name}/{fig}", value)
    for hp, value in injected.get(id(state), {}).items():
      # an injected hyperparameter
      out.setdefault((f"{name}/{hp}", -1), (f"{name}/{hp}", value))
  return dict(v for _, v in sorted(out.items()))


def _segment_names(state: Any) -> tuple[str, ...]:
  for field in state._fields:
    v = getattr(state, field)
    if isinstance(v, _layout.PerLeaf):
      return v.names
  return ()


def culprits(opt_state: Any, params: Any = None) -> dict[str, Any]:
  """Host-side names for the layer attribution of every detector in a state.

  Returns ``{"<key>/culprit": leaf name or None, "<key>/culprit_step": int,
  "<key>/first_nonfinite_leaf": name or None, "<key>/first_nonfinite_step":
  int}`` for each state with those roles (``detect_spikes``, also inside
  ``guard``). Names come from the state itself (``"blocks/w[3]"`` for a
  layer slice). ``params``, if given, is checked against them.
  """
  out: dict[str, Any] = {}
  for name, state in states(opt_state):
    roles = info(type(state)).roles
    if "culprit" not in roles:
      continue
    seg = _segment_names(state)
    if params is not None:
      base = sorted({s.rsplit("[", 1)[0] if s.endswith("]") else s for s in seg})
      if base != sorted(leaf_names(params)):
        raise ValueError(
            f"culprits: params has {len(leaf_names(params))} leaves that do not "
            f"match the {len(base)} leaves the optimizer state was built for")
    for role in ("culprit", "first_nonfinite_leaf"):
      i = int(np.asarray(getattr(state, roles[role])))
      out[f"{name}/{roles[role]}"] = seg[i] if 0 <= i < len(seg) else None
    for role in ("culprit_step", "first_nonfinite_step"):
      out[f"{name}/{roles[role]}"] = int(np.asarray(getattr(state, roles[role])))
  return out
