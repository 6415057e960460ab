"""``detect_spikes``: NaN-proof norm and loss spike detection with layer attribution."""

from __future__ import annotations

from typing import Any, Callable

import optax

from gradtransforms import _checks, _events, _read_once, _spikes, _xla
from gradtransforms._layout import LayerAxes
from gradtransforms._spikes import DetectSpikesState

__all__ = ["DetectSpikesState", "detect_spikes"]


def detect_spikes(z_thresh: float = 6.0, warmup_steps: int = 20,
                  decay: float = 0.98, loss_z_thresh: float | None = None, *,
                  layer_axes: LayerAxes = None,
                  layer_z_thresh: float | None = None,
                  norm_sigma: float | None = None,
                  on_event: Callable[[dict], Any] | None = None,
                  axis_name: str | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  """Flags gradient-norm spikes, loss spikes and non-finite gradients.

  Updates pass unchanged. Norm spikes are scored on ``log ||g||`` (spikes
  are multiplicative), loss spikes on the loss given as the extra argument
  ``value=loss`` (``tx.update(g, state, params, value=loss)``, as
  ``optax.contrib.reduce_on_plateau``). Each series keeps an EMA mean and
  variance (decay ``decay``, the first steps an exact running mean);
  ``z = (x - mean) / (std + 1e-6)`` (0 during warm-up), and a spike is
  ``z > z_thresh`` once ``warmup_steps`` finite values were seen.
  NaN-proof: a non-finite gradient norm or loss sets ``nonfinite`` and never
  enters the statistics; a spike enters them clamped to
  ``mean + z_thresh * std``; a zero gradient is not an observation.

  Layer attribution: at a norm spike or non-finite step, ``culprit`` is the
  leaf (with ``layer_axes``: the layer slice) whose ``log ||g_i||`` rose
  most over its own running mean (non-finite ones first, zero or empty
  leaves never); names via :func:`gradtransforms.culprits`.

  Optional rules, off (None) by default, on the same sums of squares (no
  further read of the gradients): ``layer_z_thresh`` flags
  ``layer_spike`` when any segment's ``z(log ||g_i||)`` against its own
  EMA mean and variance exceeds it (a fault in one small layer that the
  global norm hides); ``norm_sigma`` flags ``sigma_spike`` when ``||g|| >
  mean + norm_sigma * std`` of the raw norm (EMA statistics; the rule of
  OLMo-core, Levanter, MaxText, which keep a 128-step window). Both
  warm up for ``warmup_steps`` and take a spike in clamped, as above.

  State: :class:`DetectSpikesState` (its array count does not depend on
  the number of leaves).

  Args:
    z_thresh: z-score of ``log ||g||`` that counts as a spike, > 0 (+inf:
      never).
    warmup_steps: finite steps before spikes are flagged (static), >= 1.
    decay: EMA decay in [0, 1). 0.98 ~ a 50-step window.
    loss_z_thresh: z-score of the loss that counts as a spike; default
      ``z_thresh``.
    layer_z_thresh: per-segment z-score that counts as a layer spike, > 0;
      None: rule off.
    norm_sigma: ``k`` of the raw-norm ``mean + k * std`` rule, > 0; None:
      rule off.
    layer_axes: stacked-layer axes, as in
      :func:`gradtransforms.clip_by_leaf_norm`: statistics and attribution
      per layer slice.
    on_event: optional host hook, called through ``jax.debug.callback`` with
      the figures (numpy; ``culprit`` as a leaf name) on steps with a spike
      or non-finite value. Off (None) by default: nothing is traced then.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  kw = _spikes.rule(z_thresh, warmup_steps, decay, loss_z_thresh, axis_name,
                    layer_axes, layer_z_thresh, norm_sigma)
  _events.check_hook(on_event)

  def init_fn(params):
    return _spikes.init_state(params, kw["layer_axes"])

  def update_fn(updates, state, params=None, **extra):
    del params
    _checks.float_leaves("updates", updates)
    state, restore = _read_once.read_once(state, bools_as_words=True)
    new = restore(_spikes.observe(state, updates, extra.get("value"), **kw))
    _events.emit(on_event, new.norm_spike | new.loss_spike | new.nonfinite
                 | new.layer_spike | new.sigma_spike,
                 _spikes.event_figures(new), new.leaf_log_mean.names)
    return _xla.detach(updates, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
