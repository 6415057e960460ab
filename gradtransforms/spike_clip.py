"""Spike-aware elementwise clipping (SPAM)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms._registry import register


@register("spike_clip", ("clipped", "max_excess", "count"))
class SpikeClipState(NamedTuple):
  """``count``: steps seen; ``bound``: per entry, the clip level of the last
  step (``sqrt(theta * v_hat)``, see :func:`spike_clip`; it also encodes the
  EMA ``v``). ``clipped``: some entry was clipped at the last step;
  ``max_excess``: the largest ``|g| - bound`` of the last step (> 0 iff
  ``clipped``; NaN if the gradient held a NaN).
  """
  count: jax.Array
  bound: optax.Updates
  clipped: jax.Array
  max_excess: jax.Array


def _bound_factor(t: jax.Array, threshold: float, b2: float
                  ) -> tuple[jax.Array, jax.Array]:
  """``(k, K)`` for step ``t >= 1``: the bias-corrected clip factor
  ``k = sqrt(theta / (1 - b2**t))`` on ``sqrt(v_t)`` and the same level
  expressed on ``sqrt(v_{t+1})``: ``K = k / sqrt(b2 + (1 - b2) k**2)``."""
  t = jnp.maximum(t, 1).astype(jnp.float32)
  k2 = threshold / (1.0 - jnp.asarray(b2, jnp.float32) ** t)
  return jnp.sqrt(k2), jnp.sqrt(k2 / (b2 + (1.0 - b2) * k2))


def spike_clip(threshold: float = 5000.0, b2: float = 0.999, *,
               axis_name: str | None = None) -> optax.GradientTransformation:
  """Spike-aware clipping of individual gradient entries (Huang et al., 2025,
  "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training").

  With ``v`` an EMA of squared gradients and ``v_hat = v / (1 - b2**t)``:
  an entry is a spike if ``g**2 > threshold * v_hat``; it becomes
  ``sign(g) * sqrt(threshold * v_hat)``. Then ``v <- b2 v + (1 - b2) g**2``
  with the clipped ``g``. The first step only initialises ``v``. SPAM tests
  against Adam's own second moment; keeping ``v`` here makes the transform
  usable before any optimizer, at the cost of one more state tree.

  How it is computed (same numbers, one pass, no temporaries): with
  ``r = sqrt(v)`` and ``k = sqrt(threshold / (1 - b2**t))`` the clipped
  entry is ``clip(g, -k r_t, k r_t)``, and it equals
  ``clip(g, -K r_{t+1}, K r_{t+1})`` with ``K = k / sqrt(b2 + (1 - b2) k**2)``
  (square both sides of the EMA). The state keeps that level,
  ``bound = K r_{t+1}``, per entry: the EMA is updated first, in place, and
  the optimizer after this transform reads the clipped gradient from ``g``
  and the new ``bound``, never the old state. (Keeping ``v`` itself made
  XLA:CPU copy it or materialise the clipped gradient every step: 5x an Adam
  step instead of 1.5-2x.)

  Non-finite input: ``+-Inf`` entries are spikes (clipped to the finite
  bound) once ``v`` exists; ``NaN`` entries pass unchanged. Non-finite
  values never enter ``v``.

  State: :class:`SpikeClipState`. Defaults are the paper's (theta = 5000,
  beta2 = 0.999).

  Args:
    threshold: theta > 0.
    b2: EMA factor in [0, 1).
    axis_name: with leaves sharded over this ``shard_map``/``pmap`` axis,
      ``clipped``/``max_excess`` are taken over all shards (the clipping
      itself is elementwise and needs no communication).
  """
  _checks.positive("threshold", threshold)
  _checks.in_range("b2", b2, 0.0, 1.0, hi_open=True)

  def init_fn(params):  # distinct, strongly typed buffers: no copy needed
    return SpikeClipState(jnp.zeros((), jnp.int32),
                          jax.tree.map(jnp.zeros_like, params),
                          jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    t = state.count
    active = t > 0
    k, big_k = _bound_factor(t, threshold, b2)
    # r_t = bound / K_{t-1}: undo the previous step's factor.
    to_rms = 1.0 / _bound_factor(t - 1, threshold, b2)[1]

    def new_bound(g, b):
      acc = _norms.acc_dtype(g)
      g32, r = g.astype(acc), b.astype(acc) * to_rms.astype(acc)
      lim = k.astype(acc) * r
      clipped = jnp.where(active, jnp.clip(g32, -lim, lim), g32)
      v_new = b2 * r * r + (1 - b2) * clipped * clipped
      v_new = jnp.where(jnp.isfinite(v_new), v_new, r * r)
      # The sqrt is the root: XLA:CPU materialises an expensive op that has
      # several consumers, and this way that is the state output itself.
      return jnp.sqrt(v_new * jnp.square(big_k).astype(acc)).astype(b.dtype)

    def clip(g, b):
      b = b.astype(_norms.acc_dtype(g))
      return jnp.where(active, jnp.clip(g.astype(b.dtype), -b, b),
                       g).astype(g.dtype)

    bound = jax.tree.map(new_bound, updates, state.bound)
    leaves, b_leaves = jax.tree.leaves(updates), jax.tree.leaves(bound)
    # A max of |g| - bound: the one statistic XLA:CPU fuses into a single
    # read (a count of clipped entries materialises a mask per leaf).
    def leaf_excess(g, b):
      d = jnp.result_type(g, b)
      return jnp.max(jnp.abs(g.astype(d)) - b.astype(d)).astype(jnp.float32)
    excess = jnp.max(jnp.stack(
        [leaf_excess(g, b) for g, b in zip(leaves, b_leaves) if g.size]
        or [jnp.full((), -jnp.inf)]))
    if axis_name is not None:
      excess = jax.lax.pmax(excess, axis_name)
    excess = jnp.where(active, excess, -jnp.inf)
    return (jax.tree.map(clip, updates, bound),
            SpikeClipState(t + 1, bound, excess > 0, excess))

  return optax.GradientTransformation(init_fn, update_fn)
