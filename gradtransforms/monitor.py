"""``monitor``: a pass-through transform that records gradient-norm figures."""

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


@register("monitor", ("step", "norm", "leaf_norm", "log_norm_mean",
                      "log_norm_var", "zscore", "nonfinite_leaves",
                      "nonfinite_steps"))
class MonitorState(NamedTuple):
  """Figures of the last step plus running statistics of ``log(norm)``.

  ``leaf_norm`` is a tree of per-leaf norms with ``per_leaf=True``, else ().
  ``nonfinite_leaves``: leaves holding Inf/NaN at the last step;
  ``nonfinite_steps``: steps so far with any.
  """
  step: jax.Array
  norm: jax.Array
  leaf_norm: optax.Updates
  log_norm_mean: jax.Array
  log_norm_var: jax.Array
  log_norm_count: jax.Array
  zscore: jax.Array
  nonfinite_leaves: jax.Array
  nonfinite_steps: jax.Array


def monitor(per_leaf: bool = False, alpha: float = 0.98, *,
            axis_name: str | None = None) -> optax.GradientTransformation:
  """Records the gradient norm and its statistics; updates pass unchanged.

  Each step: ``n = ||g||`` (and ``n_i = ||g_i||`` per leaf if ``per_leaf``),
  ``z = (log n - m) / (s + 1e-6)`` against an EMA (factor ``alpha``) of
  ``log n`` with mean ``m`` and variance ``s**2`` (see
  ``_stats.series_observe``), and the count of leaves holding Inf/NaN.
  One read of the gradients, nothing written. Non-finite steps are counted
  but never enter the statistics.

  State: :class:`MonitorState`.

  Args:
    per_leaf: also keep each leaf's norm (a tree of scalars).
    alpha: EMA factor in [0, 1).
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  _checks.in_range("alpha", alpha, 0.0, 1.0, hi_open=True)

  @_xla.fresh_state
  def init_fn(params):
    z = jnp.zeros((), jnp.float32)
    i = jnp.zeros((), jnp.int32)
    leaf = jax.tree.map(lambda _: z, params) if per_leaf else ()
    return MonitorState(i, z, leaf, z, z, i, z, i, i)

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    leaves, treedef = jax.tree.flatten(updates)
    n, vec = _norms.norms(leaves, axis_name)
    bad_leaves = jnp.sum(~jnp.isfinite(vec), dtype=jnp.int32)
    leaf_norm = jax.tree.unflatten(treedef, list(vec))
    stats = _stats.SeriesStats(state.log_norm_mean, state.log_norm_var,
                            state.log_norm_count)
    stats, z, _ = _stats.series_observe(stats, jnp.log(n), alpha, jnp.inf, 0)
    new = MonitorState(state.step + 1, n, leaf_norm if per_leaf else (),
                       stats.mean, stats.var, stats.count, z, bad_leaves,
                       state.nonfinite_steps + (bad_leaves > 0).astype(jnp.int32))
    return _xla.detach(updates, new)

  return optax.GradientTransformation(init_fn, update_fn)
