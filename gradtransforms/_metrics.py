"""``metrics(opt_state)``: every figure a gradtransforms state keeps, flat.

Each state class of the package registers a readable name and the fields that
are figures (``@register("clip_by_global_norm", ("norm", "scale"))``).
:func:`metrics` walks any optimizer state (chained, nested, injected,
multi-stepped, partitioned, or held by a Flax ``nnx.Optimizer``), finds the
registered states and returns ``{"<name>/<field>": array}``. Per-leaf figures
get the leaf's tree path appended (``"clip_by_leaf_norm/norm/layer1/w"``).
Keys are stable: they depend only on the optimizer's structure. If the same
transform appears twice, its keys carry the state's position, e.g.
``"clip_by_global_norm@0/norm"`` and ``"clip_by_global_norm@2.1/norm"``.

The values are arrays (no host transfer), so ``metrics`` also works inside
``jit``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}
# Path entries that only say "the wrapped optimizer's state": dropped from keys.
_WRAPPER_KEYS = {"inner_state", "inner_states", "inner_opt_state", "opt_state"}


def register(name: str, fields: tuple[str, ...]) -> Callable[[type], type]:
  """Class decorator: the state's figures appear in :func:`metrics` as name/field."""
  def deco(cls: type) -> type:
    _REGISTRY[cls] = (name, tuple(fields))
    return cls
  return deco


def _key_str(k: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple, separator: str = "/") -> str:
  """A tree path as ``"a/0/b"``."""
  return separator.join(_key_str(k) for k in path)


def leaf_names(tree: Any) -> list[str]:
  """Names of a tree's leaves, in ``jax.tree.leaves`` order (``"layer1/w"``)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(_unwrap(tree))
  return [path_str(p) or "." for p, _ in flat]


def _is_variable(x: Any) -> bool:
  return type(x).__module__.startswith("flax") and hasattr(x, "get_value")


def _unwrap(tree: Any) -> Any:
  """Replaces Flax NNX variables by the arrays they hold."""
  return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree,
                      is_leaf=_is_variable)


def _find(tree: Any, prefix: tuple):
  """Yields (path, state) for registered states, wrappers' inner ones too."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: type(x) in _REGISTRY)
  for path, state in flat:
    if type(state) not in _REGISTRY:
      continue
    yield prefix + path, state
    figures = _REGISTRY[type(state)][1]
    for field in state._fields:
      if field not in figures:
        yield from _find(getattr(state, field),
                         prefix + path + (jax.tree_util.GetAttrKey(field),))


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Flat ``{name: array}`` of every figure in any gradtransforms state.

  Args:
    opt_state: an optimizer state (any nesting of tuples, dicts and optax
      wrapper states), or a Flax ``nnx.Optimizer``.

  Returns:
    A dict with keys ``"<transform>/<field>"`` (plus ``"/<leaf path>"`` for
    per-leaf figures), sorted by key.
  """
  if hasattr(opt_state, "opt_state") and hasattr(opt_state, "model"):
    opt_state = opt_state.opt_state  # an nnx.Optimizer
  opt_state = _unwrap(opt_state)
  found = list(_find(opt_state, ()))
  names = [_REGISTRY[type(s)][0] for _, s in found]
  out: dict[str, jax.Array] = {}
  for (path, state), name in zip(found, names):
    if names.count(name) > 1:
      where = ".".join(_key_str(k) for k in path
                       if _key_str(k) not in _WRAPPER_KEYS)
      name = f"{name}@{where}"
    for field in _REGISTRY[type(state)][1]:
      value = getattr(state, field)
      leaves, _ = jax.tree_util.tree_flatten_with_path(value)
      if len(leaves) == 1 and not leaves[0][0]:
        out[f"{name}/{field}"] = leaves[0][1]
      else:
        for p, leaf in leaves:
          out[f"{name}/{field}/{path_str(p)}"] = leaf
  return dict(sorted(out.items()))
