"""Spike-aware elementwise clipping (SPAM)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _collectives
from gradtransforms import _norms
from gradtransforms import _read_once
from gradtransforms import _stats
from gradtransforms import _sums
from gradtransforms import _xla
from gradtransforms._registry import register


@register("spike_clip", ("clipped", "max_excess", "step"),
          {"clipped": "clipped"})
class SpikeClipState(NamedTuple):
  """``step``: update calls so far (saturates at 2**31 - 1); ``bound``: per
  entry, the clip level of the last step (``sqrt(theta * v_hat)``, see
  :func:`spike_clip`; it also encodes the EMA ``v``; 0 for an entry without
  history). ``clipped``: some entry was clipped at the last step;
  ``max_excess``: the largest ``|g| - bound`` of the last step (> 0 iff
  ``clipped``; NaN if the gradient held a NaN).
  """
  step: jax.Array
  bound: optax.Updates
  clipped: jax.Array
  max_excess: jax.Array


def _bound_factor(t: jax.Array, threshold: Any, b2: float
                  ) -> tuple[jax.Array, jax.Array]:
  """``(k, K)`` for step ``t >= 1``: the bias-corrected clip factor
  ``k = sqrt(theta / (1 - b2**t))`` on ``sqrt(v_t)`` and the same level
  expressed on ``sqrt(v_{t+1})``: ``K = k / sqrt(b2 + (1 - b2) k**2)``
  (written ``1 / sqrt(b2 / k**2 + 1 - b2)``: finite for ``theta = inf``)."""
  t = jnp.maximum(t, 1).astype(jnp.float32)
  k2 = jnp.asarray(threshold, jnp.float32) / (
      1.0 - jnp.asarray(b2, jnp.float32) ** t)
  return jnp.sqrt(k2), jax.lax.rsqrt(b2 / k2 + (1.0 - b2))


def _step_scalars(t: jax.Array, threshold: Any, b2: float) -> tuple:
  """``(active, kr, to_rms, K**2, first)`` of step ``t`` (see
  :func:`spike_clip`): ``kr = k / K_{t-1}`` turns an old bound into this
  step's clip level (``inf`` before the first step: nothing is clipped);
  ``to_rms = 1 / K_{t-1}`` turns it into ``r_t = sqrt(v_t)``; ``first``
  weighs the first square of an entry without history."""
  k, big_k = _bound_factor(t, threshold, b2)
  # r_t = bound / K_{t-1}: undo the previous step's factor.
  to_rms = 1.0 / _bound_factor(t - 1, threshold, b2)[1]
  # v of an entry seen for the first time: v_hat = g**2 at the next step.
  first = 1.0 - jnp.asarray(b2, jnp.float32) ** (t.astype(jnp.float32) + 1)
  active = t > 0
  return (active, jnp.where(active, k * to_rms, jnp.inf), to_rms,
          jnp.square(big_k), first)


def _new_bound(sc: tuple, b2: float, g: jax.Array, b: jax.Array) -> jax.Array:
  """The state's new per-entry bound ``K_t r_{t+1}`` from ``g`` and the old
  bound ``b = K_{t-1} r_t``. Per entry only what must be (XLA:CPU's compile
  time grows with the operations of every leaf's loop): the step's scalars
  come folded, the clip level is ``b kr``. (Folding ``b2`` and ``K`` into
  ``b**2`` too saves 2% more of the HLO but XLA:GPU then keeps the bound out
  of the optimizer's pass: 1.573x Adam's bytes.)"""
  _, kr, to_rms, k2, first = sc
  acc = _norms.acc_dtype(g)
  g32, b32 = g.astype(acc), b.astype(acc)
  fresh = b32 == 0  # v = 0: no history
  r = b32 * to_rms.astype(acc)
  lim = b32 * kr.astype(acc)  # NaN where fresh before the first step
  clipped = jnp.where(fresh, g32, jnp.clip(g32, -lim, lim))
  w = jnp.where(fresh, first.astype(acc), 1 - b2)
  v_new = b2 * r * r + w * (clipped * clipped)
  v_new = jnp.where(jnp.isfinite(v_new), v_new, r * r)
  # The sqrt is the root: XLA:CPU materialises an expensive op that has
  # several consumers, and this way that is the state output itself.
  return jnp.sqrt(v_new * k2.astype(acc)).astype(b.dtype)


def _clip(active: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
  """``g`` clipped to ``[-b, b]`` (the new bound) once the clip is active."""
  b = b.astype(_norms.acc_dtype(g))
  return jnp.where(active, jnp.clip(g.astype(b.dtype), -b, b),
                   g).astype(g.dtype)


def _leaf_excess(g: jax.Array, b: jax.Array) -> jax.Array:
  """max |g| - bound: the one statistic XLA:CPU fuses into a single read
  (a count of clipped entries materialises a mask per leaf)."""
  d = jnp.result_type(g, b)
  return jnp.max(jnp.abs(g.astype(d)) - b.astype(d)).astype(jnp.float32)


def _row_excess(g: jax.Array, b: jax.Array, view: tuple) -> jax.Array:
  """Each row's max of ``|g| - b``, in their dtype as :func:`_leaf_excess`
  (a float32 reduction let XLA skip the 16-bit rounding of ``|g| - b``)."""
  d = jnp.result_type(g, b)
  x = jnp.abs(g.astype(d).reshape(view)) - b.astype(d).reshape(view)
  return jax.lax.reduce(x, jnp.asarray(-jnp.inf, d), jax.lax.max,
                        (len(view) - 1,)).astype(jnp.float32)


def _excess(leaves: list, b_leaves: list, leaf_excess: Any) -> jax.Array:
  """The largest ``|g| - b`` over all leaves (-inf for none). On GPU each
  leaf's row maxima (``_sums.row_view``), then one max over all of them
  behind a barrier: XLA:GPU then writes the new bound from the optimizer's
  pass, where with a full reduction per leaf it gave the bound (and the
  reduction's first stage) a kernel of its own at 4 layers of 255 x 254,
  and Adam's pass read it again (H100, 6 leaves: 23 kernels, 1.572x Adam's
  bytes -> 17, 1.287). Elsewhere each leaf's max, the vector kept whole
  (``_xla.kept``)."""
  def default(gs, bs):
    return jnp.max(_xla.kept(jnp.stack(
        [leaf_excess(g, b) for g, b in zip(gs, bs) if g.size]
        or [jnp.full((), -jnp.inf)])))

  def gpu(gs, bs):
    rows_of = _xla.per_leaf(_row_excess, ("view",))
    rows = [rows_of(g, b, view=_sums.row_view(g.shape, None))
            for g, b in zip(gs, bs) if g.size]
    if not rows:
      return jnp.full((), -jnp.inf)
    rows = jax.lax.optimization_barrier(rows)
    return jnp.max(jnp.concatenate([jnp.reshape(r, (-1,)) for r in rows]))
  if not all(_sums.row_view(g.shape, None) for g in leaves if g.size):
    return default(leaves, b_leaves)
  return jax.lax.platform_dependent(leaves, b_leaves, cuda=gpu, rocm=gpu,
                                    default=default)


def _state_copy(bound: Any) -> Any:
  """The new bounds as the state stores them: on TPU ``max(b, 0)``, the
  same bits (a bound is a square root of a non-negative number, never -0)
  as a node of its own. Where the square root itself is a state output that
  the clip and the ``max_excess`` reduction also read, XLA:TPU gives the
  reduction and the bound a kernel of their own, and the optimizer's pass
  reads the gradient and the new bound again: 1.571x Adam's bytes, 1.286
  this way (one pass). Elsewhere the square root itself (CPU: see
  :func:`_new_bound`; H100: no difference)."""
  return jax.lax.platform_dependent(
      bound, tpu=lambda b: jax.tree.map(lambda x: jnp.maximum(x, 0), b),
      default=lambda b: b)


def spike_clip(threshold: float = 5000.0, decay: float = 0.999, *,
               axis_name: str | None = None) -> optax.GradientTransformation:
  """Spike-aware clipping of individual gradient entries (Huang et al., 2025,
  "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training").

  With ``v`` an EMA of squared gradients and ``v_hat = v / (1 - b2**t)``:
  an entry is a spike if ``g**2 > threshold * v_hat``; it becomes
  ``sign(g) * sqrt(threshold * v_hat)``. Then ``v <- b2 v + (1 - b2) g**2``
  with the clipped ``g``. The first step only initialises ``v``. SPAM tests
  against Adam's own second moment; keeping ``v`` here makes the transform
  usable before any optimizer, at the cost of one more state tree.

  Entries without a history are not clipped: a spike is a gradient far
  above the entry's usual magnitude, and an entry whose ``v`` is still 0
  (its gradient was 0 so far: an embedding row missing from the first
  batches, a LoRA ``A`` at step 0) has none; clipping it to
  ``sqrt(theta * 0) = 0`` would keep its ``v`` at 0 and the entry frozen
  forever. Its first non-zero gradient passes unchanged (for
  ``threshold >= 1``; a threshold below 1 clips every entry below its own
  RMS, this one included) and initialises ``v = (1 - b2**(t+1)) g**2``, so
  that ``v_hat = g**2`` from its first observation as for the entries seen
  at step 0 (for those this is the usual ``(1 - b2) g**2``). A long stretch
  of zero gradients only decays ``v`` (if it underflows to 0 the entry
  starts afresh); after it the bound regrows by a factor up to
  ``sqrt(b2 + (1 - b2) theta)`` per step (about 2.4 with the defaults).

  How it is computed (same numbers, one pass, no temporaries): with
  ``r = sqrt(v)`` and ``k = sqrt(threshold / (1 - b2**t))`` the clipped
  entry is ``clip(g, -k r_t, k r_t)``, and it equals
  ``clip(g, -K r_{t+1}, K r_{t+1})`` with ``K = k / sqrt(b2 + (1 - b2) k**2)``
  (square both sides of the EMA). The state keeps that level,
  ``bound = K r_{t+1}``, per entry: the EMA is updated first, in place, and
  the optimizer after this transform reads the clipped gradient from ``g``
  and the new ``bound``, never the old state. (The same holds for an entry
  seen for the first time: with ``v_{t+1} = (1 - b2**(t+1)) g**2`` its
  level ``K r_{t+1}`` is ``>= |g|`` exactly when ``threshold >= 1``.) (Keeping ``v``
  itself made XLA:CPU copy it or materialise the clipped gradient every
  step: 5x an Adam step instead of 1.5-2x.)

  Non-finite input: ``+-Inf`` entries are spikes (clipped to the finite
  bound) once ``v`` exists, and pass unchanged before; ``NaN`` entries pass
  unchanged. Non-finite values never enter ``v``. Zeros: see above. Empty
  trees and zero-size leaves pass through. ``threshold=inf`` never clips.

  State: :class:`SpikeClipState`. Defaults are the paper's (theta = 5000,
  beta2 = 0.999).

  Args:
    threshold: theta > 0 (``inf``: never clip).
    decay: the EMA's decay ``b2`` in [0, 1) (SPAM's beta2).
    axis_name: with leaves sharded over this ``shard_map``/``pmap`` axis,
      ``clipped``/``max_excess`` are taken over all shards (the clipping
      itself is elementwise and needs no communication).
  """
  _checks.bound("threshold", threshold, strict=True)
  _checks.axis_name("axis_name", axis_name)
  _checks.in_range("decay", decay, 0.0, 1.0, hi_open=True)
  b2 = decay

  def init_fn(params):  # distinct, strongly typed buffers: no copy needed
    return SpikeClipState(step=jnp.zeros((), jnp.int32),
                          bound=jax.tree.map(jnp.zeros_like, params),
                          clipped=jnp.zeros((), jnp.bool_),
                          max_excess=jnp.zeros((), jnp.float32))

  @_read_once.reads_once
  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    t = state.step
    # The step's scalars computed once, apart: fused into the leaves' loops
    # (their powers recomputed per entry) XLA:GPU kept the new bound out of
    # the optimizer's pass, which read the gradient and the bound again
    # (H100: 1.573x Adam's bytes -> 1.287). XLA:CPU drops the barrier; there
    # they come out of a conditional (_xla.operands), so that every leaf's
    # loop reads them rather than computing them again (compile time).
    sc = _xla.operands(jax.lax.optimization_barrier(
        _step_scalars(t, threshold, b2)), t)
    active = sc[0]
    # per leaf: traced once per leaf shape (_xla.per_leaf)
    new_bound = _xla.per_leaf(functools.partial(_new_bound, b2=b2))
    leaf_excess, clip = _xla.per_leaf(_leaf_excess), _xla.per_leaf(_clip)
    bound = jax.tree.map(lambda g, b: new_bound(sc, g=g, b=b), updates,
                         state.bound)
    leaves, b_leaves = jax.tree.leaves(updates), jax.tree.leaves(bound)
    excess = _excess(leaves, b_leaves, leaf_excess)
    excess = _collectives.pmax(excess, axis_name)
    excess = jnp.where(active, excess, -jnp.inf)
    return (jax.tree.map(lambda g, b: clip(active, g, b), updates, bound),
            SpikeClipState(step=_stats.inc(t), bound=_state_copy(bound),
                           clipped=excess > 0, max_excess=excess))

  return optax.GradientTransformation(init_fn, update_fn)
