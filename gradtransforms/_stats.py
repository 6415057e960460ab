"""Running statistics: EMA mean/variance, z-scores, ring buffers, quantiles.

Every adaptive transform and detector keeps its statistics through this
module. Non-finite observations are never folded in (each update takes an
``ok`` mask), and counters saturate instead of wrapping.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
I32 = jnp.int32
_I32_MAX = 2**31 - 1
I32_MAX = _I32_MAX  # the value a saturated counter reads


def inc(count: jax.Array, by: Any = 1) -> jax.Array:
  """``count + by`` for an int32 counter, saturating at 2**31 - 1 (a run of
  more steps reads the maximum instead of wrapping to a negative count)."""
  by = jnp.asarray(by).astype(count.dtype)
  return jnp.where(count > _I32_MAX - by, _I32_MAX, count + by).astype(count.dtype)


class MeanVar(NamedTuple):
  """Exponential moving mean and variance of a scalar (or array) series."""
  mean: jax.Array
  var: jax.Array


def ema_mean_var(stats: MeanVar, x: jax.Array, alpha: Any,
                 ok: jax.Array | bool = True) -> MeanVar:
  """One EMA step, skipped where ``ok`` is False (e.g. ``x`` non-finite).

  ``mean' = alpha * mean + (1 - alpha) * x``
  ``var'  = alpha * var  + (1 - alpha) * (x - mean')**2``

  (the ZClip reference's form: the deviation uses the *updated* mean.)
  """
  alpha = jnp.asarray(alpha, F32)
  mean = alpha * stats.mean + (1 - alpha) * x
  var = alpha * stats.var + (1 - alpha) * jnp.square(x - mean)
  return MeanVar(jnp.where(ok, mean, stats.mean), jnp.where(ok, var, stats.var))


def zscore(stats: MeanVar, x: jax.Array, eps: Any = 1e-6) -> jax.Array:
  """``(x - mean) / (sqrt(var) + eps)``."""
  return (x - stats.mean) / (jnp.sqrt(stats.var) + eps)


def ring_push(buffer: jax.Array, count: jax.Array, x: jax.Array,
              ok: jax.Array | bool = True) -> tuple[jax.Array, jax.Array]:
  """Writes ``x`` at slot ``count % len(buffer)`` if ``ok``; returns (buf, count)."""
  buffer = jnp.asarray(buffer)  # restored checkpoints hold NumPy arrays
  slot = count % buffer.shape[0]
  new = buffer.at[slot].set(jnp.where(ok, x, buffer[slot]))
  return new, inc(count, jnp.asarray(ok, count.dtype))


def percentile(buffer: jax.Array, count: jax.Array, q: Any) -> jax.Array:
  """``numpy.percentile(buffer[:n], q)`` (linear method), n = min(count, len).

  The valid entries are the first ``n`` slots of a ring buffer (their order
  does not matter). Returns NaN when ``count == 0``.
  """
  size = buffer.shape[0]
  n = jnp.minimum(count, size)
  valid = jnp.arange(size) < n
  v = jnp.sort(jnp.where(valid, buffer, jnp.inf))
  pos = (n - 1).astype(F32) * (jnp.asarray(q, F32) / 100.0)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, size - 1)
  hi = jnp.clip(lo + 1, 0, jnp.maximum(n - 1, 0))
  t = pos - lo.astype(F32)
  a, b = v[lo], v[hi]
  out = jnp.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
  return jnp.where(n > 0, out, jnp.nan)


def warm_alpha(alpha: Any, count: jax.Array) -> jax.Array:
  """EMA factor ``min(alpha, k / (k + 1))`` after ``k`` observations: the
  first steps give the exact running mean instead of a bias towards 0."""
  k = count.astype(F32)
  return jnp.minimum(jnp.asarray(alpha, F32), k / (k + 1.0))


class SeriesStats(NamedTuple):
  """Running statistics of a scalar series, for spike detection."""
  mean: jax.Array
  var: jax.Array
  count: jax.Array  # finite observations so far


def series_init() -> SeriesStats:
  return SeriesStats(mean=jnp.zeros((), F32), var=jnp.zeros((), F32),
                     count=jnp.zeros((), I32))


def series_observe(stats: SeriesStats, x: jax.Array, alpha: Any,
                   z_thresh: Any, warmup_steps: int, eps: Any = 1e-6
                   ) -> tuple[SeriesStats, jax.Array, jax.Array]:
  """Scores ``x`` against the running statistics, then folds it in.

  Returns ``(stats', z, spike)``. ``z = (x - mean) / (std + eps)``; a spike is
  ``z > z_thresh`` once ``warmup_steps`` finite values were seen. The EMA
  factor is ``min(alpha, k / (k + 1))`` after ``k`` values, so the first
  steps give the exact running mean instead of a bias towards 0. A non-finite
  ``x`` is not folded in; a spike is folded in clamped to
  ``mean + z_thresh * std``, so one outlier neither inflates the variance nor
  stops the statistics from following a real shift of level.
  """
  x = jnp.asarray(x, F32)
  ok = jnp.isfinite(x)
  z = zscore(MeanVar(stats.mean, stats.var), x, eps)
  spike = ok & (stats.count >= warmup_steps) & (z > z_thresh)
  folded = jnp.where(spike, stats.mean + z_thresh * jnp.sqrt(stats.var), x)
  a = warm_alpha(alpha, stats.count)
  mv = ema_mean_var(MeanVar(stats.mean, stats.var), folded, a, ok)
  # z reads 0 until the statistics are warm (not thousands at step 1)
  z = jnp.where(ok & (stats.count >= jnp.maximum(warmup_steps, 1)), z, 0.0)
  return SeriesStats(mv.mean, mv.var, inc(stats.count, ok)), z, spike


