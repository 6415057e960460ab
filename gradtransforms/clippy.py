"""Clippy: clip each tensor's update relative to its weights."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms import _xla
from gradtransforms._registry import register


@register("clippy", ("scale",))
class ClippyState(NamedTuple):
  """Per-leaf scale applied at the last step (1 = not clipped)."""
  scale: optax.Updates


def clippy(relative_factor: float = 0.5, absolute_factor: float = 1e-2, *,
           axis_name: str | None = None) -> optax.GradientTransformation:
  """Clippy (Tang et al., 2023, "Improving Training Stability for Multitask
  Ranking Models in Recommender Systems").

  Bounds every entry of the *update* ``u`` (chain it after the optimizer, so
  ``u`` includes the learning rate) by ``relative_factor * |w| +
  absolute_factor``, with one scale per tensor so its direction is kept:
  ``sigma_i = min(1, min_j (relative_factor |w_ij| + absolute_factor) / |u_ij|)``,
  ``u_i <- sigma_i * u_i``.

  A tensor whose update has a non-finite entry passes unchanged.

  Cost: the update must exist in memory before it can be scaled (its
  per-tensor maximum is needed first), so XLA writes one update-sized buffer
  that ``apply_updates`` then reads, where Adam alone fuses the update into
  the parameter write.

  State: :class:`ClippyState`, per-leaf ``scale``.

  Args:
    relative_factor: lambda_rel >= 0.
    absolute_factor: lambda_abs > 0 (keeps zero weights movable).
    axis_name: inside ``shard_map``/``pmap`` with leaves sharded over this
      axis, the per-tensor maximum is taken over it so all shards agree.
  """
  _checks.nonnegative("relative_factor", relative_factor)
  _checks.positive("absolute_factor", absolute_factor)

  # |u| / (rel |w| + abs) = (|u| / (|w| + abs / rel)) / rel; rel = 0 (or so
  # small that abs / rel overflows float32) bounds |u| by abs alone.
  offset = absolute_factor / relative_factor if relative_factor else None
  if offset is not None and offset > float(jnp.finfo(jnp.float32).max):
    offset = None

  @_xla.fresh_state
  def init_fn(params):
    return ClippyState(jax.tree.map(lambda _: jnp.ones((), jnp.float32), params))

  def update_fn(updates, state, params=None):
    del state
    _checks.needs_params("clippy", params)
    _checks.float_leaves("updates", updates)

    def one(u, w):
      # max |u| / (rel |w| + abs), written with at most one scalar inside the
      # reduction: XLA:CPU materialises every scalar broadcast it contains as
      # a leaf-sized buffer (one per distinct leaf shape).
      acc = _norms.acc_dtype(u)
      au = jnp.abs(u.astype(acc))
      if offset is None:
        ratio = jnp.max(au).astype(jnp.float32) / absolute_factor
      else:
        ratio = jnp.max(au / (jnp.abs(w.astype(acc)) + offset)
                        ).astype(jnp.float32) / relative_factor
      if axis_name is not None:
        ratio = jax.lax.pmax(ratio, axis_name)
      return jnp.where(jnp.isfinite(ratio) & (ratio > 1), 1.0 / ratio, 1.0)

    scales = jax.tree.map(one, updates, params)
    return _norms.scale_tree(updates, scales), ClippyState(scales)

  return optax.GradientTransformation(init_fn, update_fn)
