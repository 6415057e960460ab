"""The spike-detection engine shared by ``detect_spikes`` and ``guard``.

One pass over the gradients gives the per-leaf (per layer slice) sums of
squares as one stacked vector; everything else (global norm, z-scores,
culprit, first non-finite leaf) is scalar and vector arithmetic on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradtransforms import _checks, _layout, _norms, _stats, _xla
from gradtransforms._layout import LayerAxes, PerLeaf
from gradtransforms._registry import info, register

_I32, _F32 = jnp.int32, jnp.float32


@register("detect_spikes", (
    "step", "norm", "loss", "norm_zscore", "loss_zscore", "norm_spike",
    "loss_spike", "nonfinite", "norm_spike_count", "loss_spike_count",
    "nonfinite_count", "culprit", "culprit_step", "first_nonfinite_step",
    "first_nonfinite_leaf", "nonfinite_since", "layer_zscore", "layer_spike_count", "sigma_zscore",
    "sigma_spike_count"), {
        "global_norm": "norm", "loss": "loss", "culprit": "culprit",
        "culprit_step": "culprit_step",
        "first_nonfinite_leaf": "first_nonfinite_leaf",
        "first_nonfinite_step": "first_nonfinite_step"})
class DetectSpikesState(NamedTuple):
  """Detector state.

  Statistics: ``norm_stats`` (of ``log ||g||``), ``loss_stats``, and per
  leaf (per layer slice) the EMA of ``log ||g_i||`` (``leaf_log_mean``) and
  how many positive, finite norms it has seen (``leaf_observed``), stacked
  vectors. Figures of the last step: ``norm``, ``loss`` (NaN if none was
  passed), z-scores (0 during warm-up), flags. Counts so far. Step indices
  are 0-based indices of ``update`` calls (``step`` counts the calls):
  ``culprit`` is the segment whose log-norm rose most over its own mean at
  the last spike or non-finite step (non-finite segments first, zero or
  empty ones never; -1: none yet), ``culprit_step`` that step; the first
  step with a non-finite gradient and its lowest-index non-finite segment;
  ``nonfinite_since``, per segment, the first step it was non-finite (-1:
  never). Names of segments: ``gt.culprits(state)``.

  Optional rules (their fields stay 0/False while off): per segment, the
  EMA variance of ``log ||g_i||`` (``leaf_log_var``), ``layer_zscore`` the
  largest per-segment z-score of the step and ``layer_spike`` whether it
  exceeded ``layer_z_thresh``; ``raw_stats`` the EMA mean/variance of the
  raw norm ``||g||``, ``sigma_zscore = (||g|| - mean) / std`` and
  ``sigma_spike`` whether it exceeded ``norm_sigma``.
  """
  step: jax.Array
  norm_stats: _stats.SeriesStats
  loss_stats: _stats.SeriesStats
  leaf_log_mean: PerLeaf
  leaf_observed: PerLeaf
  norm: jax.Array
  loss: jax.Array
  norm_zscore: jax.Array
  loss_zscore: jax.Array
  norm_spike: jax.Array
  loss_spike: jax.Array
  nonfinite: jax.Array
  norm_spike_count: jax.Array
  loss_spike_count: jax.Array
  nonfinite_count: jax.Array
  culprit: jax.Array
  culprit_step: jax.Array
  first_nonfinite_step: jax.Array
  first_nonfinite_leaf: jax.Array
  nonfinite_since: PerLeaf
  leaf_log_var: PerLeaf
  raw_stats: _stats.SeriesStats
  layer_zscore: jax.Array
  layer_spike: jax.Array
  layer_spike_count: jax.Array
  sigma_zscore: jax.Array
  sigma_spike: jax.Array
  sigma_spike_count: jax.Array


def init_state(params: Any, layer_axes: LayerAxes = None) -> DetectSpikesState:
  lay = _layout.layout(params, layer_axes)
  z, f, i = jnp.zeros((), _F32), jnp.zeros((), jnp.bool_), jnp.zeros((), _I32)
  neg = jnp.full((), -1, _I32)
  return _xla.fresh(DetectSpikesState(
      step=i, norm_stats=_stats.series_init(), loss_stats=_stats.series_init(),
      leaf_log_mean=_layout.zeros(lay), leaf_observed=_layout.zeros(lay, _I32),
      norm=z, loss=jnp.full((), jnp.nan, _F32), norm_zscore=z, loss_zscore=z,
      norm_spike=f, loss_spike=f, nonfinite=f, norm_spike_count=i,
      loss_spike_count=i, nonfinite_count=i, culprit=neg, culprit_step=neg,
      first_nonfinite_step=neg, first_nonfinite_leaf=neg,
      nonfinite_since=_layout.zeros(lay, _I32, fill=-1),
      leaf_log_var=_layout.zeros(lay), raw_stats=_stats.series_init(),
      layer_zscore=z, layer_spike=f, layer_spike_count=i, sigma_zscore=z,
      sigma_spike=f, sigma_spike_count=i))


def scalar_loss(value: Any, what: str) -> jax.Array:
  """The ``value=`` extra argument as a float32 scalar, or a clear error."""
  v = jnp.asarray(value)
  if v.size != 1:
    raise ValueError(f"{what}: value= must be the scalar loss, got an array of "
                     f"shape {v.shape}")
  return v.astype(_F32).reshape(())


def rule(z_thresh, warmup_steps, decay, loss_z_thresh, axis_name, layer_axes,
         layer_z_thresh=None, norm_sigma=None) -> dict[str, Any]:
  """Validates the spike rules' arguments; returns :func:`observe`'s kwargs.
  ``layer_z_thresh``/``norm_sigma`` None: that rule is off."""
  _checks.bound("z_thresh", z_thresh, strict=True)
  warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1,
                                  static=False)
  _checks.in_range("decay", decay, 0.0, 1.0, hi_open=True)
  loss_z_thresh = z_thresh if loss_z_thresh is None else loss_z_thresh
  _checks.bound("loss_z_thresh", loss_z_thresh, strict=True)
  if layer_z_thresh is not None:
    _checks.bound("layer_z_thresh", layer_z_thresh, strict=True)
  if norm_sigma is not None:
    _checks.bound("norm_sigma", norm_sigma, strict=True)
  return dict(z_thresh=z_thresh, loss_z_thresh=loss_z_thresh,
              layer_z_thresh=layer_z_thresh, norm_sigma=norm_sigma,
              warmup_steps=warmup_steps, decay=decay, axis_name=axis_name,
              layer_axes=_layout.check_layer_axes(layer_axes))


def observe(state: DetectSpikesState, updates: Any, loss: Any, *, z_thresh: Any,
            loss_z_thresh: Any, warmup_steps: int, decay: Any,
            axis_name: str | None, layer_axes: LayerAxes,
            layer_z_thresh: Any = None, norm_sigma: Any = None,
            what: str = "detect_spikes", sums: Any = None
            ) -> DetectSpikesState:
  """One detection step (pure): one read of the gradients, then scalar and
  per-segment vector arithmetic on their sums of squares (``sums``, as
  ``_norms.sums`` gives them, when the caller computed them)."""
  leaves = jax.tree.leaves(updates)
  lay = _layout.layout(updates, layer_axes)
  _layout.check_names(lay, state.leaf_log_mean, what)
  if sums is None:
    sums = _norms.sums(leaves, lay, axis_name, recorded=True)
  sq = sums.stacked
  n = jnp.sqrt(sums.total)
  finite = jnp.isfinite(n)
  norm_stats, norm_z, norm_spike = _stats.series_observe(
      state.norm_stats, jnp.log(n), decay, z_thresh, warmup_steps)
  loss_given = loss is not None
  if loss is None:
    # computed from the step count (never negative), not constants: a
    # constant output costs XLA:GPU a copy kernel into its donated buffer
    never = state.step < 0
    loss = jnp.where(never, 0.0, jnp.nan).astype(_F32)
    loss_stats, loss_z = state.loss_stats, jnp.where(never, 1.0, 0.0).astype(_F32)
    loss_spike, nonfinite = never, ~finite
  else:
    loss = scalar_loss(loss, what)
    loss_stats, loss_z, loss_spike = _stats.series_observe(
        state.loss_stats, loss, decay, loss_z_thresh, warmup_steps)
    nonfinite = ~finite | ~jnp.isfinite(loss)
  raw_stats, sigma_z, sigma_spike = state.raw_stats, state.sigma_zscore, \
      jnp.zeros((), jnp.bool_)
  if norm_sigma is not None:  # mean + k sigma of the raw norm
    raw_stats, sigma_z, sigma_spike = _stats.series_observe(
        state.raw_stats, n, decay, norm_sigma, warmup_steps)
  segs = _segments(state, sq, norm_spike, decay, layer_z_thresh, warmup_steps)
  # a rule that is off passes its old (constant) figures on: a new constant
  # costs a copy kernel per figure on GPU
  off = {"layer": layer_z_thresh is None, "sigma": norm_sigma is None,
         "loss": not loss_given}
  return _assemble(state, segs, lay.size, off, n=n, finite=finite, loss=loss,
                   norm_stats=norm_stats, loss_stats=loss_stats, norm_z=norm_z,
                   loss_z=loss_z, norm_spike=norm_spike, loss_spike=loss_spike,
                   nonfinite=nonfinite, raw_stats=raw_stats, sigma_z=sigma_z,
                   sigma_spike=sigma_spike)


def _segments(state, sq, norm_spike, decay, layer_z_thresh, warmup_steps):
  """Per-segment statistics, the per-layer rule, and what attribution needs."""
  bad_leaf = ~jnp.isfinite(sq)
  pos = (sq > 0) & ~bad_leaf
  log_leaf = 0.5 * jnp.log(jnp.where(pos, sq, 1.0))
  mean, seen = state.leaf_log_mean.values, state.leaf_observed.values
  var = state.leaf_log_var.values
  rated = pos & (seen > 0)  # a finite, non-zero norm with a running mean
  growth = jnp.where(bad_leaf, jnp.inf,
                     jnp.where(rated, log_leaf - mean, -jnp.inf))
  fold = pos & ~norm_spike
  layer_z, layer_spike = state.layer_zscore, jnp.zeros((), jnp.bool_)
  a = _stats.warm_alpha(decay, seen)  # per segment, from its own count
  new_mean = jnp.where(fold, a * mean + (1 - a) * log_leaf, mean)
  new_var = var
  if layer_z_thresh is not None:
    warm = rated & (seen >= warmup_steps)
    z = jnp.where(warm, (log_leaf - mean) / (jnp.sqrt(var) + 1e-6), 0.0)
    hit = warm & (z > layer_z_thresh)
    layer_z = jnp.max(z, initial=0.0)
    layer_spike = jnp.any(hit)
    # a spiking segment enters its statistics clamped, as the global rule
    x = jnp.where(hit, mean + layer_z_thresh * jnp.sqrt(var), log_leaf)
    new_mean = jnp.where(fold, a * mean + (1 - a) * x, mean)
    new_var = jnp.where(fold, a * var + (1 - a) * jnp.square(x - new_mean), var)
  return dict(bad_leaf=bad_leaf, rated=rated, growth=growth,
              mean=new_mean, var=new_var,
              seen=jnp.where(fold, _stats.inc(seen), seen), layer_z=layer_z,
              layer_spike=layer_spike)


def _max_first(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(max(x), argmax(x))`` of a vector without NaN, the lowest index
  among ties (as ``jnp.argmax``), as one reduction."""
  def pick(a, b):
    first = (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
    return jnp.where(first, a[0], b[0]), jnp.where(first, a[1], b[1])
  return jax.lax.reduce(
      (x, jnp.arange(x.shape[0], dtype=_I32)),
      (jnp.asarray(-jnp.inf, x.dtype), jnp.asarray(_stats.I32_MAX, _I32)),
      pick, (0,))


def _assemble(state, g, size, off, *, n, finite, loss, norm_stats, loss_stats,
              norm_z, loss_z, norm_spike, loss_spike, nonfinite, raw_stats,
              sigma_z, sigma_spike) -> DetectSpikesState:
  at = state.step  # this step's index
  spike = norm_spike | g["layer_spike"] | sigma_spike
  since = state.nonfinite_since.values
  since = jnp.where(g["bad_leaf"] & (since < 0), at, since)
  first_now = ~finite & (state.first_nonfinite_step < 0)
  if size:
    # growth is +inf exactly for a non-finite segment, finite for a rated
    # one, -inf otherwise: its max and first argmax (one reduction) give
    # whether any segment is blamable, the culprit, and the first
    # non-finite segment (jnp.any and two argmaxes: TPU 3 kernels)
    top, at_top = _max_first(g["growth"])
    event = (spike | nonfinite) & (top > -jnp.inf)
    culprit = jnp.where(event, at_top, state.culprit)
    first_leaf = jnp.where(first_now, jnp.where(top == jnp.inf, at_top, 0),
                           state.first_nonfinite_leaf)
  else:
    event = jnp.zeros((), jnp.bool_)
    culprit, first_leaf = state.culprit, state.first_nonfinite_leaf

  def count(old, flag, rule):
    return old if off[rule] else _stats.inc(old, flag)
  # An off rule's flag passed on unchanged: XLA:GPU copied each such donated
  # bool scalar in a kernel of its own; ``& live`` (always True, not to
  # XLA) makes it one more output of the bookkeeping's kernel (H100, 8
  # leaves: detect_spikes 27 -> 26 kernels, guard 36 -> 34; rewind 35 -> 36,
  # which _snapshot.prepare's computed loop flags took back)
  live = state.step >= 0
  return DetectSpikesState(
      step=_stats.inc(state.step), norm_stats=norm_stats, loss_stats=loss_stats,
      leaf_log_mean=state.leaf_log_mean.replace(g["mean"]),
      leaf_observed=state.leaf_observed.replace(g["seen"]), norm=n, loss=loss,
      norm_zscore=norm_z, loss_zscore=loss_z, norm_spike=norm_spike,
      loss_spike=loss_spike, nonfinite=nonfinite,
      norm_spike_count=_stats.inc(state.norm_spike_count, norm_spike),
      loss_spike_count=count(state.loss_spike_count, loss_spike, "loss"),
      nonfinite_count=_stats.inc(state.nonfinite_count, nonfinite),
      culprit=culprit, culprit_step=jnp.where(event, at, state.culprit_step),
      first_nonfinite_step=jnp.where(first_now, at, state.first_nonfinite_step),
      first_nonfinite_leaf=first_leaf,
      nonfinite_since=state.nonfinite_since.replace(since),
      leaf_log_var=state.leaf_log_var.replace(g["var"]), raw_stats=raw_stats,
      layer_zscore=g["layer_z"],
      layer_spike=(state.layer_spike & live) if off["layer"] else g["layer_spike"],
      layer_spike_count=count(state.layer_spike_count, g["layer_spike"],
                              "layer"),
      sigma_zscore=sigma_z,
      sigma_spike=(state.sigma_spike & live) if off["sigma"] else sigma_spike,
      sigma_spike_count=count(state.sigma_spike_count, sigma_spike, "sigma"))


def event_figures(state: Any) -> dict[str, jax.Array]:
  """A registered state's scalar figures (per-leaf ones left out), for
  ``on_event``; ``step`` is given as the 0-based index of the step."""
  figs = {f: getattr(state, f) for f in info(type(state)).figures}
  figs = {k: v for k, v in figs.items() if not isinstance(v, PerLeaf)}
  if "step" in figs:
    figs["step"] = figs["step"] - 1
  return figs
