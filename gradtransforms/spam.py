"""SPAM: Adam with spike-aware clipping against its own second moment and
periodic moment resets."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _norms, _read_once, _stats, _xla
from gradtransforms._registry import register


@register("spam", ("step", "resets", "clipped", "max_excess"),
          {"clipped": "clipped"})
class SpamState(NamedTuple):
  """``step``: update calls so far; ``resets``: moment resets done (both
  saturate at 2**31 - 1); ``max_excess``: the largest ``|g| - bound`` of the
  last step over the entries that could be clipped, as ``spike_clip``'s
  (> 0 iff some entry was clipped; -inf when none could be, NaN if the
  gradient held a NaN; capped at ``v * 1e38``, which only bites for ``v``
  below ~1e-30; for bfloat16 moments on TPU taken in bfloat16, to about
  2**-8 of ``|g|``, so ``clipped`` may differ from the clip by a rounding
  at the bound);
  ``adam``: Adam's own state (``count`` restarts at each reset, ``mu``,
  ``nu``), an ``optax.ScaleByAdamState`` so optax's tree utilities find the
  moments. ``clipped`` is derived when read."""
  step: jax.Array
  resets: jax.Array
  max_excess: jax.Array
  adam: optax.ScaleByAdamState

  @property
  def clipped(self) -> jax.Array:
    return self.max_excess > 0


def _warmup(count: jax.Array, resets: jax.Array, steps: int) -> jax.Array:
  """The paper's cosine ramp of the step after a reset: ``1 - 0.99 (1 +
  cos(pi k / (N + 1))) / 2`` at the ``k``-th step since the reset, ``k <
  N``; 1 afterwards and before the first reset."""
  if steps == 0:
    return jnp.ones((), jnp.float32)
  k = count.astype(jnp.float32)
  ramp = 1.0 - 0.99 * 0.5 * (1.0 + jnp.cos(math.pi * k / (steps + 1)))
  return jnp.where((resets > 0) & (count < steps), ramp, 1.0)


def _init(params) -> SpamState:
  zeros = lambda: jax.tree.map(jnp.zeros_like, params)
  return SpamState(step=jnp.zeros((), jnp.int32),
                   resets=jnp.zeros((), jnp.int32),
                   max_excess=jnp.full((), -jnp.inf, jnp.float32),
                   adam=optax.ScaleByAdamState(
                       count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros()))


class _Scalars(NamedTuple):
  """One step's scalars: ``keep`` (0 at a reset, else 1); clip active;
  ``k2e = threshold / (1 - b2**c)``, inf where the clip is not active;
  bias corrections, learning rate, warm-up factor, ``rate = -lr phi``,
  counters after the step, and a 1 (see :func:`_moments`)."""
  keep: jax.Array
  active: jax.Array
  k2e: jax.Array
  c1: jax.Array
  c2: jax.Array
  lr: Any
  phi: jax.Array
  rate: jax.Array
  new_count: jax.Array
  resets: jax.Array
  one: jax.Array


def _scalars(state: SpamState, learning_rate: Any, b1: float, b2: float,
             threshold: Any, interval: int, warmup_steps: int) -> _Scalars:
  due = ((state.step > 0) & (state.step % interval == 0) &
         (state.step < _stats.I32_MAX))
  count = jnp.where(due, 0, state.adam.count)
  new_count = optax.safe_increment(count)
  resets = _stats.inc(state.resets, due)
  keep = jnp.where(due, 0.0, 1.0)
  lr = jnp.asarray(learning_rate(state.step) if callable(learning_rate)
                   else learning_rate, jnp.float32)
  phi = _warmup(count, resets, warmup_steps)
  k2 = jnp.asarray(threshold, jnp.float32) / (
      1.0 - jnp.asarray(b2, jnp.float32) ** jnp.maximum(count, 1))
  return _Scalars(
      keep=keep, active=count > 0,
      k2e=jnp.where(count > 0, k2, jnp.inf),
      c1=1 - jnp.asarray(b1, jnp.float32) ** new_count,
      c2=1 - jnp.asarray(b2, jnp.float32) ** new_count,
      lr=lr, phi=phi, rate=-lr * phi, new_count=new_count,
      resets=resets, one=jnp.ones((), jnp.float32))


def _moments(sc: _Scalars, b1: float, b2: float, cpu: jax.Array,
             g: jax.Array, m: jax.Array, v: jax.Array):
  """One leaf's (mu, nu, max excess).

  Written for XLA:CPU: the only sqrt besides Adam's is the clip level
  inside the first moment's update; v's update and the non-finite test use
  squares (``min(g**2, theta v_hat)`` = the clipped ``g**2``), so no
  expensive op has several consumers; the figure's reduction holds only
  ops XLA:CPU's reduction kernels fuse (no select: the min with ``v *
  1e38`` is <= 0 where ``v = 0``).

  Per entry only what must be (compile time grows with each loop's ops):
  the reset folded into one scalar ``keep`` (the moments are finite, so
  ``0 m = 0``), the clip's mask into its level, ``-lr phi`` one scalar, m's
  loop testing the clipped square (per-leaf HLO 2.83x Adam's -> 2.49x).

  No copy of the old v: its in-place update waits for the other readers
  of the old v (the figure, m's update), and is divided by ``sc.one``, a 1
  that XLA:CPU cannot see (it comes out of a conditional,
  :func:`_xla.operands`; elsewhere it folds away). That makes the new v an
  expensive op, which the update's loop (:func:`_step`) reads rather than
  recomputes from the old v. Without both, XLA:CPU copied every leaf's
  ``nu`` to a fresh buffer each step (50M params in 100 leaves: 32k page
  faults a step, 3.4x an Adam step; 2.2x without)."""
  acc = _norms.acc_dtype(g)
  g32, v_old = g.astype(acc), v.astype(acc)
  # bfloat16 on TPU: the figure taken in bfloat16 (error about 2**-8 of
  # |g| or of the bound), as _norms.leaf_sumsq's recorded sums: only then
  # does XLA:TPU fuse it into the optimizer's pass (1.000x Adam's bytes,
  # against 1.286)
  # k2e (inf where the clip is not active: that figure is -inf all the same)
  def _excess(g, v, k2e):
    return jnp.max(jnp.minimum(
        jnp.abs(g) - jnp.sqrt(k2e.astype(v.dtype) * v), v * 1e38)).astype(acc)
  if not g.size:
    excess = jnp.full((), -jnp.inf, acc)
  elif g.dtype == jnp.bfloat16 and v.dtype == jnp.bfloat16:
    excess = jax.lax.platform_dependent(
        g, v, sc.k2e, tpu=_excess,
        default=lambda g, v, k2e: _excess(g.astype(acc), v.astype(acc), k2e))
  else:
    excess = _excess(g32, v_old, sc.k2e)
  excess = excess.astype(jnp.float32)  # before the first step: -inf below
  # theta * v_hat, the squared clip level; inf where nothing is clipped (no
  # history, v = 0; or not active, k2e = inf: also after a reset, whose
  # zeroing is keep), so the clip needs no mask of its own
  cap = sc.k2e * jnp.where(v_old > 0, v_old, jnp.inf)  # not k2e v: shared
  # with the figure's, XLA:CPU would write that product to a leaf buffer
  sq_c = jnp.minimum(g32 * g32, cap)
  # finite in v's dtype iff the new v is (but for a rounding at the float's
  # maximum, where v alone is kept): m's loop tests it, not v's EMA again
  ok = jnp.isfinite(sq_c.astype(v.dtype))
  lim = jnp.sqrt(cap)
  # The EMAs in float32 or wider, with one scalar of the step's: cast to a
  # 16-bit moment dtype, or more of them, each was an H100 kernel
  gc = jnp.clip(g32, -lim, lim)
  km, kv = sc.keep * m.astype(acc), sc.keep * v_old  # 0 at a reset
  m_new = jnp.where(ok, (1 - b1) * gc + b1 * km, km)
  v_raw = ((1 - b2) * sq_c + b2 * kv).astype(v.dtype)
  v_new = _xla.after(jnp.where(ok & jnp.isfinite(v_raw), v_raw,
                               kv.astype(v.dtype)),
                     excess, m_new, cpu=cpu)
  v_new = v_new / sc.one.astype(v_new.dtype)
  return m_new.astype(m.dtype), v_new.astype(v.dtype), excess


def _step(sc: _Scalars, eps: float, weight_decay: float, g: jax.Array,
          m: jax.Array, v: jax.Array, w: Any) -> jax.Array:
  """One leaf's update from its new moments (Adam's formula), which it
  reads from behind a barrier on CPU (:func:`_leaves`): without it XLA:CPU
  merged the division by the bias correction with the one of
  :func:`_moments`, recomputed the new v in the update's loop and copied
  the old v (``test_state_updated_in_place_where_leaves_share_a_shape``).
  In float32 or wider whatever the moments' dtype: ``eps = 1e-8`` is 0 in
  float16, where an entry without history would get ``0 / 0`` (as
  ``optax.adam``'s float16 update does)."""
  acc = _norms.acc_dtype(m)
  m, v = m.astype(acc), v.astype(acc)
  u = (m / sc.c1.astype(acc)) / (jnp.sqrt(v / sc.c2.astype(acc)) + eps)
  if weight_decay:
    u = -sc.lr * (u * sc.phi.astype(u.dtype) + weight_decay * w)
  else:  # -lr phi, one scalar
    u = sc.rate * u
  # NaN: its moments were kept; a NaN update.
  return jnp.where(jnp.isnan(g), jnp.nan, u).astype(g.dtype)


def _leaves(sc: _Scalars, b1: float, b2: float, eps: float,
            weight_decay: float, gs: list, ms: list, vs: list, ws: list):
  """Every leaf's (update, mu, nu, max excess), as lists: all the moments
  first, behind a barrier on CPU, then the updates (see :func:`_step`)."""
  cpu = _xla.on_cpu()
  moments = _xla.per_leaf(functools.partial(_moments, b1=b1, b2=b2))
  step = _xla.per_leaf(functools.partial(_step, eps=eps,
                                         weight_decay=weight_decay))
  outs = [moments(sc, cpu=cpu, g=g, m=m, v=v) for g, m, v in zip(gs, ms, vs)]
  mu, nu, excess = (list(x) for x in zip(*outs)) if outs else ([],) * 3
  mu, nu = jax.lax.platform_dependent(
      (mu, nu), cpu=jax.lax.optimization_barrier, default=lambda x: x)
  return ([step(sc, g=g, m=m, v=v, w=w) for g, m, v, w in zip(gs, mu, nu, ws)],
          mu, nu, excess)


def spam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, *, threshold: float = 5000.0,
         interval: int = 500, warmup_steps: int = 150,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SPAM (Huang et al., 2025, "SPAM: Spike-Aware Adam with Momentum Reset
  for Stable LLM Training"): Adam whose spike clip reads Adam's own second
  moment, and whose moments are zeroed every ``interval`` steps.

  At each step, with ``c`` Adam's count of steps since the last reset (or
  since the start) and ``v`` its second moment:

  * Reset (steps ``interval, 2 interval, ...``): ``mu = nu = 0``, ``c = 0``.
  * Clip: where ``c > 0`` and ``v > 0``, ``g <- clip(g, -b, b)`` with
    ``b = sqrt(threshold * v / (1 - b2**c))`` (``g**2 > threshold * v_hat``
    is a spike; it becomes ``sign(g) sqrt(threshold * v_hat)``).
  * Adam on the clipped ``g`` (optax's formulas, bias correction by ``c +
    1``): ``u = m_hat / (sqrt(v_hat) + eps)``.
  * Step: ``-learning_rate * (phi * u + weight_decay * w)``, with ``phi``
    the paper's cosine warm-up after each reset: ``1 - 0.99 (1 + cos(pi k
    / (N + 1))) / 2`` at the ``k``-th step since the reset (0.01 at the
    reset, 1 from ``N = warmup_steps`` steps on; 1 before the first reset).

  There is no second copy of ``v``: the clip reads Adam's (one read of the
  gradients and of Adam's state, as Adam alone). With ``warmup_steps=0``
  the numbers are those of ``optax.chain(gt.spike_clip(threshold, b2),
  gt.with_moment_reset(optax.adam(learning_rate, b1, b2, eps), interval))``
  up to float rounding, until the first reset, for entries whose gradient
  is non-zero at the first step. Where the two differ: the chain's clip keeps
  its own ``v``, which the reset does not clear (it clips the first steps
  after a reset against the old history; SPAM starts afresh with Adam's,
  as the paper); the chain bias-corrects its ``v`` by all steps, SPAM by
  the steps since the reset; an entry first non-zero after step 0 starts
  the chain's ``v`` at ``v_hat = g**2`` but Adam's (and SPAM's) at
  ``(1 - b2) g**2``; the chain has no warm-up. Against the paper's
  reference code: it compares ``g**2`` with ``threshold * v`` (no bias
  correction) and skips the clip for 20 steps after a reset instead; it
  does not restart Adam's bias correction at a reset (``with_moment_reset``
  and this function do, so the first steps after a reset are at the
  normal scale before ``phi``); its ``eps`` is 1e-6 (here optax's 1e-8).

  Zeros: an entry whose ``v`` is 0 (no non-zero gradient since the last
  reset) is not clipped, so it is never locked at 0. Non-finite input:
  ``+-Inf`` entries are clipped to the finite bound once ``v > 0``; an
  entry whose clipped gradient is still non-finite keeps its moments (they
  are never poisoned): a NaN entry gets a NaN update, so a guard or
  ``optax.apply_if_finite`` sees it; an Inf entry without history gets the
  update of its kept moments (0: it has none). Empty trees and
  zero-size leaves pass through. ``threshold=inf`` never clips.

  State: :class:`SpamState` (Adam's moments, two counters, one figure).
  Defaults are the paper's (theta = 5000, Delta T = 500, N = 150; betas
  as Adam's); ``eps`` is optax's.

  Args:
    learning_rate: a float or an optax schedule (of the step count).
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1); also the clip's.
    eps: Adam's epsilon, >= 0.
    threshold: theta > 0 (``inf``: never clip).
    interval: steps between moment resets (static), >= 1.
    warmup_steps: N, the cosine warm-up after each reset (static), >= 0.
    weight_decay: decoupled weight decay (as ``optax.adamw``; not ramped by
      the warm-up, as the paper's code), >= 0. Needs ``params``.
  """
  _checks.in_range("b1", b1, 0.0, 1.0, hi_open=True)
  _checks.in_range("b2", b2, 0.0, 1.0, hi_open=True)
  _checks.nonnegative("eps", eps)
  _checks.bound("threshold", threshold, strict=True)
  interval = _checks.integer("interval", interval, minimum=1)
  warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=0)
  _checks.nonnegative("weight_decay", weight_decay)
  if not callable(learning_rate):
    _checks.nonnegative("learning_rate", learning_rate)

  @_read_once.reads_once
  def update_fn(updates, state, params=None):
    _checks.float_leaves("updates", updates)
    if weight_decay:
      _checks.needs_params("spam", params)
    sc = _scalars(state, learning_rate, b1, b2, threshold, interval,
                  warmup_steps)
    # once, as operands of every leaf's loop (CPU: else each recomputes it)
    sc = _xla.operands(sc, state.step)
    leaves, treedef = jax.tree.flatten(updates)
    own = [treedef.flatten_up_to(x) for x in (state.adam.mu, state.adam.nu)]
    u, mu, nu, excess = _leaves(sc, b1, b2, eps, weight_decay, leaves, *own,
                                treedef.flatten_up_to(params)
                                if weight_decay else [None] * len(leaves))
    max_excess = jnp.where(sc.active, jnp.max(_xla.kept(jnp.stack(  # once
        excess + [jnp.full((), -jnp.inf)]))), -jnp.inf)  # not in every loop
    unf = lambda xs: jax.tree.unflatten(treedef, xs)
    return unf(u), SpamState(
        step=_stats.inc(state.step), resets=sc.resets, max_excess=max_excess,
        adam=optax.ScaleByAdamState(count=sc.new_count, mu=unf(mu), nu=unf(nu)))

  return optax.GradientTransformation(_init, update_fn)
