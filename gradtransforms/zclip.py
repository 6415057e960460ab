"""ZClip: z-score based adaptive clipping of the global norm.

Non-finite and zero norms are not observations: unlike the reference
(where one NaN poisons the EMA for good, and zero gradients during
warm-up give ``mu = var = 0``, after which every norm is a spike clipped
to 0, forever) such a norm is not counted, does not touch the buffer or
the statistics, and its update passes unchanged (a zero update stays
zero). So warm-up ends after ``warmup_steps`` finite non-zero norms, and a
stretch of zero gradients leaves the statistics as they were. On finite
non-zero norms the numbers are the reference's. An empty tree has norm 0
and passes through.
"""

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

# The reference's clip coefficient, as torch's clip_grad_norm_: max / (n + 1e-6).
_TORCH_EPS = 1e-6


@register("zclip", ("norm", "threshold", "clipped", "spike", "zscore", "mean",
                    "var", "observed"),
          {"global_norm": "norm", "threshold": "threshold", "clipped": "clipped"})
class ZClipState(NamedTuple):
  """``warmup``: norms of the warm-up steps; ``observed``: finite, non-zero
  norms seen (saturates at 2**31 - 1); ``mean``/``var``: the EMA statistics
  (valid once ``observed >= warmup_steps``).

  ``norm``, ``threshold`` (the effective clip value), ``clipped``, ``spike``
  and ``zscore`` (0 during warm-up) are the last step's figures.
  """
  warmup: jax.Array
  observed: jax.Array
  mean: jax.Array
  var: jax.Array
  norm: jax.Array
  threshold: jax.Array
  clipped: jax.Array
  spike: jax.Array
  zscore: jax.Array


def _validate(decay, z_thresh, max_grad_norm, eps, warmup_steps, mode,
              clip_option, clip_factor, skip_update_on_spike, axis_name):
  """Checks zclip's arguments; returns the normalised static ones."""
  _checks.in_range("decay", decay, 0.0, 1.0, hi_open=True)
  _checks.axis_name("axis_name", axis_name)
  _checks.positive("z_thresh", z_thresh, allow_inf=True)
  if max_grad_norm is not None:
    _checks.bound("max_grad_norm", max_grad_norm)
  _checks.nonnegative("eps", eps)
  warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1)
  mode = _checks.one_of("mode", mode.lower() if isinstance(mode, str) else mode,
                        ("zscore", "percentile"))
  clip_option = _checks.one_of("clip_option", clip_option,
                               ("adaptive_scaling", "mean"))
  _checks.positive("clip_factor", clip_factor)
  skip_update_on_spike = _checks.boolean("skip_update_on_spike",
                                         skip_update_on_spike)
  return mode, clip_option, skip_update_on_spike, warmup_steps


def _clip_value(state, n, z, std, *, mode, clip_option, z_thresh,
                clip_factor):
  """The spike test and its clip value against the EMA statistics."""
  if mode == "percentile":
    clip_val = state.mean + z_thresh * std
    spike = n > clip_val
  else:
    spike = z > z_thresh
    if clip_option == "adaptive_scaling":
      clip_val = clip_factor * (state.mean + z_thresh * std / (z / z_thresh))
    else:
      clip_val = state.mean
  return clip_val, spike


def zclip(decay: float = 0.97, z_thresh: float = 2.5,
          max_grad_norm: float | None = 1.0, eps: float = 1e-6,
          warmup_steps: int = 25, mode: str = "zscore",
          clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
          skip_update_on_spike: bool = False, *, axis_name: str | None = None
          ) -> optax.GradientTransformation:
  """ZClip (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training"), step for step as the authors' reference implementation.

  Warm-up (the first ``warmup_steps`` finite non-zero norms): the norms are
  buffered and the update is clipped to ``max_grad_norm``; at the last
  warm-up step ``mu = mean(buffer)``, ``var = mean((buffer - mu)**2)``.

  Afterwards, with ``sigma = sqrt(var)`` and ``z = (n - mu) / (sigma + eps)``:

  * ``mode="zscore"``: a spike is ``z > z_thresh``; its clip value is
    ``clip_factor * (mu + z_thresh**2 * sigma / z)`` (``"adaptive_scaling"``)
    or ``mu`` (``clip_option="mean"``).
  * ``mode="percentile"``: a spike is ``n > mu + z_thresh * sigma``, clipped
    to that value.

  The effective bound is ``min(clip value if spike else n, max_grad_norm)``
  and the update is scaled by ``bound / (n + 1e-6)`` where ``n > bound``.
  Then ``mu <- decay mu + (1 - decay) x``,
  ``var <- decay var + (1 - decay) (x - mu)**2`` with ``x`` the clip value on
  a spike and ``n`` otherwise (skipped on a spike if
  ``skip_update_on_spike``).

  Non-finite and zero norms: see the module docstring.

  State: :class:`ZClipState`. Defaults are the reference's.

  Args:
    decay: the EMA's decay in [0, 1) (the reference's ``alpha``).
    z_thresh: z-score threshold, > 0 (``inf``: no spike is ever detected).
    max_grad_norm: absolute cap on the norm, or None (or ``inf``: no cap).
    eps: added to sigma in the z-score.
    warmup_steps: number of norms before the EMA starts (static), >= 1.
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: ``"adaptive_scaling"`` or ``"mean"`` (zscore mode only).
    clip_factor: multiplier of the adaptive threshold, > 0.
    skip_update_on_spike: keep the statistics unchanged on a spike (a bool).
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  mode, clip_option, skip_update_on_spike, warmup_steps = _validate(
      decay, z_thresh, max_grad_norm, eps, warmup_steps, mode, clip_option,
      clip_factor, skip_update_on_spike, axis_name)
  cap = jnp.inf if max_grad_norm is None else max_grad_norm

  @_xla.fresh_state
  def init_fn(params):
    del params
    z = jnp.zeros((), jnp.float32)
    f = jnp.zeros((), jnp.bool_)
    return ZClipState(warmup=jnp.zeros((warmup_steps,), jnp.float32),
                      observed=jnp.zeros((), jnp.int32), mean=z, var=z, norm=z,
                      threshold=z, clipped=f, spike=f, zscore=z)

  @_read_once.reads_once
  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    n = _norms.global_norm(updates, axis_name)
    ok = jnp.isfinite(n) & (n > 0)  # an observation
    ready = state.observed >= warmup_steps  # EMA initialised before this step

    # Warm-up: buffer the norm; initialise the EMA at the last warm-up step.
    buf, observed = _stats.ring_push(state.warmup, state.observed, n,
                                     ok & ~ready)
    pop_mean = jnp.mean(buf)
    pop_var = jnp.mean(jnp.square(buf - pop_mean))
    init_now = ~ready & (observed == warmup_steps)

    # Spike test and clip value against the EMA.
    std = jnp.sqrt(state.var)
    z = _stats.zscore(_stats.MeanVar(state.mean, state.var), n, eps)
    clip_val, spike = _clip_value(state, n, z, std, mode=mode,
                                  clip_option=clip_option, z_thresh=z_thresh,
                                  clip_factor=clip_factor)
    spike = ready & ok & spike
    bound = jnp.where(ready, jnp.minimum(jnp.where(spike, clip_val, n), cap),
                      cap)
    s = _norms.clip_scale(n, bound, eps=_TORCH_EPS)

    x = jnp.where(spike, clip_val, n)
    ema_ok = ready & ok
    if skip_update_on_spike:
      ema_ok = ema_ok & ~spike
    stats = _stats.ema_mean_var(_stats.MeanVar(state.mean, state.var), x, decay,
                             ema_ok)
    mean = jnp.where(init_now, pop_mean, stats.mean)
    var = jnp.where(init_now, pop_var, stats.var)
    observed = jnp.where(ready, _stats.inc(state.observed, ok), observed)
    new_state = ZClipState(warmup=buf, observed=observed, mean=mean, var=var,
                           norm=n, threshold=bound, clipped=s < 1, spike=spike,
                           zscore=jnp.where(ready, z, 0.0))
    return _norms.scale_tree(updates, s), new_state

  return optax.GradientTransformation(init_fn, update_fn)
