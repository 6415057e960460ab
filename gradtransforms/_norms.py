"""Norms and scales: the one place where their precision and non-finite
handling are decided.

Every transform computes its norms and clip scales through this module (the
sums of squares under them: :mod:`gradtransforms._sums`, re-exported here):

* Squared norms accumulate in float32 (float64 stays float64), whatever the
  leaf dtype, so float16/bfloat16 leaves never overflow while squaring.
* One read of the tree gives both the per-leaf and the global norm.
* An Inf or NaN entry makes that leaf's norm (and the global norm) non-finite:
  ``isfinite(norm)`` is therefore a free non-finite check. A norm beyond the
  float32 range (about 1.8e19) also reads as Inf and is treated the same way:
  such a gradient has exploded. (A max-scaled recomputation behind a
  ``lax.cond`` would rescue it, but measured 4-5% of an Adam step on CPU for
  every step; a guard skipping the step is the better remedy.)
* Scales are computed once per tree or per leaf and multiplied in, never
  divided elementwise.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from gradtransforms import _layout, _sums, _xla
from gradtransforms._sums import (  # noqa: F401 (re-exported)
    acc_dtype, leaf_sumsq, stacked_sums, sums, sumsq, total)

F32 = jnp.float32


def global_norm(tree: Any, axis_name: str | None = None) -> jax.Array:
  """Float32 global L2 norm of a pytree: one read, Inf beyond ~1.8e19.

  With ``axis_name`` (inside ``shard_map``/``pmap``) the leaves are taken as
  shards of larger arrays and the sums of squares are ``psum``-ed over that
  axis, so every device gets the same, global, norm.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), F32)
  lay = _layout.Layout((None,) * len(leaves), (1,) * len(leaves), ())
  return jnp.sqrt(sums(leaves, lay, axis_name).total)


def max_abs(tree: Any) -> jax.Array:
  """Float32 ``max |u|`` over a tree (NaN if it holds a NaN; 0 if empty;
  integer leaves as float32), in the form each platform fuses best."""
  leaves = [u if jnp.issubdtype(u.dtype, jnp.floating) else u.astype(F32)
            for u in jax.tree.leaves(tree) if u.size]
  return lax.platform_dependent(leaves, cpu=_max_abs_per_leaf,
                                tpu=_max_abs_per_leaf, default=_max_abs_by_rows)


def _max_abs_per_leaf(leaves):
  """One reduction per leaf (CPU, TPU). On XLA:CPU ``max(u)`` and
  ``-min(u)`` are two passes: 1.38x an Adam step at 50M params in 100
  leaves, against 1.23x for ``max |u|`` (one paired run of both forms;
  the benchmark's own run of the old form read 1.35)."""
  return jnp.max(_xla.kept(jnp.stack(
      [jnp.max(jnp.abs(u)).astype(F32) for u in leaves] or [jnp.zeros(())])))


def _max_abs_by_rows(leaves):
  """GPU: each leaf reduced along its last axis only (XLA fuses that into
  the optimizer's pass over the leaf), then one reduction over every leaf's
  rows. Per leaf to a scalar costs two more kernels a leaf on an H100 (399
  vs optax.clip's 102 at 100 leaves). The barrier keeps XLA from splitting
  the last reduction back per leaf."""
  rows = [u.reshape(-1, u.shape[-1] if u.ndim else 1) for u in leaves]
  peaks = [jnp.max(jnp.abs(r), axis=1).astype(F32) for r in rows]
  return jnp.max(lax.optimization_barrier(
      jnp.concatenate(peaks or [jnp.zeros((1,))])))


def clip_scale(norm: jax.Array, max_norm: Any, eps: float = 0.0,
               times: jax.Array | None = None) -> jax.Array:
  """``max_norm / (norm + eps)`` where ``norm > max_norm``, else 1; with
  ``times`` (a float32 scalar), that scale times it, in the same one divide
  (``per_example_clip``'s weights: the mean's ``1 / n`` folded in; scaling
  the sum afterwards put a float32 sum between it and the optimizer,
  bfloat16 on a TPU v5e: 1.071x optax's bytes, and its clip count is read
  from the weights: from the mask, or with the weights a vector apart from
  the scale, each was a TPU kernel more).

  A non-finite ``norm`` gives 1: clipping never turns Inf into NaN and never
  computes 0/0; the non-finite values pass on for a guard to see.

  Written ``where(c, max_norm, 1) / where(c, norm + eps, 1)`` (the same
  numbers: ``1 / 1`` is 1): with the divide as its root the scale is one
  value that XLA:CPU computes once, where ``where(c, max_norm / ..., 1)``
  had the selects copied into every loop that reads the scale (Adam's mu,
  nu and update: a kernel and 14 HLO instructions more a leaf, compile time
  in proportion). In ``lax`` ops: called per leaf, ``jnp``'s are traced as
  inlined jits, several times slower to trace.
  """
  norm = jnp.asarray(norm, F32)
  max_norm = jnp.asarray(max_norm, F32)
  shape = jnp.broadcast_shapes(norm.shape, max_norm.shape)
  norm, max_norm = (x if x.shape == shape else jnp.broadcast_to(x, shape)
                    for x in (norm, max_norm))
  clip = lax.bitwise_and(lax.is_finite(norm), lax.gt(norm, max_norm))
  one = lax.full(shape, 1.0, F32)
  den = (norm if isinstance(eps, (int, float)) and eps == 0
         else lax.add(norm, lax.full(shape, eps, F32)))
  num, num_one = max_norm, one
  if times is not None:
    t = lax.broadcast_in_dim(jnp.asarray(times, F32), shape, ())
    num, num_one = lax.mul(max_norm, t), t
  return lax.div(lax.select(clip, num, num_one), lax.select(clip, den, one))


def scale(x: jax.Array, s: jax.Array) -> jax.Array:
  """``x * s`` computed in float32 or wider and cast back to ``x.dtype``."""
  return (x * s.astype(acc_dtype(x))).astype(x.dtype)


def scale_tree(tree: Any, s: Any) -> Any:
  """Multiplies every leaf by the scalar ``s`` (per-leaf scales:
  :func:`scale_parts`)."""
  s = jnp.asarray(s)
  return jax.tree.map(lambda x: scale(x, s), tree)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Elementwise ``where(pred, a, b)`` over two trees with a scalar pred."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def zeros_like_tree(tree: Any) -> Any:
  return jax.tree.map(jnp.zeros_like, tree)



def scale_parts(leaves: Sequence[jax.Array], lay: _layout.Layout,
                scales: Sequence[jax.Array]) -> list[jax.Array]:
  """Leaf ``i`` times its own scale (a scalar, or one per layer slice)."""
  one = _xla.per_leaf(_scale_along, ("axis",))
  return [one(x, s, axis=a) for x, s, a in zip(leaves, scales, lay.axes)]


def _scale_along(x: jax.Array, s: jax.Array, axis: int | None) -> jax.Array:
  return scale(x, _layout.broadcast(s, x, axis))


def leaf_scales(fn: Any, leaves: Sequence[jax.Array], lay: _layout.Layout,
                axis_name: str | None = None, sizes: Any = None
                ) -> tuple[list[jax.Array], jax.Array]:
  """``(scales, stacked)``: each leaf's scale(s) ``fn`` (elementwise) of its
  sum of squares (per layer slice), divided by ``sizes[i]`` where given
  (leaf ``i``'s elements per segment: a mean square), and those figures as
  one stacked vector. On GPU from the sums finished by shape group
  (:func:`_sums.grouped`), as one vector: ``fn`` on it, then a slice per
  leaf, which XLA fuses into the leaf's loop (and then fuses the leaves'
  loops horizontally: H100, clip_by_leaf_norm at 16 leaves 52 kernels ->
  22); elsewhere each leaf's own figure, inline (:func:`segment_scales`)."""
  def per_segment(v):
    if sizes is None:
      return v
    return v / _layout.stack([jnp.full((n,), sizes[i], F32)
                              for i, n in enumerate(lay.counts)])

  def gpu(*xs):
    st = per_segment(_sums.grouped(xs, lay.axes, sumsq, axis_name).stacked)
    return _layout.split(fn(st), lay), st

  def other(*xs):
    parts = leaf_sumsq(xs, lay, axis_name)
    st = per_segment(_layout.stack(parts))
    if sizes is not None:
      parts = [p / sizes[i] for i, p in enumerate(parts)]
    return segment_scales(fn, parts, st, lay), st
  return lax.platform_dependent(*leaves, cuda=gpu, rocm=gpu, default=other)


def segment_scales(fn: Any, parts: Sequence[jax.Array], stacked: jax.Array,
                   lay: _layout.Layout) -> list[jax.Array]:
  """Each leaf's scale(s), ``fn`` (elementwise) of its own figure
  ``parts[i]`` (a scalar, or ``(L,)`` per layer slice; ``stacked`` is
  ``_layout.stack(parts)``), for :func:`scale_parts`. The same numbers on
  every platform; the form depends on it.

  A leaf without a layer axis: ``fn(parts[i])`` inline (a scalar: on TPU
  it runs on the scalar unit, on GPU it fuses into the leaf's loop). A
  stacked leaf on GPU/TPU: :func:`scales_sliced`. On CPU
  :func:`scales_inline` for every leaf: a static slice bakes its index
  into each leaf's loops, making them distinct computations (6x4 stacked
  at 24 leaves: 0.4 s of compilation -> 2.2 s)."""
  fn = _xla.per_leaf(fn)
  if all(a is None for a in lay.axes):
    return [fn(p) for p in parts]
  return lax.platform_dependent(
      parts, stacked, cpu=lambda p, s: scales_inline(fn, p, s, lay),
      default=lambda p, s: scales_sliced(fn, p, s, lay))


def scales_inline(fn: Any, parts: Sequence[jax.Array], stacked: jax.Array,
                  lay: _layout.Layout) -> list[jax.Array]:
  del stacked, lay
  return [fn(p) for p in parts]


def scales_sliced(fn: Any, parts: Sequence[jax.Array], stacked: jax.Array,
                  lay: _layout.Layout) -> list[jax.Array]:
  """A stacked leaf's scales as its slice of ``fn(stacked)``: one kernel
  for every layer of every leaf, where inline each leaf's ``(L,)`` vector
  costs a kernel of its own (XLA does not fuse a scale's sqrt/divide into
  the leaf's loop, where they would run per element): H100 22 -> 17, TPU
  19 -> 15 kernels for clip_by_leaf_norm at 6x4 stacked."""
  return [fn(p) if a is None else s for p, s, a in
          zip(parts, _layout.split(fn(stacked), lay), lay.axes)]
