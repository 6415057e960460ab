"""Per-example clipping (DP-SGD style) as a transform over a leading batch axis."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _collectives
from gradtransforms import _layout
from gradtransforms import _norms
from gradtransforms import _sums
from gradtransforms import _xla
from gradtransforms._registry import register


@register("per_example_clip", ("clip_fraction", "mean_norm", "max_norm"))
class PerExampleClipState(NamedTuple):
  """Last step: fraction of examples clipped, mean and max per-example norm."""
  clip_fraction: jax.Array
  mean_norm: jax.Array
  max_norm: jax.Array


def per_example_clip(l2_norm_clip: float, *, reduce: str = "mean",
                     axis_name: str | None = None
                     ) -> optax.GradientTransformation:
  """Clips each example's gradient to a global L2 norm, then sums or averages.

  Every update leaf has a leading batch axis ``B`` (e.g. from
  ``jax.vmap(jax.grad(loss))``). For example ``b`` with global norm ``n_b``
  over all leaves: ``s_b = min(1, C / n_b)`` and the output (without the
  batch axis) is ``sum_b s_b g_b`` (``reduce="sum"``, as
  ``optax.per_example_global_norm_clip``) or that sum over ``B``
  (``reduce="mean"``, the default, so a following optimizer sees the usual
  gradient scale). Abadi et al., 2016, "Deep Learning with Differential
  Privacy" (no noise is added here: chain a noise transform for DP).

  An example with a non-finite norm is not scaled, so its Inf/NaN reaches the
  output where a guard can see it. A zero example stays zero (scale 1).
  An empty tree passes through (figures 0); zero-size leaves (``(B, 0)``)
  add nothing to the norms; an empty batch (``B = 0``) gives zeros. A leaf
  without a batch axis (a scalar), or leaves whose leading sizes differ,
  raise ``ValueError`` naming them (the output would silently lose an axis).

  State: :class:`PerExampleClipState` of the last step (``update(g, None)``
  runs from a fresh one). Integer leaves give float32, as optax.

  Args:
    l2_norm_clip: the per-example bound ``C``, >= 0 (``inf``: never clip).
    reduce: ``"mean"`` or ``"sum"`` over the batch.
    axis_name: if the batch is split over this ``shard_map``/``pmap`` axis,
      the sums (and the batch size, for the mean) are ``psum``-ed over it.
  """
  _checks.bound("l2_norm_clip", l2_norm_clip)
  _checks.axis_name("axis_name", axis_name)
  reduce = _checks.one_of("reduce", reduce, ("mean", "sum"))

  @_xla.fresh_state
  def init_fn(params):
    del params
    z = jnp.zeros((), jnp.float32)
    return PerExampleClipState(clip_fraction=z, mean_norm=z, max_norm=z)

  def update_fn(updates, state, params=None):
    del state, params
    updates = _checks.ints_as_float("updates", updates)  # as optax
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
      z = jnp.zeros((), jnp.float32)
      return updates, PerExampleClipState(clip_fraction=z, mean_norm=z,
                                          max_norm=z)
    named = _layout.leaf_paths(updates)
    scalars = [n for n, x in named if jnp.ndim(x) == 0]
    if scalars:
      raise ValueError(
          "per_example_clip: every leaf of updates needs a leading batch axis "
          f"(per-example gradients, e.g. from jax.vmap); {scalars[:3]} "
          "are scalars")
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
      first = {}
      for n, x in named:
        first.setdefault(jnp.shape(x)[0], n)
      raise ValueError(
          "per_example_clip: every leaf of updates needs the same leading "
          f"batch axis, got sizes {sorted(sizes)} (e.g. "
          + ", ".join(f"{n!r}: {b}" for b, n in first.items()) + ")")
    batch = sizes.pop()

    def sq(x):
      x = x.astype(_norms.acc_dtype(x))
      return jnp.sum(x * x, axis=tuple(range(1, x.ndim))).astype(jnp.float32)

    norms = jnp.sqrt(sum(sq(x) for x in leaves))
    n = jnp.asarray(batch, jnp.float32)
    norm_sum, norm_max = jnp.sum(norms), _sums.max_from_zero(norms, (0,))
    if axis_name is not None:
      n = jax.lax.psum(n, axis_name)
      norm_sum = jax.lax.psum(norm_sum, axis_name)
      norm_max = _collectives.pmax(norm_max, axis_name)
    n = jnp.maximum(n, 1.0)  # an empty batch: zeros, not 0/0
    inv = 1.0 / n if reduce == "mean" else jnp.ones((), jnp.float32)
    # the mean's 1 / n in the weights, the count from them (_norms.clip_scale)
    weights = _norms.clip_scale(norms, l2_norm_clip, times=inv)
    clipped = jnp.sum((weights < inv).astype(jnp.float32))
    if axis_name is not None:
      clipped = jax.lax.psum(clipped, axis_name)

    def aggregate(x):
      acc = _norms.acc_dtype(x)
      w = weights.astype(acc).reshape((batch,) + (1,) * (x.ndim - 1))
      total = jnp.sum(x.astype(acc) * w, axis=0)
      if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
      return total.astype(x.dtype)

    out = [aggregate(x) for x in leaves]
    new_state = PerExampleClipState(clip_fraction=clipped / n,
                                    mean_norm=norm_sum / n, max_norm=norm_max)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(
      init_fn, _checks.state_optional(init_fn, update_fn))
