"""Periodic reset of Adam's moments inside an optimizer (SPAM)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms._registry import register


@register("with_moment_reset", ("count", "resets"))
class MomentResetState(NamedTuple):
  count: jax.Array
  resets: jax.Array
  inner_state: optax.OptState


def _reset_adam(state):
  def reset(s):
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(count=jnp.zeros_like(s.count),
                        mu=_norms.zeros_like_tree(s.mu),
                        nu=_norms.zeros_like_tree(s.nu))
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
    inner_state = _norms.select_tree(due, _reset_adam(state.inner_state),
                                  state.inner_state)
    updates, inner_state = inner.update(updates, inner_state, params, **extra)
    return updates, MomentResetState(state.count + 1,
                                     state.resets + due.astype(jnp.int32),
                                     inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
