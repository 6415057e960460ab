"""AutoClip: clip the global norm to a percentile of the norms seen so far."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms import _stats
from gradtransforms import _xla
from gradtransforms._registry import register


@register("autoclip", ("norm", "threshold", "clipped", "count"))
class AutoClipState(NamedTuple):
  """``norms``: ring buffer of finite global norms; ``count``: how many seen.

  ``norm``, ``threshold`` and ``clipped`` are the last step's figures.
  """
  norms: jax.Array
  count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  clipped: jax.Array


def autoclip(percentile: float = 10.0, history: int = 10_000, *,
             axis_name: str | None = None) -> optax.GradientTransformation:
  """AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient
  Clipping for Source Separation Networks").

  ``n_t = ||g_t||``, ``c_t = percentile({n_1..n_t}, p)`` (NumPy's linear
  interpolation), ``g_t <- g_t * min(1, c_t / n_t)``. The history includes the
  current norm, so the first step is never clipped. Norms are kept in a ring
  buffer of ``history`` entries: identical to the unbounded reference while
  ``t <= history``, then a sliding window of the last ``history`` norms.
  The percentile sorts the buffer each step, O(history log history), which
  is independent of the model size.

  A non-finite norm is not recorded and its update passes unchanged.

  State: :class:`AutoClipState`. Defaults follow the paper's p = 10.

  Args:
    percentile: p in [0, 100].
    history: ring buffer length (static), >= 1.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  _checks.in_range("percentile", percentile, 0.0, 100.0)
  history = _checks.integer("history", history, minimum=1)

  @_xla.fresh_state
  def init_fn(params):
    del params
    z = jnp.zeros((), jnp.float32)
    return AutoClipState(jnp.zeros((history,), jnp.float32),
                         jnp.zeros((), jnp.int32), z, z,
                         jnp.zeros((), jnp.bool_))

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    n = _norms.global_norm(updates, axis_name)
    buf, count = _stats.ring_push(state.norms, state.count, n, jnp.isfinite(n))
    threshold = _stats.percentile(buf, count, percentile)
    s = _norms.clip_scale(n, threshold)
    return _norms.scale_tree(updates, s), AutoClipState(buf, count, n, threshold,
                                                     s < 1)

  return optax.GradientTransformation(init_fn, update_fn)
