"""Unit-wise adaptive gradient clipping (AGC)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _norms, _xla
from gradtransforms._registry import register


@register("adaptive_grad_clip", ("clip_fraction",))
class AdaptiveGradClipState(NamedTuple):
  """Per-leaf fraction of units that were clipped at the last step."""
  clip_fraction: optax.Updates


def _unit_axes(x: jax.Array) -> tuple[int, ...]:
  """Axes summed over for a unit-wise norm: all but the last (output) one."""
  if x.ndim <= 1:
    return tuple(range(x.ndim))
  if x.ndim <= 4:
    return tuple(range(x.ndim - 1))
  raise ValueError(
      f"adaptive_grad_clip supports leaves of rank <= 4, got shape {x.shape}")


def _unit_norm(x: jax.Array) -> jax.Array:
  x = x.astype(_norms.acc_dtype(x))
  return jnp.sqrt(jnp.sum(x * x, axis=_unit_axes(x), keepdims=True))


def adaptive_grad_clip(clipping: float, eps: float = 1e-3
                       ) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping (AGC).

  For each unit (output column) ``j`` of each leaf, with ``W`` the params:
  ``m_j = clipping * max(||W_j||, eps)``,
  ``g_j <- g_j * m_j / max(||g_j||, 1e-6)`` where ``||g_j|| > m_j``.
  Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization". The same numbers as ``optax.adaptive_grad_clip``. Units
  are the last axis for leaves of rank 2-4; scalars and vectors form one unit.
  Non-finite units pass through unchanged. Under ``shard_map`` a leaf may be
  split along its last (unit) axis with no communication; splitting it along
  another axis would need the unit norms summed across shards, which this
  transform does not do (use ``jit`` with ``NamedSharding`` instead, where
  XLA inserts the reductions).

  State: :class:`AdaptiveGradClipState`, per-leaf fraction of clipped units.

  Args:
    clipping: the ratio of gradient to parameter norm allowed, >= 0.
    eps: the floor of the parameter norm (so zero-initialised units can move).
  """
  _checks.nonnegative("clipping", clipping)
  _checks.nonnegative("eps", eps)

  @_xla.fresh_state
  def init_fn(params):
    return AdaptiveGradClipState(jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params))

  def update_fn(updates, state, params=None):
    del state
    _checks.needs_params("adaptive_grad_clip", params)
    _checks.float_leaves("updates", updates)

    def unit_scale(g, p):
      g_norm, p_norm = _unit_norm(g), _unit_norm(p)
      max_norm = clipping * jnp.maximum(p_norm, eps)
      clip = jnp.isfinite(g_norm) & (g_norm > max_norm)
      return jnp.where(clip, max_norm / jnp.maximum(g_norm, 1e-6), 1.0)

    scales = jax.tree.map(unit_scale, updates, params)
    new = jax.tree.map(_norms.scale, updates, scales)
    frac = jax.tree.map(lambda s: jnp.mean((s < 1).astype(jnp.float32)), scales)
    return new, AdaptiveGradClipState(frac)

  return optax.GradientTransformation(init_fn, update_fn)
