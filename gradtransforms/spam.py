"""Spike-aware elementwise clipping (SPAM) and periodic Adam moment reset."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _numerics as num
from gradtransforms._metrics import register


@register("spike_clip", ("clip_fraction", "count"))
class SpikeClipState(NamedTuple):
  """``nu``: EMA of squared (clipped) gradients, per element; ``count``: steps.

  ``clip_fraction``: the last step's fraction of clipped elements.
  """
  count: jax.Array
  nu: optax.Updates
  clip_fraction: jax.Array


def spike_clip(threshold: float = 5000.0, b2: float = 0.999, *,
               axis_name: str | None = None) -> optax.GradientTransformation:
  """Spike-aware clipping of individual gradient entries (Huang et al., 2025,
  "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training").

  With ``v`` an EMA of squared gradients and ``v_hat = v / (1 - b2**t)``:
  an entry is a spike if ``g**2 > threshold * v_hat``; it becomes
  ``sign(g) * sqrt(threshold * v_hat)``. Then ``v <- b2 v + (1 - b2) g**2``
  with the clipped ``g``. The first step only initialises ``v``. SPAM tests
  against Adam's own second moment; keeping ``v`` here makes the transform
  usable before any optimizer, at the cost of one more state tree.

  Non-finite input: ``+-Inf`` entries are spikes (clipped to the finite
  bound) once ``v`` exists; ``NaN`` entries pass unchanged. Non-finite
  values never enter ``v``.

  State: :class:`SpikeClipState`. Defaults are the paper's (theta = 5000,
  beta2 = 0.999).

  Args:
    threshold: theta > 0.
    b2: EMA factor in [0, 1).
    axis_name: with leaves sharded over this ``shard_map``/``pmap`` axis,
      ``clip_fraction`` counts over all shards (the clipping itself is
      elementwise and needs no communication).
  """
  _checks.positive("threshold", threshold)
  _checks.in_range("b2", b2, 0.0, 1.0, hi_open=True)

  def init_fn(params):  # distinct, strongly typed buffers: no copy needed
    return SpikeClipState(jnp.zeros((), jnp.int32),
                          jax.tree.map(jnp.zeros_like, params),
                          jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    t = state.count
    correction = 1.0 / (1.0 - jnp.asarray(b2, jnp.float32) ** t.astype(jnp.float32))
    active = t > 0

    def one(g, v):
      acc = num.acc_dtype(g)
      g32, v32 = g.astype(acc), v.astype(acc)
      bound_sq = threshold * v32 * jnp.where(active, correction, 0.0).astype(acc)
      spike = active & (g32 * g32 > bound_sq)
      clipped = jnp.where(spike, jnp.sign(g32) * jnp.sqrt(bound_sq), g32)
      new_v = b2 * v32 + (1 - b2) * clipped * clipped
      new_v = jnp.where(jnp.isfinite(new_v), new_v, v32)
      return clipped.astype(g.dtype), new_v.astype(v.dtype), spike

    leaves, treedef = jax.tree.flatten(updates)
    outs = [one(g, v) for g, v in zip(leaves, jax.tree.leaves(state.nu))]
    new_g = jax.tree.unflatten(treedef, [o[0] for o in outs])
    new_v = jax.tree.unflatten(treedef, [o[1] for o in outs])
    size = jnp.asarray(max(sum(x.size for x in leaves), 1), jnp.float32)
    clipped = sum(jnp.sum(o[2], dtype=jnp.float32) for o in outs)
    if axis_name is not None:
      size, clipped = jax.lax.psum((size, clipped), axis_name)
    frac = clipped / size
    return new_g, SpikeClipState(t + 1, new_v, frac)

  return optax.GradientTransformation(init_fn, update_fn)


@register("with_moment_reset", ("count", "resets"))
class MomentResetState(NamedTuple):
  count: jax.Array
  resets: jax.Array
  inner_state: optax.OptState


def _reset_adam(state):
  def reset(s):
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(count=jnp.zeros_like(s.count),
                        mu=num.zeros_like_tree(s.mu),
                        nu=num.zeros_like_tree(s.nu))
    return s
  return jax.tree.map(reset, state,
                      is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def with_moment_reset(inner: optax.GradientTransformation, interval: int = 500
                      ) -> optax.GradientTransformationExtraArgs:
  """Zeroes Adam's moments inside ``inner`` every ``interval`` steps (SPAM).

  Every ``optax.ScaleByAdamState`` found in ``inner``'s state (``adam``,
  ``adamw``, ... at any depth) gets ``mu = nu = 0`` and ``count = 0`` before
  the update of steps ``interval, 2*interval, ...``, so bias correction
  restarts with the moments (SPAM resets the moments; restarting the count
  too keeps the first updates after a reset at the normal scale).

  State: :class:`MomentResetState` ``(count, resets, inner_state)``.

  Args:
    inner: the optimizer whose Adam moments are reset.
    interval: steps between resets (static), >= 1. Paper default: 500.
  """
  interval = _checks.integer("interval", interval, minimum=1)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return MomentResetState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                            inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    due = (state.count > 0) & (state.count % interval == 0)
    inner_state = num.select_tree(due, _reset_adam(state.inner_state),
                                  state.inner_state)
    updates, inner_state = inner.update(updates, inner_state, params, **extra)
    return updates, MomentResetState(state.count + 1,
                                     state.resets + due.astype(jnp.int32),
                                     inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
