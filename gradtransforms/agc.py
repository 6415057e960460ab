"""Unit-wise adaptive gradient clipping (AGC)."""

from __future__ import annotations

import functools

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtransforms import _checks, _layout, _norms, _xla
from gradtransforms._registry import register

# optax's unitwise_clip: "prevents division by zero", never the clip level.
_DIV_EPS = 1e-6


@register("adaptive_grad_clip", ("clip_fraction", "clipped_units", "clipped"),
          {"clipped": "clipped"})
class AdaptiveGradClipState(NamedTuple):
  """Figures of the last step.

  ``clip_fraction``: per leaf, the fraction of its units whose gradient norm
  exceeded the bound (a :class:`~gradtransforms._layout.PerLeaf` vector,
  ``gt.metrics(state, per_leaf=True)``); ``clipped_units``: the number of
  clipped units over all leaves; ``clipped``: ``clipped_units > 0``.
  """
  clip_fraction: _layout.PerLeaf
  clipped_units: jax.Array

  @property
  def clipped(self) -> jax.Array:
    return self.clipped_units > 0


def _check_axis(axis: Any) -> int | tuple[int, ...] | None:
  """Construction-time check of ``axis``: None, an int or a sequence of ints."""
  if axis is None:
    return None
  items: Sequence[Any] = axis if isinstance(axis, (tuple, list)) else (axis,)
  for a in items:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise TypeError(f"axis must be None, an int or a tuple of ints, got "
                      f"{axis!r}")
  if isinstance(axis, (tuple, list)):
    return tuple(int(a) for a in axis)
  return int(axis)


def _unit_axes(name: str, x: Any, axis: int | tuple[int, ...] | None
               ) -> tuple[int, ...]:
  """The axes a unit's norm sums over: optax's ``unitwise_norm`` convention.

  With ``axis``: those axes. Otherwise, by rank: a leaf that is a scalar or
  a vector after squeezing (``()``, ``(n,)``, ``(1, n)``, ``(n, 1, 1)``...)
  is one unit; rank 2 and 3 sum over axis 0 (``(in, out)``, multi-head
  ``(in, heads, out)``); rank 4 over ``(0, 1, 2)`` (HWIO convolutions);
  rank 5 over ``(0, 1, 2, 3)`` (DHWIO); rank 6+ needs ``axis``.
  """
  shape = jnp.shape(x)
  ndim = len(shape)
  if axis is not None:
    items = axis if isinstance(axis, tuple) else (axis,)
    if any(not -ndim <= a < ndim for a in items):
      raise ValueError(f"adaptive_grad_clip: axis={axis!r} is out of range "
                       f"for leaf {name!r} of shape {shape}")
    out = tuple(sorted({a % ndim for a in items}))
    if len(out) != len(items):
      raise ValueError(f"adaptive_grad_clip: axis={axis!r} repeats an axis of "
                       f"leaf {name!r} of shape {shape}")
    return out
  if sum(d != 1 for d in shape) <= 1:  # jnp.squeeze(x).ndim <= 1
    return tuple(range(ndim))
  if ndim in (2, 3):
    return (0,)
  if ndim == 4:
    return (0, 1, 2)
  if ndim == 5:
    return (0, 1, 2, 3)
  raise ValueError(
      f"adaptive_grad_clip: leaf {name!r} has shape {shape}; without axis= "
      "leaves of rank <= 5 are supported (as optax); pass axis= to choose the "
      "reduction axes")


def _add_pairs(x, y):
  """The variadic sum's reducer (one function: JAX traces it once)."""
  return x[0] + y[0], x[1] + y[1]


def _unit_sumsq(gs: list[jax.Array], ps: list[jax.Array],
                axes: list[tuple[int, ...]]) -> tuple[list, list]:
  """Each leaf's units' gradient and param sums of squares (reduced shape). On
  GPU/TPU in ONE variadic reduction a leaf: one kernel reads both, where
  two ``jnp.sum`` s cost two (H100 at 100 leaves: 306 kernels, was 406). On
  CPU two plain sums: XLA:CPU runs the variadic one about 3x slower (AGC
  at 50M / 100 leaves: 2.5-2.7x Adam's step, 1.40x with two sums)."""
  def form(leaf_sums):
    one = _xla.per_leaf(leaf_sums, ("a",))

    def sums(gs, ps):
      out = [one(g, p, a=a) for g, p, a in zip(gs, ps, axes)]
      return [g for g, _ in out], [p for _, p in out]
    return sums
  return jax.lax.platform_dependent(gs, ps, cpu=form(_two_sums),
                                    default=form(_one_sum))


def _two_sums(g: jax.Array, p: jax.Array, a: tuple[int, ...]):
  """CPU: a leaf's units' two sums of squares, each a plain sum, in the
  reduced shape (flattened only where the leaves are joined, ``_decide``:
  a flat vector given to the leaf-by-leaf scale ops made a TPU v5e relay
  and reshape it, 62 kernels at 6 rank-3 leaves where optax has 30)."""
  g, p = g.astype(_norms.acc_dtype(g)), p.astype(_norms.acc_dtype(p))
  return jnp.sum(g * g, axis=a), jnp.sum(p * p, axis=a)


def _one_sum(g: jax.Array, p: jax.Array, a: tuple[int, ...]):
  """GPU/TPU: the same two sums in one variadic reduction (reduced shape)."""
  g, p = g.astype(_norms.acc_dtype(g)), p.astype(_norms.acc_dtype(p))
  sg, sp = jax.lax.reduce((g * g, p * p), (np.zeros((), g.dtype),
                                           np.zeros((), p.dtype)),
                          _add_pairs, a)
  return sg, sp


def _scale_units(g: jax.Array, s: jax.Array, keep: tuple[int, ...]):
  """A leaf times its units' scales ``s``, reshaped to ``keep``."""
  return _norms.scale(g, s.reshape(keep))


def _scale_and_count(gs: jax.Array, ps: jax.Array, clipping: float,
                     eps: float) -> tuple[jax.Array, jax.Array]:
  """From the units' sums of squares: each unit's scale, and whether it
  was clipped. optax: ``where(g < m, g, g * m / max(g, 1e-6))`` with
  ``m = clipping * max(||W||, eps)``; here a unit whose ``||g||`` is
  Inf/NaN or whose ``m`` is NaN keeps scale 1, and the divide is the root
  (1 / 1 where the unit is not clipped), as in ``_norms.clip_scale``."""
  g_norm, max_norm = jnp.sqrt(gs), clipping * jnp.maximum(jnp.sqrt(ps), eps)
  finite = g_norm < jnp.inf  # a norm is >= 0 or NaN
  act = finite & (g_norm >= max_norm)  # False where max_norm is NaN
  s = (jnp.where(act, max_norm, 1.0)
       / jnp.where(act, jnp.maximum(g_norm, _DIV_EPS), 1.0))
  return s, finite & (g_norm > max_norm)


def _decide(gs: list[jax.Array], ps: list[jax.Array], clipping: float,
            eps: float, anchor: jax.Array) -> tuple[list, jax.Array]:
  """Every unit of every leaf decided at once, on the joined sums (CPU and
  GPU): each leaf's scales and its count of clipped units (a segment sum).
  Leaf by leaf, the select-divide and the count were a computation per
  leaf, and XLA copied them into every loop that read the scale (CPU:
  2.71x Adam's per-leaf HLO; H100: 306 kernels at 100 leaves, joined 116,
  where XLA:GPU fuses the leaves' reductions and loops). Each leaf reads
  its scales as a dynamic slice at a start that comes, with the vector,
  out of a conditional on CPU (``_xla.operands``, anchored on any integer
  scalar): a static slice would put its index into the leaf's loops and
  make every loop a computation of its own, which XLA:CPU compiles one by
  one where leaves of one shape share one."""
  if not gs:
    return [], jnp.zeros((0,), jnp.int32)
  counts = [g.size for g in gs]
  s, c = _scale_and_count(jnp.concatenate([g.reshape(-1) for g in gs]),
                          jnp.concatenate([p.reshape(-1) for p in ps]),
                          clipping, eps)
  leaf_of_unit = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
  per_leaf = jax.ops.segment_sum(c.astype(jnp.int32), leaf_of_unit,
                                 num_segments=len(counts),
                                 indices_are_sorted=True)
  starts = [jnp.asarray(i, jnp.int32) for i in np.cumsum([0, *counts[:-1]])]
  s, starts = _xla.operands((s, starts), anchor)
  return [jax.lax.dynamic_slice_in_dim(s, i, g.size,
                                       allow_negative_indices=False
                                       ).reshape(g.shape)
          for i, g in zip(starts, gs)], per_leaf


def _per_leaf(gs: list[jax.Array], ps: list[jax.Array], clipping: float,
              eps: float) -> tuple[list, jax.Array]:
  """The same numbers leaf by leaf (TPU, and GPU for 16-bit leaves): each
  leaf's few scale ops fuse into its own loops. Joined, TPU v5e ran 213
  kernels at 100 leaves (402 here; optax 500) but read 1.305x Adam's bytes
  in bfloat16 at 8 leaves of 64k (floor 1.286; 1.290 here): it keeps the
  concatenations, the mask and its segment sum as kernels of their own
  over float32 unit vectors."""
  one = _xla.per_leaf(functools.partial(_scale_and_count, clipping=clipping,
                                        eps=eps))
  out = [one(g, p) for g, p in zip(gs, ps)]
  return [s for s, _ in out], _layout.stack(
      [jnp.sum(c, dtype=jnp.int32) for _, c in out], jnp.int32)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3,
                       axis: int | tuple[int, ...] | None = None
                       ) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping (AGC).

  For each unit ``j`` of each leaf, with ``W`` the params:
  ``m_j = clipping * max(||W_j||, eps)``; where ``||g_j|| >= m_j``,
  ``g_j <- g_j * m_j / max(||g_j||, 1e-6)``. Brock et al., 2021,
  "High-Performance Large-Scale Image Recognition Without Normalization".
  The same numbers as ``optax.adaptive_grad_clip(clipping, eps, axis)``
  (0.2.8) for finite input, including its units: a unit is a slice along
  the axes *not* summed over; without ``axis`` a leaf that squeezes to a
  scalar or vector (``(1, n)`` included) is one unit, rank 2-3 leaves sum
  over axis 0, rank 4 over ``(0, 1, 2)``, rank 5 over ``(0, 1, 2, 3)``;
  rank 6+ needs ``axis``. Norms accumulate in float32 for float16/bfloat16
  leaves, whose dtype is kept.

  Under ``shard_map`` a leaf may be split along a unit axis with no
  communication; splitting it along a summed axis would need the unit norms
  summed across shards, which this transform does not do (use ``jit`` with
  ``NamedSharding`` instead, where XLA inserts the reductions).

  Non-finite input (where optax would write NaN): a unit whose gradient norm
  is Inf/NaN, or whose parameter norm is NaN, passes unchanged for a guard
  to see. Zeros: a zero gradient stays zero; zero parameters are floored at
  ``eps``, so zero-initialised units can move. Empty trees and zero-size
  leaves pass through (a zero-size leaf has no units).

  State: :class:`AdaptiveGradClipState` (one per-leaf float32 vector and one
  scalar, whatever the number of leaves); ``update(g, None, params)`` runs
  from a fresh one. Integer gradients/params are computed in float32 and
  give float32, as optax (whose integer squares can wrap; ours do not).

  Args:
    clipping: the ratio of gradient to parameter norm allowed, >= 0;
      ``inf`` never clips.
    eps: the floor of the parameter norm, >= 0.
    axis: None (optax's convention by rank, above), an int or a tuple of
      ints: the axes each unit's norm sums over, for every leaf.
  """
  _checks.bound("clipping", clipping)
  _checks.nonnegative("eps", eps)
  axis = _check_axis(axis)

  @_xla.fresh_state
  def init_fn(params):
    return AdaptiveGradClipState(
        clip_fraction=_layout.zeros(_layout.layout(params)),
        clipped_units=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    _checks.needs_params("adaptive_grad_clip", params)
    updates = _checks.ints_as_float("updates", updates)  # as optax
    params = _checks.ints_as_float("params", params)
    lay = _layout.layout(updates)
    _layout.check_names(lay, state.clip_fraction, "adaptive_grad_clip")
    leaves, treedef = jax.tree.flatten(updates)
    p_leaves = treedef.flatten_up_to(params)
    axes, keeps = [], []
    for name, g, p in zip(lay.names, leaves, p_leaves):
      if jnp.shape(g) != jnp.shape(p):
        raise ValueError(f"adaptive_grad_clip: update {name!r} has shape "
                         f"{jnp.shape(g)} but its param has {jnp.shape(p)}")
      axes.append(_unit_axes(name, g, axis))
      keeps.append([1 if i in axes[-1] else d
                    for i, d in enumerate(jnp.shape(g))])
    gs, ps = _unit_sumsq(leaves, p_leaves, axes)
    decide = lambda g, p, a: _decide(g, p, clipping, eps, a)
    per_leaf = lambda g, p, _: _per_leaf(g, p, clipping, eps)
    # GPU: joined, but for 16-bit leaves, against whose bytes the joined
    # float32 unit vectors weigh twice (H100, bfloat16, 100 leaves: 1.300x
    # Adam's bytes, floor 1.286; leaf by leaf 1.293 in 306 kernels)
    wide = all(jnp.dtype(g.dtype).itemsize >= 4 for g in leaves)
    scales, counts_v = jax.lax.platform_dependent(
        gs, ps, state.clipped_units, cpu=decide, tpu=per_leaf,
        default=decide if wide else per_leaf)
    scale = _xla.per_leaf(_scale_units, ("keep",))
    out = [scale(g, s, keep=tuple(k)) for g, s, k in zip(leaves, scales, keeps)]
    units = [max(g.size, 1) for g in gs]
    frac = counts_v.astype(jnp.float32) / jnp.asarray(units, jnp.float32)
    new_state = AdaptiveGradClipState(
        clip_fraction=state.clip_fraction.replace(frac),
        clipped_units=jnp.sum(counts_v, dtype=jnp.int32))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(
      init_fn, _checks.state_optional(init_fn, update_fn))
