"""AutoClip: clip the global norm to a percentile of the norms seen so far."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _read_once
from gradtransforms import _norms
from gradtransforms import _stats
from gradtransforms import _xla
from gradtransforms._registry import register


@register("autoclip", ("norm", "threshold", "clipped", "observed"),
          {"global_norm": "norm", "threshold": "threshold", "clipped": "clipped"})
class AutoClipState(NamedTuple):
  """``norms``: ring buffer of the finite, non-zero global norms;
  ``observed``: how many were recorded (saturates at 2**31 - 1).

  ``norm``, ``threshold`` (``inf`` before the first observation) and
  ``clipped`` are the last step's figures.
  """
  norms: jax.Array
  observed: jax.Array
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

  Non-finite norms and zero norms are not observations: they are not
  recorded (a zero gradient says nothing about the gradient scale, and a
  stretch of zeros in the window would set the percentile to 0 and zero
  every update until it slid out), and their update passes unchanged.
  Before the first observation the threshold is ``inf`` (nothing clipped).
  An empty tree has norm 0 and passes through.

  State: :class:`AutoClipState`. Defaults follow the paper's p = 10.

  Args:
    percentile: p in [0, 100].
    history: ring buffer length (static), >= 1.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  _checks.in_range("percentile", percentile, 0.0, 100.0)
  _checks.axis_name("axis_name", axis_name)
  history = _checks.integer("history", history, minimum=1)

  @_xla.fresh_state
  def init_fn(params):
    del params
    z = jnp.zeros((), jnp.float32)
    return AutoClipState(norms=jnp.zeros((history,), jnp.float32),
                         observed=jnp.zeros((), jnp.int32), norm=z,
                         threshold=z, clipped=jnp.zeros((), jnp.bool_))

  @_read_once.reads_once
  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    n = _norms.global_norm(updates, axis_name)
    ok = jnp.isfinite(n) & (n > 0)
    buf, observed = _stats.ring_push(state.norms, state.observed, n, ok)
    threshold = jnp.where(observed > 0,
                          _stats.percentile(buf, observed, percentile), jnp.inf)
    s = _norms.clip_scale(n, threshold)
    return _norms.scale_tree(updates, s), AutoClipState(
        norms=buf, observed=observed, norm=n, threshold=threshold,
        clipped=s < 1)

  return optax.GradientTransformation(init_fn, update_fn)
