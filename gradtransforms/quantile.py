"""Geometric adaptive clipping to a target quantile of the norm distribution."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms import _xla
from gradtransforms._registry import register


# The bound never goes below this (float32's smallest normal number), so a
# geometric update can always bring it back up: 0 * exp(x) would stay 0.
_FLOOR = float(np.finfo(np.float32).tiny)


@register("quantile_clip", ("norm", "threshold", "clipped"),
          {"global_norm": "norm", "threshold": "threshold", "clipped": "clipped"})
class QuantileClipState(NamedTuple):
  """``threshold``: the bound used at the last step; ``clip``: the next one."""
  clip: jax.Array
  norm: jax.Array
  threshold: jax.Array
  clipped: jax.Array


def quantile_clip(target_quantile: float = 0.5, learning_rate: float = 0.2,
                  initial_clip: float = 1.0, *, axis_name: str | None = None
                  ) -> optax.GradientTransformation:
  """Adaptive clipping by online quantile estimation (non-private variant of
  Andrew et al., 2021, "Differentially Private Learning with Adaptive
  Clipping").

  ``n_t = ||g_t||``, ``g_t <- g_t * min(1, C_t / n_t)``, ``b_t = [n_t <= C_t]``,
  ``C_{t+1} = C_t * exp(-learning_rate * (b_t - target_quantile))``.
  ``C`` converges to the ``target_quantile`` quantile of the norms. (The
  paper averages ``b`` over a batch's per-example norms and adds noise; here
  ``b`` is the step's global-norm indicator and no noise is added.)

  Non-finite and zero norms are not observations: they leave ``C``
  unchanged and their update passes unchanged (a stretch of zero gradients
  would otherwise shrink ``C`` geometrically until it underflowed to 0,
  where ``0 * exp(x)`` stays 0 and every later update is zeroed). ``C`` is
  also floored at float32's smallest normal number (~1.2e-38), so it can
  always grow back. An empty tree has norm 0 and passes through.
  ``initial_clip=inf`` never clips (``inf * exp(x)`` stays ``inf``).

  State: :class:`QuantileClipState`. Defaults are the paper's.

  Args:
    target_quantile: gamma in [0, 1].
    learning_rate: eta > 0 of the geometric update.
    initial_clip: C_0 > 0 (``inf``: never clip).
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  _checks.in_range("target_quantile", target_quantile, 0.0, 1.0)
  _checks.axis_name("axis_name", axis_name)
  _checks.positive("learning_rate", learning_rate)
  _checks.bound("initial_clip", initial_clip, strict=True)

  @_xla.fresh_state
  def init_fn(params):
    del params
    z = jnp.zeros((), jnp.float32)
    return QuantileClipState(clip=jnp.asarray(initial_clip, jnp.float32),
                             norm=z, threshold=z, clipped=jnp.zeros((), jnp.bool_))

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    n = _norms.global_norm(updates, axis_name)
    s = _norms.clip_scale(n, state.clip)
    below = (n <= state.clip).astype(jnp.float32)
    new_clip = state.clip * jnp.exp(-learning_rate * (below - target_quantile))
    new_clip = jnp.maximum(new_clip, _FLOOR)
    clip = jnp.where(jnp.isfinite(n) & (n > 0), new_clip, state.clip)
    return _norms.scale_tree(updates, s), QuantileClipState(
        clip=clip, norm=n, threshold=state.clip, clipped=s < 1)

  return optax.GradientTransformation(init_fn, update_fn)
