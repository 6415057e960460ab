"""Periodic reset of Adam's moments inside an optimizer (SPAM)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms import _read_once
from gradtransforms import _stats
from gradtransforms import _xla
from gradtransforms._registry import register


@register("with_moment_reset", ("step", "resets"))
class MomentResetState(NamedTuple):
  """``step``: update calls so far; ``resets``: resets done (both saturate
  at 2**31 - 1); ``inner_state``: the wrapped optimizer's state."""
  step: jax.Array
  resets: jax.Array
  inner_state: optax.OptState


def _is_adam(s) -> bool:
  return isinstance(s, optax.ScaleByAdamState)


def _has_adam(state) -> bool:
  return any(_is_adam(s) for s in jax.tree.leaves(state, is_leaf=_is_adam))


def _reset_adam(state):
  def reset(s):
    if _is_adam(s):
      return s._replace(count=jnp.zeros_like(s.count),
                        mu=_norms.zeros_like_tree(s.mu),
                        nu=_norms.zeros_like_tree(s.nu))
    return s
  return jax.tree.map(reset, state, is_leaf=_is_adam)


def with_moment_reset(inner: optax.GradientTransformation, interval: int = 500
                      ) -> optax.GradientTransformationExtraArgs:
  """Zeroes Adam's moments inside ``inner`` every ``interval`` steps (SPAM).

  Every ``optax.ScaleByAdamState`` found in ``inner``'s state (``adam``,
  ``adamw``, ... at any depth) gets ``mu = nu = 0`` and ``count = 0`` before
  the update of steps ``interval, 2*interval, ...``, so bias correction
  restarts with the moments (SPAM resets the moments; restarting the count
  too keeps the first updates after a reset at the normal scale).

  ``inner`` must hold Adam moments: ``init`` raises ``ValueError`` if its
  state has no ``optax.ScaleByAdamState`` (a reset would do nothing, and
  ``resets`` would count resets that never happened). NaN/Inf, zeros and
  empty trees are the inner optimizer's business: the reset itself only
  writes zeros, on schedule, whatever the gradients. After 2**31 - 1 steps
  the step counter saturates and no further reset happens.

  State: :class:`MomentResetState` ``(step, resets, inner_state)``.

  Args:
    inner: the optimizer whose Adam moments are reset.
    interval: steps between resets (static), >= 1. Paper default: 500.
  """
  _checks.transformation("inner", inner)
  interval = _checks.integer("interval", interval, minimum=1)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    if not _has_adam(inner_state):
      raise ValueError(
          "with_moment_reset: the inner optimizer's state holds no "
          "optax.ScaleByAdamState (as optax.adam/adamw/nadam/... keep), so "
          "there are no Adam moments to reset")
    return MomentResetState(step=jnp.zeros((), jnp.int32),
                            resets=jnp.zeros((), jnp.int32),
                            inner_state=inner_state)

  @_read_once.reads_once
  def update_fn(updates, state, params=None, **extra):
    # (no reset once step has saturated: step % interval would stay fixed)
    due = ((state.step > 0) & (state.step % interval == 0) &
           (state.step < _stats.I32_MAX))
    # one operand on CPU: XLA:CPU copies the scalar chain that makes ``due``
    # into each of Adam's loops (mu, nu, update) of every leaf otherwise
    due = _xla.operands(due, state.step)
    inner_state = _norms.select_tree(due, _reset_adam(state.inner_state),
                                  state.inner_state)
    updates, inner_state = inner.update(updates, inner_state, params, **extra)
    return updates, MomentResetState(step=_stats.inc(state.step),
                                     resets=_stats.inc(state.resets, due),
                                     inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
