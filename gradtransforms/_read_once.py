"""Old scalars of a state read once, on GPU (:func:`read_once`).

XLA:GPU writes a donated scalar in place; where several kernels read its old
value and others write the new one, it first copies the old value (a kernel
per scalar). Read once as one packed vector, the old values have a single
reader before every writer: one kernel for all of them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _packable(x: Any) -> bool:
  """A bool, integer or real float scalar: its bits travel as an unsigned
  integer (not a PRNG key, whose dtype is extended, nor a complex one)."""
  dt = jnp.result_type(x)
  if jax.dtypes.issubdtype(dt, jax.dtypes.extended):
    return False
  return dt == jnp.bool_ or jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(
      dt, jnp.floating)


def _width(x: Any, bool_bytes: int = 1) -> Any:
  """A scalar's stacking key in :func:`read_once`: ``("bits", bytes)`` (a
  bool's: ``bool_bytes``) where its bits travel as the unsigned integer of
  that width (``_to_bits``); else ``("dtype", dtype)``, stacked as it is."""
  if not _packable(x):
    return ("dtype", jnp.result_type(x))
  if jnp.result_type(x) == jnp.bool_:
    return ("bits", bool_bytes)
  return ("bits", jnp.dtype(jnp.result_type(x)).itemsize)


def _to_bits(x: jax.Array, key: Any) -> jax.Array:
  if key[0] != "bits":
    return x
  if jnp.result_type(x) == jnp.bool_:
    return x.astype(_UINT[key[1]])
  return lax.bitcast_convert_type(x, _UINT[key[1]])


def _from_bits(b: jax.Array, like: jax.Array) -> jax.Array:
  if not _packable(like):
    return b
  dt = jnp.result_type(like)
  if dt == jnp.bool_:
    return b.astype(jnp.bool_)
  return lax.bitcast_convert_type(b, dt)


def read_once(state: Any, bools_as_words: bool = False) -> tuple[Any, Any]:
  """``(state', restore)``: on GPU the scalar leaves of ``state`` read
  once, as one stacked vector per width (their bits: float32 and int32
  scalars in one ``uint32`` vector, a kernel; one per dtype was a kernel
  each, monitor 6 leaves of 4 layers on an H100: 19 -> 18), behind a
  barrier, and
  ``restore(new)`` puts the original leaf back wherever ``new`` passes a
  scalar of ``state'`` on unchanged. ``bools_as_words``: the bools go
  into the 4-byte vector too, a vector less (H100, 6 leaves of 4 layers:
  detect_spikes 16 -> 15 kernels, guard 23 -> 22); apart by default, since
  for rewind's own scalars that stopped XLA:GPU fusing its per-leaf
  updates horizontally (100 leaves: 128 -> 217 kernels; 24 layers 25 ->
  29). monitor: the same either way.

  XLA:GPU writes a donated scalar in place; where several kernels read the
  old value and others write the new ones it copies the old scalars first
  (a kernel each; ``guard``: ~15). Read once, the old values have one
  reader, before every writer. On CPU and TPU (where the stacking costs
  more kernels than it saves) ``state`` is returned as it is. Weakly typed
  scalars are never packed (see below)."""
  leaves, tree = jax.tree.flatten(state)
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    # a weakly typed scalar stays out: the switch that platform_dependent
    # lowers to joins its branches' types, so it would come back strongly
    # typed on every platform (a bfloat16 update times it: float32)
    if jnp.ndim(x) == 0 and not getattr(jax.typeof(x), "weak_type", False):
      groups.setdefault(_width(x, 4 if bools_as_words else 1), []).append(i)
  idx = [i for g in groups.values() if len(g) > 1 for i in g]
  if not idx:
    return state, lambda new: new

  def stacked(*xs):
    by = {}
    for i, x in zip(idx, xs):
      by.setdefault(_width(x, 4 if bools_as_words else 1), []).append((i, x))
    out = {}
    for key, group in by.items():
      as_u = [_to_bits(x, key) for _, x in group]
      v = lax.optimization_barrier(jnp.stack(as_u))
      out.update({i: _from_bits(v[k], x) for k, (i, x) in enumerate(group)})
    return tuple(out[i] for i in idx)
  read = lax.platform_dependent(*[leaves[i] for i in idx], cuda=stacked,
                                rocm=stacked, default=lambda *xs: xs)
  new_leaves = list(leaves)
  back = {}
  for i, r in zip(idx, read):
    new_leaves[i] = r
    back[id(r)] = leaves[i]

  def restore(new: Any) -> Any:
    return jax.tree.map(lambda x: back.get(id(x), x), new)
  return jax.tree.unflatten(tree, new_leaves), restore


def reads_once(update_fn: Callable) -> Callable:
  """``update_fn(updates, state, *args, **kw)`` whose ``state`` scalars are
  read once (:func:`read_once`) and passed on unchanged where the new state
  keeps them. H100, 6 leaves of 24 layers: zclip 25 -> 20 kernels."""
  @functools.wraps(update_fn)
  def update(updates, state, *args, **kw):
    state, restore = read_once(state)
    out, new_state = update_fn(updates, state, *args, **kw)
    return out, restore(new_state)
  return update
