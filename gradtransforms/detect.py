"""``detect_spikes``: NaN-proof norm and loss spike detection with layer attribution."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _events
from gradtransforms import _norms
from gradtransforms import _stats
from gradtransforms import _xla
from gradtransforms._reading import metrics
from gradtransforms._registry import register

_I32 = jnp.int32


@register("detect_spikes", (
    "step", "norm", "loss", "norm_zscore", "loss_zscore", "norm_spike",
    "loss_spike", "nonfinite", "norm_spikes", "loss_spikes", "nonfinite_steps",
    "culprit", "culprit_step", "first_nonfinite_step", "first_nonfinite_leaf",
    "leaf_first_nonfinite"))
class DetectSpikesState(NamedTuple):
  """Detector state. Statistics: ``norm_stats`` (of log-norm), ``loss_stats``
  and ``leaf_log_mean`` (per-leaf EMA of log-norm, in leaf order).

  Figures: the last step's ``norm``, ``loss``, z-scores and flags; running
  counts; ``culprit`` (leaf index, in ``gt.leaf_names(params)`` order, with
  the largest log-norm growth over its running mean at the last spike or
  non-finite step, -1 if none) and ``culprit_step``; the first step with a
  non-finite gradient and its lowest-index non-finite leaf; and, per leaf,
  the first step it went non-finite (-1: never).
  """
  step: jax.Array
  norm_stats: _stats.SeriesStats
  loss_stats: _stats.SeriesStats
  leaf_log_mean: jax.Array
  norm: jax.Array
  loss: jax.Array
  norm_zscore: jax.Array
  loss_zscore: jax.Array
  norm_spike: jax.Array
  loss_spike: jax.Array
  nonfinite: jax.Array
  norm_spikes: jax.Array
  loss_spikes: jax.Array
  nonfinite_steps: jax.Array
  culprit: jax.Array
  culprit_step: jax.Array
  first_nonfinite_step: jax.Array
  first_nonfinite_leaf: jax.Array
  leaf_first_nonfinite: optax.Updates


@_xla.fresh_state
def init_state(params: Any) -> DetectSpikesState:
  n_leaves = len(jax.tree.leaves(params))
  z, f, i, neg = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.bool_),
                  jnp.zeros((), _I32), jnp.full((), -1, _I32))
  return DetectSpikesState(
      i, _stats.series_init(), _stats.series_init(), jnp.zeros((n_leaves,), jnp.float32), z,
      jnp.full((), jnp.nan, jnp.float32), z, z, f, f, f, i, i, i, neg, neg, neg, neg,
      jax.tree.map(lambda _: neg, params))


def observe(state: DetectSpikesState, updates: Any, loss: Any, *,
            z_thresh: Any, loss_z_thresh: Any, warmup_steps: int, alpha: Any,
            axis_name: str | None) -> DetectSpikesState:
  """One detection step (pure): the shared core of detect_spikes and guard."""
  leaves, treedef = jax.tree.flatten(updates)
  n, leaf_n = _norms.norms(leaves, axis_name)
  finite = jnp.isfinite(n)
  has_loss = loss is not None
  norm_stats, norm_z, norm_spike = _stats.series_observe(
      state.norm_stats, jnp.log(n), alpha, z_thresh, warmup_steps)
  if not has_loss:
    loss = jnp.full((), jnp.nan)
    loss_stats, loss_z, loss_spike = state.loss_stats, jnp.zeros(()), False
  else:
    loss = jnp.asarray(loss, jnp.float32).reshape(())
    loss_stats, loss_z, loss_spike = _stats.series_observe(
        state.loss_stats, loss, alpha, loss_z_thresh, warmup_steps)
  loss_spike = jnp.asarray(loss_spike)
  nonfinite = ~finite | ~jnp.isfinite(loss) if has_loss else ~finite

  # Layer attribution: growth of each leaf's log-norm over its running mean.
  log_leaf = jnp.log(leaf_n)
  seen = state.norm_stats.count > 0
  growth = jnp.where(jnp.isfinite(log_leaf), log_leaf - state.leaf_log_mean,
                     jnp.inf)
  event = norm_spike | nonfinite
  culprit = jnp.where(event & seen, jnp.argmax(growth).astype(_I32),
                      state.culprit)
  culprit_step = jnp.where(event & seen, state.step, state.culprit_step)
  a = _stats.warm_alpha(alpha, state.norm_stats.count)
  leaf_ok = jnp.isfinite(log_leaf) & ~norm_spike
  leaf_log_mean = jnp.where(leaf_ok, a * state.leaf_log_mean + (1 - a) * log_leaf,
                            state.leaf_log_mean)

  bad_leaf = ~jnp.isfinite(leaf_n)
  first_leaf_list = [jnp.where(b & (f < 0), state.step, f) for b, f in zip(
      bad_leaf, jax.tree.leaves(state.leaf_first_nonfinite))]
  first_now = ~finite & (state.first_nonfinite_step < 0)
  first_step = jnp.where(first_now, state.step, state.first_nonfinite_step)
  first_leaf = jnp.where(first_now, jnp.argmax(bad_leaf).astype(_I32),
                         state.first_nonfinite_leaf)
  as_i = lambda x: jnp.asarray(x).astype(_I32)
  return DetectSpikesState(
      state.step + 1, norm_stats, loss_stats, leaf_log_mean, n, loss, norm_z,
      loss_z, norm_spike, loss_spike, nonfinite,
      state.norm_spikes + as_i(norm_spike), state.loss_spikes + as_i(loss_spike),
      state.nonfinite_steps + as_i(nonfinite), culprit, culprit_step,
      first_step, first_leaf, jax.tree.unflatten(treedef, first_leaf_list))


def spike_rule(z_thresh, warmup_steps, alpha, loss_z_thresh, axis_name
               ) -> dict[str, Any]:
  """Validates the spike rule's arguments; returns :func:`observe`'s kwargs."""
  _checks.positive("z_thresh", z_thresh)
  warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1)
  _checks.in_range("alpha", alpha, 0.0, 1.0, hi_open=True)
  loss_z_thresh = z_thresh if loss_z_thresh is None else loss_z_thresh
  _checks.positive("loss_z_thresh", loss_z_thresh)
  return dict(z_thresh=z_thresh, loss_z_thresh=loss_z_thresh,
              warmup_steps=warmup_steps, alpha=alpha, axis_name=axis_name)


def event_figures(state: DetectSpikesState) -> dict[str, jax.Array]:
  return {k.split("/", 1)[1]: v for k, v in metrics(state).items()
          if "leaf_first_nonfinite" not in k}


def detect_spikes(z_thresh: float = 6.0, warmup_steps: int = 20,
                  alpha: float = 0.98, loss_z_thresh: float | None = None, *,
                  on_event: Callable[[dict], Any] | None = None,
                  axis_name: str | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  """Flags gradient-norm spikes, loss spikes and non-finite gradients.

  Updates pass unchanged. Norm spikes are scored on ``log ||g||`` (spikes
  are multiplicative), loss spikes on the loss given as the extra argument
  ``value=loss`` (``tx.update(g, state, params, value=loss)``, as
  ``optax.contrib.reduce_on_plateau``). Each series keeps an EMA mean and
  variance (factor ``alpha``); ``z = (x - mean) / (std + 1e-6)``, and a spike
  is ``z > z_thresh`` once ``warmup_steps`` finite values were seen.
  NaN-proof: a non-finite gradient norm or loss sets ``nonfinite`` and never
  enters the statistics,
  and a spike enters them clamped to ``mean + z_thresh * std``.

  Layer attribution: at a norm spike or non-finite step, ``culprit`` is the
  leaf whose ``log ||g_i||`` rose most over its own running mean
  (non-finite leaves first); names via :func:`culprits`.

  State: :class:`DetectSpikesState`.

  Args:
    z_thresh: z-score of ``log ||g||`` that counts as a spike, > 0.
    warmup_steps: finite steps before spikes are flagged (static), >= 1.
    alpha: EMA factor in [0, 1). 0.98 ~ a 50-step window.
    loss_z_thresh: z-score of the loss that counts as a spike; default
      ``z_thresh``.
    on_event: optional host hook, called through ``jax.debug.callback`` with
      the figures (numpy) on steps with a spike or non-finite value. Off
      (None) by default: nothing is traced then.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  rule = spike_rule(z_thresh, warmup_steps, alpha, loss_z_thresh, axis_name)
  _events.check_hook(on_event)

  def update_fn(updates, state, params=None, **extra):
    del params
    _checks.float_leaves("updates", updates)
    new = observe(state, updates, extra.get("value"), **rule)
    _events.emit(on_event, new.norm_spike | new.loss_spike | new.nonfinite,
                 event_figures(new))
    return _xla.detach(updates, new)

  return optax.GradientTransformationExtraArgs(init_state, update_fn)
