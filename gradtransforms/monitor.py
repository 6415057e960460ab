"""``monitor``: a pass-through transform that records gradient-norm figures."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _layout, _norms, _read_once, _stats, _xla
from gradtransforms._layout import LayerAxes, PerLeaf
from gradtransforms._registry import register


@register("monitor", ("step", "norm", "zscore", "log_norm_mean", "log_norm_var",
                      "nonfinite_leaves", "nonfinite_count", "leaf_norm",
                      "update_ratio"),
          {"global_norm": "norm", "leaf_norm": "leaf_norm",
           "update_ratio": "update_ratio"})
class MonitorState(NamedTuple):
  """Figures of the last step plus running statistics of ``log ||g||``.

  ``leaf_sumsq``: per-leaf (per layer slice) sums of squares as one stacked
  vector (empty unless ``per_leaf``); ``param_sumsq``: the same of the
  params (empty unless ``update_ratio``). ``leaf_norm`` and
  ``update_ratio`` (``||u_i|| / ||p_i||``) are derived when read.
  ``nonfinite_leaves``: leaves holding Inf/NaN at the last step;
  ``nonfinite_count``: steps so far with any.
  """
  step: jax.Array
  norm: jax.Array
  log_norm: _stats.SeriesStats
  zscore: jax.Array
  nonfinite_leaves: jax.Array
  nonfinite_count: jax.Array
  leaf_sumsq: PerLeaf
  param_sumsq: PerLeaf

  @property
  def log_norm_mean(self) -> jax.Array:
    return self.log_norm.mean

  @property
  def log_norm_var(self) -> jax.Array:
    return self.log_norm.var

  @property
  def leaf_norm(self) -> PerLeaf:
    return self.leaf_sumsq.sqrt()

  @property
  def update_ratio(self) -> PerLeaf:
    if not self.param_sumsq.names:
      return self.param_sumsq
    return self.param_sumsq.replace(
        jnp.sqrt(self.leaf_sumsq.values / self.param_sumsq.values))


def monitor(per_leaf: bool = False, decay: float = 0.98, *,
            update_ratio: bool = False, warmup_steps: int = 20,
            layer_axes: LayerAxes = None, axis_name: str | None = None
            ) -> optax.GradientTransformation:
  """Records the gradient norm and its statistics; updates pass unchanged.

  Each step: ``n = ||g||`` (and ``n_i = ||g_i||`` per leaf if ``per_leaf``),
  ``z = (log n - m) / (s + 1e-6)`` against an EMA (decay ``decay``) of
  ``log n`` with mean ``m`` and variance ``s**2`` (``_stats.series_observe``;
  ``z`` reads 0 for the first ``warmup_steps`` finite steps), and the count
  of leaves holding Inf/NaN. One read of the gradients, nothing written.
  Non-finite and zero norms are counted/recorded but never enter the
  statistics.

  Chained *after* the optimizer with ``update_ratio=True``, it sees the
  updates and the params and records ``||u_i|| / ||p_i||`` per leaf, the
  update-to-parameter ratio (healthy training: roughly 1e-4 to 1e-2 per
  step); that reads the params once more.

  State: :class:`MonitorState` (stacked vectors; its array count does not
  depend on the number of leaves).

  Args:
    per_leaf: also keep each leaf's norm.
    decay: EMA decay in [0, 1).
    update_ratio: also keep ``||u_i|| / ||p_i||`` (needs params; implies
      per-leaf norms).
    warmup_steps: steps before ``zscore`` is reported (static), >= 1.
    layer_axes: stacked-layer axes, as in
      :func:`gradtransforms.clip_by_leaf_norm`: per-leaf figures per slice.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  per_leaf = _checks.boolean("per_leaf", per_leaf)
  update_ratio = _checks.boolean("update_ratio", update_ratio)
  _checks.in_range("decay", decay, 0.0, 1.0, hi_open=True)
  warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1,
                                  static=False)
  layer_axes = _layout.check_layer_axes(layer_axes)
  keep = per_leaf or update_ratio
  empty = _layout.Layout((), (), ())

  def init_fn(params):
    lay = _layout.layout(params, layer_axes)
    z, i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    return _xla.fresh(MonitorState(
        step=i, norm=z, log_norm=_stats.series_init(), zscore=z,
        nonfinite_leaves=i, nonfinite_count=i,
        leaf_sumsq=_layout.zeros(lay if keep else empty),
        param_sumsq=_layout.zeros(lay if update_ratio else empty)))

  def update_fn(updates, state, params=None):
    _checks.float_leaves("updates", updates)
    state, restore = _read_once.read_once(state)
    if update_ratio:
      _checks.needs_params("monitor(update_ratio=True)", params)
    leaves = jax.tree.leaves(updates)
    lay = _layout.layout(updates, layer_axes)
    if keep:
      _layout.check_names(lay, state.leaf_sumsq, "monitor")
    sq, sq_total = _norms.sums(leaves, lay, axis_name, recorded=True)
    n = jnp.sqrt(sq_total)
    bad = jnp.sum(~jnp.isfinite(sq), dtype=jnp.int32)
    stats, z, _ = _stats.series_observe(state.log_norm, jnp.log(n), decay,
                                        jnp.inf, warmup_steps)
    p_sq = state.param_sumsq
    if update_ratio:
      p_leaves = jax.tree.structure(updates).flatten_up_to(params)
      p_sq = p_sq.replace(_layout.stack(_norms.leaf_sumsq(p_leaves, lay,
                                                          axis_name)))
    new = MonitorState(
        step=_stats.inc(state.step), norm=n, log_norm=stats, zscore=z,
        nonfinite_leaves=bad,
        nonfinite_count=_stats.inc(state.nonfinite_count, bad > 0),
        leaf_sumsq=state.leaf_sumsq.replace(sq) if keep else state.leaf_sumsq,
        param_sumsq=p_sq)
    return _xla.detach(updates, restore(new))

  return optax.GradientTransformation(init_fn, update_fn)
