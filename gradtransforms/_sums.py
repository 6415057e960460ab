"""Per-leaf sums of squares: in float32 (float64 stays float64), one read
of the leaves, per leaf or per layer slice (:func:`leaf_sumsq`), stacked and
totalled (:func:`sums`); on GPU in the form XLA:GPU runs in the fewest
kernels (:func:`grouped`).

XLA:GPU fuses a leaf's sum of squares into the optimizer's pass over it as
row partials, then finishes them in a kernel of its own: a reduction's
output cannot feed another reduction in the same kernel, so a sum costs two
kernels a leaf (Adam alone: one). :func:`grouped` takes each leaf's row
partials explicitly (:func:`row_view`) and finishes all of one shape
together, stacked, by one reduction: Adam + a recorded norm at 100 leaves
on an H100, 205 kernels -> 105 (Adam: 102).

Barriers keep XLA from undoing it: behind the first, the partials are not
merged back into one reduction of the gradients (a second read of them);
behind the second, the finished sums are not split into a reduction per
leaf again (``sum(concatenate(...))`` is rewritten as the sum of each
piece's sum).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradtransforms import _collectives, _layout, _xla

F32 = jnp.float32
ROW_MIN = 128  # the fewest elements a row partial sums


class Sums(NamedTuple):
  """The leaves' float32 sums of squares (a scalar per leaf, or one per
  layer slice) as one ``(S,)`` vector in leaf order, and their total."""
  stacked: jax.Array
  total: jax.Array


def row_view(shape: tuple[int, ...], axis: int | None
             ) -> tuple[int, ...] | None:
  """The view ``(rows, row)``, or per layer ``(L, rows, row)``, in which a
  leaf's row partials are taken: ``row`` the product of the fewest trailing
  dimensions that reaches ``ROW_MIN`` elements (all of them for a small
  leaf), so the partials are at most ``1/ROW_MIN`` of the leaf. None where
  the layer axis is not the leading one, or the leaf is empty."""
  if axis not in (None, 0) or not math.prod(shape):
    return None
  lead, rest = ((shape[0],), shape[1:]) if axis == 0 else ((), shape)
  row, i = 1, len(rest)
  while i > 0 and row < ROW_MIN:
    i -= 1
    row *= rest[i]
  return (*lead, math.prod(rest[:i]), row)


def _rows(x: jax.Array, view: tuple[int, ...]) -> jax.Array:
  x = x.astype(jnp.promote_types(x.dtype, F32)).reshape(view)
  return jnp.sum(x * x, axis=-1)


def finish(rows: Sequence[jax.Array], axis_name: str | None = None,
           first: int | None = None, peak: bool = False
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(sums, total, rest_total)``: each of ``rows`` summed over its last
  axis (float32; ``peak``: its maximum, from 0), all of one shape and dtype
  stacked and reduced by one reduction, ``psum``-ed (``pmax``-ed) over
  ``axis_name`` in one collective, barriers on both sides. ``sums``: those
  of the first ``first`` rows (default: all) as one vector in row order (a
  row of ``(L, r)`` partials gives ``L``); ``total`` their sum;
  ``rest_total`` that of the other rows. Read from
  the stacked results as a whole, never a slice per row (on GPU a sum of
  many slices is a chain of scalar ops; each slice traced apart, trace
  time grows with the leaves)."""
  rows = lax.optimization_barrier(list(rows))
  first = len(rows) if first is None else first
  groups: dict[tuple, list[int]] = {}
  for k, r in enumerate(rows):
    groups.setdefault((r.shape, r.dtype), []).append(k)
  done = [_reduce_last(jnp.stack([rows[k] for k in g]), peak)
          for g in groups.values()]
  done = (_collectives.pmax if peak else _collectives.psum)(done, axis_name)
  done = lax.optimization_barrier(done)
  pieces, order = [], []
  total = rest_total = jnp.zeros((), F32)
  for g, d in zip(groups.values(), done):
    n = sum(k < first for k in g)  # in row order: those come first
    if n:
      head = d[:n] if n < len(g) else d
      pieces.append(jnp.reshape(head, (-1,)))
      total = total + jnp.sum(head)
      order += g[:n]
    if n < len(g):
      rest_total = rest_total + jnp.sum(d[n:])
  sums = jnp.concatenate(pieces) if pieces else jnp.zeros((0,), F32)
  return _in_row_order(sums, [rows[k].shape[:-1] for k in range(first)],
                       order), total, rest_total


def _reduce_last(x: jax.Array, peak: bool) -> jax.Array:
  if peak:
    return max_from_zero(x, (x.ndim - 1,))
  return jnp.sum(x, axis=-1).astype(F32)


def max_from_zero(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """The max of ``x`` (non-negative figures: norms, ratios) over ``axes``,
  0 where empty, NaN kept: a plain max reduction from 0, where
  ``jnp.max``'s ``initial`` adds a maximum after it (a kernel per leaf on
  TPU; per_example_clip, H100 6 x 4 layers: 19 -> 18)."""
  return lax.reduce(x, jnp.zeros((), x.dtype), lax.max, tuple(axes))


def _in_row_order(values: jax.Array, shapes: Sequence[tuple], order: list[int]
                  ) -> jax.Array:
  """``values``, rows' segments concatenated in ``order``, in row order
  (one static gather where they differ; nothing where they agree)."""
  if order == sorted(order):
    return values
  sizes = [math.prod(s) for s in shapes]
  start = dict(zip(order, np.cumsum([0] + [sizes[k] for k in order])[:-1]))
  idx = np.concatenate([np.arange(start[k], start[k] + sizes[k])
                        for k in range(len(shapes))]).astype(np.int32)
  return values[idx]


def assemble(views: Sequence[Any], sums: jax.Array, rest: Sequence[jax.Array],
             total: jax.Array, shapes: Sequence[tuple]) -> Sums:
  """:class:`Sums` in leaf order from the finished rows' ``sums`` (of the
  leaves with a view, in their order; ``total`` theirs) and ``rest`` (the
  sums of those without)."""
  if not rest:
    return Sums(sums, total)
  sizes = [math.prod(s) for s in shapes]  # every leaf's segment count
  pieces, at = [], 0
  it_rest = iter(rest)
  for v, size in zip(views, sizes):
    if v is None:
      pieces.append(jnp.reshape(next(it_rest), (-1,)))
    else:
      pieces.append(sums[at:at + size])
      at += size
  return Sums(jnp.concatenate(pieces),
              sum((jnp.sum(r) for r in rest), total))


def grouped(leaves: Sequence[jax.Array], axes: Sequence[int | None],
            fallback: Any, axis_name: str | None = None) -> Sums:
  """:class:`Sums` of ``leaves`` (per layer slice along ``axes``), each
  leaf's row partials finished with those of the same shape
  (:func:`finish`). ``fallback(x, axis)``: the sum of a leaf without a row
  view (a layer axis other than the leading one; an empty leaf).
  ``axis_name``: the sums are ``psum``-ed over it."""
  views = [row_view(x.shape, a) for x, a in zip(leaves, axes)]
  rows_of = _xla.per_leaf(_rows, ("view",))
  sums, total, _ = finish([rows_of(x, view=v) for x, v in zip(leaves, views)
                           if v is not None], axis_name)
  rest = [fallback(x, a) for x, v, a in zip(leaves, views, axes) if v is None]
  if axis_name is not None:
    rest = lax.psum(rest, axis_name)
  return assemble(views, sums, rest, total, segment_shapes(leaves, axes))


def segment_shapes(leaves: Sequence[jax.Array], axes: Sequence[int | None]
                   ) -> list[tuple]:
  """Each leaf's shape of sums: ``()``, or ``(L,)`` along its layer axis."""
  return [() if a is None else (x.shape[a],) for x, a in zip(leaves, axes)]


def acc_dtype(x: Any) -> jnp.dtype:
  """The dtype reductions over ``x`` accumulate in: float32 or wider."""
  return jnp.promote_types(jnp.result_type(x), F32)


def sumsq(x: jax.Array, axis: int | None = None, native: bool = False
          ) -> jax.Array:
  """Float32 sum of squares of ``x``: a scalar, or per slice along ``axis``
  (a layer axis) as a ``(x.shape[axis],)`` vector. ``native``: a bfloat16
  ``x`` is squared in bfloat16 and its sum rounded to bfloat16 (accumulated
  in float32 all the same): see :func:`leaf_sumsq`."""
  if not (native and x.dtype == jnp.bfloat16):
    x = x.astype(acc_dtype(x))
  if axis is None:
    return jnp.sum(x * x).astype(F32)
  # As (before, L, after): a reshape, no copy. Reducing the original shape
  # over several axes made XLA:CPU write x * x to a parameter-sized buffer.
  shape = x.shape
  before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
  if before == 1:  # a leading layer axis: a plain row reduction
    return jnp.sum(jnp.square(x.reshape(shape[axis], after)), axis=1).astype(F32)
  x = x.reshape(before, shape[axis], after)
  return jnp.sum(x * x, axis=(0, 2)).astype(F32)


def leaf_sumsq(leaves: Sequence[jax.Array], lay: _layout.Layout,
               axis_name: str | None = None, recorded: bool = False
               ) -> list[jax.Array]:
  """Each leaf's sum of squares (per layer slice where ``lay`` has a layer
  axis), ``psum``-ed over ``axis_name`` in one collective: the form on CPU
  and TPU. Readers of the stacked vector or the total take :func:`sums`,
  per-leaf scales ``_norms.leaf_scales``: on GPU both are finished by shape
  group (:func:`grouped`).

  ``recorded``: the sums are only recorded (a monitor's, a detector's), so
  on TPU a bfloat16 leaf is squared in bfloat16 and its sum rounded to
  bfloat16 (relative error about 2**-8; accumulated in float32): only then
  does XLA:TPU fuse the sum into the optimizer's pass over the gradients
  (measured: 1.000x Adam's bytes and 100 kernels at 100 leaves, against
  1.143x and 202 with float32 squares). Elsewhere, and for float16 (whose
  squares overflow beyond 256), the float32 form."""
  one = _xla.per_leaf(sumsq, ("axis", "native"))

  def each(*xs, native=False):
    return [one(x, axis=a, native=native) for x, a in zip(xs, lay.axes)]
  if recorded and any(x.dtype == jnp.bfloat16 for x in leaves):
    parts = lax.platform_dependent(
        *leaves, tpu=lambda *xs: each(*xs, native=True), default=each)
  else:
    parts = each(*leaves)
  parts = _collectives.psum(parts, axis_name)
  if any(a is not None for a in lay.axes):
    # On every platform: XLA otherwise merges a sum over per-layer sums
    # back into a reduction of the gradients themselves, a second read of
    # them (CPU: it writes g*g to a parameter-sized temporary; H100/TPU:
    # 1.143x Adam's bytes instead of 1.000 for a monitor).
    parts = lax.optimization_barrier(parts)
  return parts


def stacked_sums(parts: Sequence[jax.Array], lay: _layout.Layout) -> jax.Array:
  """``parts`` (as :func:`leaf_sumsq` gives them) as one stacked vector for
  readers that total it (a global norm) and keep it (a state).

  With a layer axis, on TPU behind a barrier: otherwise XLA:TPU splits
  ``sum(concatenate(parts))`` back into a reduction of each leaf's ``(L,)``
  vector, a kernel per leaf (monitor, 6 leaves of 24 layers: 14 -> 9
  kernels; of 4 layers the same). XLA:GPU fuses those per-leaf totals into
  the step's scalar bookkeeping at 24 layers, where the barrier costs two
  kernels (the concatenation and its reduction: detect_spikes 24 -> 26),
  and only at a few layers does it save (4 layers: 31 -> 26), so it is
  left out there, as on CPU (:func:`_xla.kept`, the O(N^2) joins)."""
  v = _layout.stack(parts)
  if any(a is not None for a in lay.axes):
    return lax.platform_dependent(v, tpu=lax.optimization_barrier,
                                  default=_xla.kept)
  return _xla.kept(v)


def sums(leaves: Sequence[jax.Array], lay: _layout.Layout,
         axis_name: str | None = None, recorded: bool = False) -> Sums:
  """:class:`Sums` (the stacked per-leaf sums and their total) for
  readers of the stacked vector or the total: on GPU finished by shape group
  (:func:`grouped`), else :func:`leaf_sumsq`, :func:`stacked_sums`
  and :func:`total`."""
  def gpu(*xs):
    return grouped(xs, lay.axes, sumsq, axis_name)

  def other(*xs):
    parts = leaf_sumsq(xs, lay, axis_name, recorded)
    sq = stacked_sums(parts, lay)
    return Sums(sq, total(parts, sq))
  return lax.platform_dependent(*leaves, cuda=gpu, rocm=gpu, default=other)


def total(parts: Sequence[jax.Array], stacked: jax.Array | None) -> jax.Array:
  """The sum of every segment's figure. Without a layer axis: ``sum(stacked)``
  (``stacked``: :func:`stacked_sums` of ``parts``, the vector kept whole on
  CPU). With per-layer ``(L,)`` parts (``stacked`` may then be None), those
  of one length are first added elementwise, then reduced: XLA otherwise
  splits ``sum(concatenate(parts))`` into a reduction of each leaf's vector,
  a kernel per stacked leaf on GPU (a reduction's output cannot feed another
  reduction in one kernel); added first, all of them are one kernel
  (monitor, 6 leaves of 4 layers, H100: 25 -> 19 kernels)."""
  if not any(jnp.ndim(p) for p in parts):
    if stacked is None:
      raise ValueError("total: scalar parts need their stacked vector")
    return jnp.sum(stacked)
  groups: dict[tuple, jax.Array] = {}
  for p in parts:
    key = jnp.shape(p)
    groups[key] = groups[key] + p if key in groups else p
  return sum((jnp.sum(v) for v in groups.values()), jnp.zeros((), F32))
