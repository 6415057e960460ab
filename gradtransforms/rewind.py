"""``rewind``: take a run back to its last good snapshot when it goes wrong.

Memory: a copy of the params and of ``inner``'s state, on the params'
devices (``offload``: below). Cost (compiles deviceless for an H100 and a
TPU v5e on a 2-core CPU; Adam, float32 leaves of 255 x 254;
``tests/test_rewind.py``): a step that neither writes nor restores the
snapshot costs what ``gt.guard(inner)`` costs plus one read of the
snapshot's params (``where(r, s - p, u)``, fused into the caller's
``apply_updates``); the rare work is one ``while_loop`` of 0 or 1 trips,
one kernel (on GPU a host sync) that copies nothing (how:
``_snapshot.py``). 100 leaves, ``rewind(guard(adam))`` against
``guard(adam)``: H100 227 kernels (scalars read once, ``_read_once``;
327 before) against 311 (``apply_if_finite`` 306), TPU v5e 208 against 204
(201); DRAM bytes 1.57x Adam's against 1.43x (+0.14: the snapshot read). A
loop trip moves 2.3x Adam's bytes more. XLA:CPU: as the guard, one leaf's
``isfinite`` mask in temporaries (3 loops before: 676 kernels on the H100).

``offload=True``: the snapshot's arrays of 4,096 elements or more live in
host memory (``pinned_host``) on GPU/TPU and move inside the loop only, on
the steps that write or restore it; the update is restored in a second loop
(a fused kernel cannot read host memory), materialised, on GPU a second host
sync a step (8 leaves: 2.0x Adam's bytes on H100 and TPU). On a CPU (the
arrays on it, or traced with it the default backend) it is a no-op.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradtransforms import _checks, _read_once, _snapshot, _stats, _xla
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
  ones ``update`` was given at that step); ``written``: that of the
  snapshot the buffers hold (differs from a window's end to the next
  update, which writes them); ``tries``: rewinds to this snapshot since it
  was written; ``since``: steps in the current window; ``clean``: no step
  of the window was bad; ``above``: steps in a row with the loss above
  ``level + margin``; ``level``: mean loss of the window the snapshot
  closed (``inf``: none yet); ``total``/``count``: the current window's
  loss sum and finite count; ``halt``: sticky, see :func:`rewind`;
  ``snapshot``: the params at ``written``; ``snapshot_inner``: ``inner``'s
  state then, as a tuple: its arrays (leaves of two elements or more),
  then its scalars, one vector per dtype; ``inner_state``: ``inner``'s
  state (after a step that went back, its scalars are the snapshot's; the
  next update replaces its arrays, before ``inner`` runs)."""
  step: jax.Array
  rewound: jax.Array
  rewinds: jax.Array
  rewound_to: jax.Array
  lost: jax.Array
  snapshot_step: jax.Array
  written: jax.Array
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


def _any(flag: jax.Array, axis_name: Any) -> jax.Array:
  return flag if axis_name is None else lax.psum(flag.astype(I32),
                                                 axis_name) > 0


def rewind(inner: optax.GradientTransformation, every: int = 100, *,
           patience: int | None = None, margin: float = 0.1,
           max_rewinds: int = 2, axis_name: str | None = None,
           offload: bool = False) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` and takes the params back to a snapshot when the run
  goes wrong (PaLM, Chowdhery et al. 2022, sec. 5.1, did it by hand:
  restart ~100 steps before a loss spike and skip the batches since).

  Snapshot: ``(params, inner_state)`` as ``update`` receives them at step
  ``k`` (taken at init, ``k = 0``). Windows of ``every`` steps follow; at
  the last step ``t`` of a window, if the window was *clean* (no step bad),
  the snapshot moves on to step ``k = t + 1`` (``snapshot_step``, ``level``
  at once); either way a new window starts. Its buffers are written by the
  next update, from the params and inner state it receives (after
  ``optax.apply_updates``, ``p + u`` and ``inner``'s new state), if they
  are finite; if not, the snapshot stays the previous one. A step is bad if
  a trigger fires, an inner :func:`gt.guard <gradtransforms.guard>` marks
  it ``bad``, or (with ``patience``) its loss is above ``level + margin``.

  Triggers, at step ``t`` with snapshot step ``k``:

  * ``halt``: an inner ``gt.guard`` (found anywhere in ``inner``'s state)
    reached ``max_consecutive_errors`` bad steps in a row at this step;
  * ``nonfinite``: the loss (``value=``) is not finite and no guard is
    inside (a guard skips such a step itself and halts if they persist):
    the step's update is replaced before it lands; or the params are not
    finite at a window's end or when a snapshot is written (checked there
    only). Params already Inf/NaN cannot be repaired by an update (``inf +
    x`` is ``inf`` or ``nan``): this rewind also sets ``halt``; copy
    ``state.snapshot`` into the params to resume;
  * ``loss`` (``patience`` set, needs ``value=loss``): ``loss_t > level +
    margin`` for ``patience`` steps in a row, ``level`` = the mean finite
    loss of the window the snapshot closed (no level, no trigger, until the
    first refresh).

  On a trigger the update is ``snapshot - params`` (leafwise, in the
  params' dtype), ``inner``'s state becomes ``snapshot_inner`` (its arrays
  at the start of the next update: see :class:`RewindState`), and
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
  stop. NaN/Inf never reaches the snapshot. Memory and cost: see the
  module docstring.

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
    offload: keep the snapshot's large arrays in host memory on GPU/TPU
      (a bool; default False); see the module docstring.
  """
  _checks.transformation("inner", inner)
  every = _checks.integer("every", every, minimum=1)
  if patience is not None:
    patience = _checks.integer("patience", patience, minimum=1)
  _checks.nonnegative("margin", margin)
  max_rewinds = _checks.integer("max_rewinds", max_rewinds, minimum=1)
  axis_name = _checks.axis_name("axis_name", axis_name)
  offload = _checks.boolean("offload", offload)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return _init(inner, params, offload)

  cfg = _Cfg(every, patience, margin, max_rewinds, axis_name)

  def update_fn(updates, state, params=None, **extra):
    _checks.needs_params("rewind", params)
    loss = extra.get("value")
    if patience is not None and loss is None:
      raise ValueError("rewind(patience=...) needs the loss: call "
                       "update(grads, state, params, value=loss)")
    trees = dict.fromkeys(("snapshot", "snapshot_inner", "inner_state"))
    own, restore = _read_once.read_once(state._replace(**trees))  # GPU
    state = own._replace(**{k: getattr(state, k) for k in trees})
    pre = _pending(cfg, state, params)
    u, inner_state = inner.update(updates, pre["inner"], params, **extra)
    u, new = _step(cfg, state, pre, params, u, inner_state, loss)
    return u, restore(new._replace(**trees))._replace(
        **{k: getattr(new, k) for k in trees})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _init(inner, params, offload: bool) -> RewindState:
  inner_state = inner.init(params)
  i, f = jnp.zeros((), I32), jnp.zeros((), jnp.bool_)
  own = _xla.fresh(dict(
      step=i, rewound=f, rewinds=i, rewound_to=i - 1, lost=i,
      snapshot_step=i, written=i, tries=i, since=i, clean=~f, above=i,
      level=jnp.full((), jnp.inf, F32), total=jnp.zeros((), F32), count=i,
      halt=f))
  # inner's snapshot as flat leaves: gt.metrics reads only the live state
  snap, snap_inner = _snapshot.place(params, jax.tree.leaves(inner_state),
                                     offload)
  return RewindState(**own, snapshot=snap, snapshot_inner=snap_inner,
                     inner_state=inner_state)


class _Cfg(NamedTuple):
  every: int
  patience: int | None
  margin: float
  max_rewinds: int
  axis_name: Any


def _pending(cfg: _Cfg, state: RewindState, params) -> dict:
  """Before ``inner`` runs (:func:`_snapshot.prepare`): the params' check
  and the pending snapshot's write, from what this step received."""
  due = state.since + 1 >= cfg.every
  pending = state.written != state.snapshot_step
  i_leaves, i_def = jax.tree.flatten(state.inner_state)
  redo = state.rewound | state.halt  # the last step went back
  pre = _snapshot.prepare(due | pending, pending, redo,
                          jax.tree.leaves(params), i_leaves,
                          jax.tree.leaves(state.snapshot),
                          state.snapshot_inner, cfg.axis_name)
  pre["inner"] = jax.tree.unflatten(i_def, pre["inner"])
  pre["snapshot"] = jax.tree.unflatten(jax.tree.structure(state.snapshot),
                                       pre["snapshot"])
  return dict(pre, due=due, pending=pending)


def _decide(cfg: _Cfg, state: RewindState, pre: dict, inner_state, loss):
  """This step's flags: ``trigger``, ``bad``, ``halt``, ``take`` (a window
  closes clean: snapshot at the next step), ``above``, ``tries``, ``loss``
  (float32, averaged over ``axis_name``)."""
  guards = _guards(inner_state)
  halted = bad = jnp.zeros((), jnp.bool_)
  for g, old in zip(guards, _guards(state.inner_state)):
    halted = halted | (g.halt & ~old.halt)
    bad = bad | g.bad
  broken = ~pre["fine_p"]
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
  tries = jnp.where(pre["commit"], 0, state.tries)
  # an Inf/NaN param cannot be undone by an update (inf + x is inf or nan)
  halt = state.halt | (trigger & ((tries >= cfg.max_rewinds) | broken))
  take = pre["due"] & ~trigger & state.clean & ~bad & ~halt
  return dict(trigger=trigger, bad=bad, halt=halt, take=take, above=above,
              loss=loss, tries=tries)


def _step(cfg: _Cfg, state: RewindState, pre: dict, params, u, inner_state,
          loss):
  d = _decide(cfg, state, pre, inner_state, loss)
  trigger, bad, take, frozen = d["trigger"], d["bad"], d["take"], state.halt
  back = trigger | frozen  # rewind, or frozen after halt: to the snapshot
  snapshot, snapshot_inner = pre["snapshot"], pre["snapshot_inner"]
  u = _snapshot.restore_updates(back, frozen, snapshot, params, u)
  inner_state = _snapshot.restore_small(back, snapshot_inner, inner_state)
  k = jnp.where(pre["pending"] & ~pre["commit"], state.written,
                state.snapshot_step)  # the snapshot the buffers now hold
  step, total, count = state.step, state.total, state.count
  if d["loss"] is not None:
    ok = jnp.isfinite(d["loss"]) & ~bad
    total = total + jnp.where(ok, d["loss"], 0.0)
    count = _stats.inc(count, ok)
  restart = trigger | pre["due"]
  return u, RewindState(
      step=_stats.inc(step), rewound=trigger,
      rewinds=_stats.inc(state.rewinds, trigger),
      rewound_to=jnp.where(trigger, k, state.rewound_to),
      lost=_stats.inc(state.lost, jnp.where(trigger, step - k + 1, 0)),
      snapshot_step=jnp.where(take, _stats.inc(step), k), written=k,
      tries=_stats.inc(d["tries"], trigger),
      since=jnp.where(restart, 0, _stats.inc(state.since)),
      clean=restart | (state.clean & ~bad),
      above=jnp.where(trigger, 0, d["above"]),
      level=jnp.where(take & (count > 0), total / jnp.maximum(count, 1),
                      state.level),
      total=jnp.where(restart, 0.0, total),
      count=jnp.where(restart, 0, count), halt=d["halt"],
      snapshot=snapshot, snapshot_inner=snapshot_inner,
      inner_state=inner_state)
