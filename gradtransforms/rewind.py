"""``rewind``: take a run back to its last good snapshot when it goes wrong.

Memory: one copy of the params and of ``inner``'s state, on the params'
devices. Host offload (``pinned_host``) is not done: in a deviceless H100
compile a host-memory snapshot entering a ``cond``/``while`` is copied to
the device every step, which would cost more than it saves.

Cost: the snapshot and inner state are read only on the steps that
refresh or rewind (``while_loop`` of 0 or 1 trips, updated in place; a
``lax.cond`` made XLA:CPU copy every buffer it passes through, and XLA:GPU
turns a cheap ``cond`` into selects, which read both sides). A refresh
writes the copy once per ``every`` steps, and a window's end reads the
params once to check them. Not free: XLA (CPU and GPU alike) copies a
donated buffer that enters a loop, so with donated params every step
copies the params once (one read and one write of the params), and the
update is materialised (a loop carry): 2.7x the params in temporaries on
XLA:CPU with Adam, against 1.0x for ``gt.guard``
(``tests/test_api.py``); H100 (deviceless): 124 kernels, guard's 80.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradtransforms import _checks, _stats, _xla
from gradtransforms._registry import register
from gradtransforms.guard import GuardState

F32, I32 = jnp.float32, jnp.int32


@register("rewind", ("step", "rewound", "rewinds", "rewound_to", "lost",
                     "snapshot_step", "tries", "above", "level", "halt"),
          {"rewind": "rewound", "rewinds": "rewinds"})
class RewindState(NamedTuple):
  """``step``: update calls; ``rewound``: the last step rewound;
  ``rewinds``: rewinds so far; ``rewound_to``: the step index the last
  rewind went back to (-1: none); ``lost``: steps discarded by rewinds so
  far (the data the loop skips if it carries on with fresh batches);
  ``snapshot_step``: the step index of the snapshot (its params are the
  ones ``update`` was given at that step); ``tries``: rewinds to this
  snapshot; ``since``: steps in the current window; ``clean``: no step of
  the window was bad; ``above``: steps in a row with the loss above
  ``level + margin``; ``level``: mean loss of the window the snapshot
  closed (``inf``: none yet); ``total``/``count``: the current window's loss
  sum and finite count; ``halt``: sticky, see :func:`rewind`;
  ``snapshot``/``snapshot_inner``: the params and ``inner``'s state at
  ``snapshot_step`` (the latter as a tuple of its leaves); ``inner_state``: ``inner``'s state."""
  step: jax.Array
  rewound: jax.Array
  rewinds: jax.Array
  rewound_to: jax.Array
  lost: jax.Array
  snapshot_step: jax.Array
  tries: jax.Array
  since: jax.Array
  clean: jax.Array
  above: jax.Array
  level: jax.Array
  total: jax.Array
  count: jax.Array
  halt: jax.Array
  snapshot: Any
  snapshot_inner: Any
  inner_state: optax.OptState


def _guards(inner_state: Any) -> list[GuardState]:
  is_guard = lambda x: isinstance(x, GuardState)
  return [s for s in jax.tree.leaves(inner_state, is_leaf=is_guard)
          if is_guard(s)]


def _all_finite(tree: Any) -> jax.Array:
  ok = jnp.ones((), jnp.bool_)
  for x in jax.tree.leaves(tree):
    ok = ok & jnp.all(jnp.isfinite(x)) if x.size else ok
  return ok


def _maybe(pred: jax.Array, fn: Any, carry: Any) -> Any:
  """``fn(carry)`` if ``pred`` else ``carry``, as a ``while_loop`` of 0 or 1
  trips: a loop carry is updated in place, so a step that skips ``fn`` reads
  and copies nothing (a ``lax.cond`` made XLA:CPU copy every donated buffer
  it passes through; XLA:GPU turns a cheap ``cond`` into selects, which read
  both sides)."""
  def body(c):
    return jnp.zeros((), jnp.bool_), fn(c[1])
  return lax.while_loop(lambda c: c[0], body, (pred, carry))[1]


def _any(flag: jax.Array, axis_name: Any) -> jax.Array:
  return flag if axis_name is None else lax.psum(flag.astype(I32),
                                                 axis_name) > 0


def rewind(inner: optax.GradientTransformation, every: int = 100, *,
           patience: int | None = None, margin: float = 0.1,
           max_rewinds: int = 2,
           axis_name: str | None = None
           ) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` and takes the params back to a snapshot when the run
  goes wrong (PaLM, Chowdhery et al. 2022, sec. 5.1, did it by hand:
  restart ~100 steps before a loss spike and skip the batches since).

  Snapshot: ``(params, inner_state)`` as ``update`` receives them at step
  ``k`` (taken at init, ``k = 0``). Windows of ``every`` steps follow; at
  the last step ``t`` of a window the snapshot becomes the params and
  inner state that step ``t + 1`` will receive (``p + u`` computed as
  ``optax.apply_updates`` does, and ``inner``'s new state), ``k = t + 1``, if
  the window was *clean* (no step bad) and they are finite; either way a new
  window starts. A step is bad if a trigger fires, an inner
  :func:`gt.guard <gradtransforms.guard>` marks it ``bad``, or (with
  ``patience``) its loss is above ``level + margin``.

  Triggers, at step ``t`` with snapshot step ``k``:

  * ``halt``: an inner ``gt.guard`` (found anywhere in ``inner``'s state)
    reached ``max_consecutive_errors`` bad steps in a row at this step;
  * ``nonfinite``: the loss (``value=``) is not finite and no guard is
    inside (a guard skips such a step itself and halts if they persist):
    the step's update is replaced before it lands; or the params are not
    finite at a window's end (checked there only, one read per window).
    Params already Inf/NaN cannot be repaired by an update (``inf + x`` is
    ``inf`` or ``nan``): this rewind also sets ``halt``; copy
    ``state.snapshot`` into the params to resume;
  * ``loss`` (``patience`` set, needs ``value=loss``): ``loss_t > level +
    margin`` for ``patience`` steps in a row, ``level`` = the mean finite
    loss of the window the snapshot closed (no level, no trigger, until the
    first refresh).

  On a trigger the update is ``snapshot - params`` (leafwise, in the
  params' dtype), ``inner``'s state becomes ``snapshot_inner``, and
  ``rewound``, ``rewinds``, ``rewound_to = k`` and ``lost += t - k + 1``
  (steps ``k..t``; a loop that carries on with fresh batches skips those
  batches) are reported. ``optax.apply_updates`` then gives
  ``p + fl(s - p)``: bit-identical to ``s`` wherever ``s - p`` is exact in
  the dtype (Sterbenz: ``s/2 <= p <= 2s``, the usual case for ``every``
  steps of training), otherwise within one rounding of the difference
  (``|result - s| <= ulp(s - p)``).

  No loop: the window restarts at the rewind; another trigger before the
  next refresh is a rewind to the same snapshot (``tries`` counts them).
  The ``max_rewinds + 1``-th also sets the sticky ``halt``: every later
  update is ``-0.0`` (params frozen at the snapshot): poll ``halt``, save,
  stop. NaN/Inf never reaches the snapshot.

  Memory and cost: see the module docstring.

  State: :class:`RewindState`; figures via ``gt.metrics`` (``rewind/...``).

  Args:
    inner: the optimizer to protect (usually a ``gt.guard(...)``).
    every: window length in steps (static), >= 1.
    patience: steps in a row above ``level + margin`` that rewind; None
      (default): no loss trigger.
    margin: the loss trigger's margin, in loss units (nats), >= 0.
    max_rewinds: rewinds to one snapshot before ``halt``, >= 1.
    axis_name: under ``shard_map``/``pmap``: every device takes the same
      decision (flags OR-ed, the loss averaged over the axis).
  """
  _checks.transformation("inner", inner)
  every = _checks.integer("every", every, minimum=1)
  if patience is not None:
    patience = _checks.integer("patience", patience, minimum=1)
  _checks.nonnegative("margin", margin)
  max_rewinds = _checks.integer("max_rewinds", max_rewinds, minimum=1)
  axis_name = _checks.axis_name("axis_name", axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    i, f = jnp.zeros((), I32), jnp.zeros((), jnp.bool_)
    own = _xla.fresh(dict(
        step=i, rewound=f, rewinds=i, rewound_to=i - 1, lost=i,
        snapshot_step=i, tries=i, since=i, clean=~f, above=i,
        level=jnp.full((), jnp.inf, F32), total=jnp.zeros((), F32), count=i,
        halt=f))
    snap, snap_inner = _xla.fresh((params, inner_state))
    # inner's snapshot as flat leaves: gt.metrics reads only the live state
    return RewindState(**own, snapshot=snap,
                       snapshot_inner=tuple(jax.tree.leaves(snap_inner)),
                       inner_state=inner_state)

  cfg = _Cfg(every, patience, margin, max_rewinds, axis_name)

  def update_fn(updates, state, params=None, **extra):
    _checks.needs_params("rewind", params)
    loss = extra.get("value")
    if patience is not None and loss is None:
      raise ValueError("rewind(patience=...) needs the loss: call "
                       "update(grads, state, params, value=loss)")
    u, inner_state = inner.update(updates, state.inner_state, params, **extra)
    return _step(cfg, state, params, u, inner_state, loss)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Cfg(NamedTuple):
  every: int
  patience: int | None
  margin: float
  max_rewinds: int
  axis_name: Any


def _decide(cfg: _Cfg, state: RewindState, params, u, inner_state, loss):
  """This step's flags: ``trigger``, ``bad``, ``halt``, ``take`` (refresh),
  ``above``, ``loss`` (float32, averaged over ``axis_name``)."""
  guards = _guards(inner_state)
  halted = jnp.zeros((), jnp.bool_)
  bad = jnp.zeros((), jnp.bool_)
  for g, old in zip(guards, _guards(state.inner_state)):
    halted = halted | (g.halt & ~old.halt)
    bad = bad | g.bad
  due = state.since + 1 >= cfg.every

  def check(_):  # at a window's end: are the params (and the next ones) finite
    fine = _all_finite(params)
    nxt = fine & _all_finite((u, inner_state))
    return _any(~fine, cfg.axis_name), ~_any(~nxt, cfg.axis_name)

  false = jnp.zeros((), jnp.bool_)
  broken, next_ok = _maybe(due, check, (false, false))
  nonfinite, above = broken, state.above
  if loss is not None:
    loss = jnp.asarray(loss, F32)
    if cfg.axis_name is not None:
      loss = lax.pmean(loss, cfg.axis_name)
    if not guards:
      nonfinite = nonfinite | ~jnp.isfinite(loss)
    if cfg.patience is not None:
      high = ~(loss <= state.level + cfg.margin) & jnp.isfinite(state.level)
      above = jnp.where(high, _stats.inc(above), 0)
      bad = bad | high
  trigger = halted | nonfinite
  if cfg.patience is not None:
    trigger = trigger | (above >= cfg.patience)
  trigger = _any(trigger & ~state.halt, cfg.axis_name)
  bad = _any(bad, cfg.axis_name) | trigger
  # an Inf/NaN param cannot be undone by an update (inf + x is inf or nan)
  halt = state.halt | (trigger & ((state.tries >= cfg.max_rewinds) | broken))
  take = due & ~trigger & state.clean & ~bad & ~halt & next_ok
  return dict(trigger=trigger, bad=bad, halt=halt, take=take, above=above,
              due=due, loss=loss)


def _step(cfg: _Cfg, state: RewindState, params, u, inner_state, loss):
  d = _decide(cfg, state, params, u, inner_state, loss)
  trigger, bad, take, frozen = d["trigger"], d["bad"], d["take"], state.halt
  tdef = jax.tree.structure(inner_state)

  def restore(carry):  # rewind, or frozen after halt: back to the snapshot
    v, _ = carry
    v = jax.tree.map(
        lambda s, p, x: jnp.where(frozen, jnp.asarray(-0.0, x.dtype),
                                  (s - p).astype(x.dtype)),
        state.snapshot, params, v)
    return v, jax.tree.unflatten(tdef, state.snapshot_inner)

  def refresh(_):
    # the params and inner state the next step will receive: p + u as
    # optax.apply_updates computes it (finite inputs, checked in _decide;
    # an overflow to Inf would be caught at the next window's end)
    cand = jax.tree.map(lambda p, v: jnp.asarray(p + v).astype(p.dtype),
                        params, u)
    return cand, tuple(jax.tree.leaves(inner_state))

  # restore (reads the snapshot) before refresh (writes it): in place
  u, inner_state = _maybe(trigger | frozen, restore, (u, inner_state))
  snapshot, snapshot_inner = _maybe(
      take, refresh, (state.snapshot, state.snapshot_inner))
  step, total, count = state.step, state.total, state.count
  if d["loss"] is not None:
    ok = jnp.isfinite(d["loss"]) & ~bad
    total = total + jnp.where(ok, d["loss"], 0.0)
    count = _stats.inc(count, ok)
  restart = trigger | d["due"]
  return u, RewindState(
      step=_stats.inc(step), rewound=trigger,
      rewinds=_stats.inc(state.rewinds, trigger),
      rewound_to=jnp.where(trigger, state.snapshot_step, state.rewound_to),
      lost=_stats.inc(state.lost, jnp.where(
          trigger, step - state.snapshot_step + 1, 0)),
      snapshot_step=jnp.where(take, _stats.inc(step), state.snapshot_step),
      tries=jnp.where(take, 0, _stats.inc(state.tries, trigger)),
      since=jnp.where(restart, 0, _stats.inc(state.since)),
      clean=restart | (state.clean & ~bad),
      above=jnp.where(trigger, 0, d["above"]),
      level=jnp.where(take & (count > 0), total / jnp.maximum(count, 1),
                      state.level),
      total=jnp.where(restart, 0.0, total),
      count=jnp.where(restart, 0, count), halt=d["halt"],
      snapshot=snapshot, snapshot_inner=snapshot_inner,
      inner_state=inner_state)
