"""``guard``: wrap an optimizer and act on non-finite or spiking steps."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _events, _norms, _spikes, _stats, _xla
from gradtransforms._layout import LayerAxes
from gradtransforms._registry import register

TRIGGERS = ("nonfinite", "spike", "loss_spike")
ACTIONS = ("skip", "zero", "rescale")


@register("guard", ("step", "bad", "consecutive", "skipped", "halt", "halts",
                    "resets"), {"skip": "bad"})
class GuardState(NamedTuple):
  """``step``: update calls; ``bad``: the last step triggered;
  ``consecutive``: bad steps in a row; ``skipped``: bad steps so far;
  ``halt``: ``max_consecutive_errors`` was reached (sticky: poll it to stop
  a run); ``halts``/``resets``: how often it was reached / the inner state
  was re-initialised. ``detector`` holds the spike detector's state (its
  figures appear under ``detect_spikes/``).
  """
  step: jax.Array
  bad: jax.Array
  consecutive: jax.Array
  skipped: jax.Array
  halt: jax.Array
  halts: jax.Array
  resets: jax.Array
  detector: _spikes.DetectSpikesState
  inner_state: optax.OptState


def _check_inner(inner: Any) -> None:
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    hint = (" (a factory such as optax.adam was given: call it, e.g. "
            "optax.adam(1e-3))" if callable(inner) else "")
    raise TypeError("inner must be an optax.GradientTransformation, got "
                    f"{inner!r}{hint}")


def guard(inner: optax.GradientTransformation,
          on: str | Sequence[str] = "nonfinite", action: str = "skip",
          max_consecutive_errors: int | None = None,
          reset_inner_state: bool = False, *, check_updates: bool = False,
          z_thresh: float = 6.0, warmup_steps: int = 20, decay: float = 0.98,
          loss_z_thresh: float | None = None, layer_axes: LayerAxes = None,
          on_event: Callable[[dict], Any] | None = None,
          axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on good steps and acts on bad ones.

  A step is *bad* if its gradient norm (or the loss, when passed as
  ``value=loss``) is non-finite, always; with ``check_updates=True`` also if
  ``inner``'s output is non-finite (an optimizer can produce Inf/NaN from
  finite gradients: float16 state, ``eps=0`` on a zero gradient, an
  overflowing scale); and, if listed in ``on``, if
  :func:`gradtransforms.detect_spikes`'s rule flags a gradient-norm
  (``"spike"``) or loss (``"loss_spike"``, needs ``value=loss``) spike. On a
  bad step:

  * ``action="skip"``: the update is zero (``-0.0``, so ``apply_updates``
    leaves every parameter bit-identical, ``-0.0`` included) and ``inner``'s
    state is left untouched.
  * ``action="zero"``: ``inner`` sees a zero gradient (its state advances,
    e.g. momentum decays and Adam's count grows).
  * ``action="rescale"``: on a spike the gradient is scaled down to the
    running typical norm ``exp(mean log ||g||)`` and passed to ``inner``; a
    non-finite step is skipped.

  Unlike ``optax.apply_if_finite``, the guard never lets a non-finite
  gradient reach ``inner`` or the params, however many bad steps come in a
  row: after ``max_consecutive_errors`` of them it sets the sticky ``halt``
  flag (and, with ``reset_inner_state=True``, re-initialises ``inner``'s
  state from ``params`` and starts counting again), and keeps skipping.
  Without ``check_updates`` a non-finite *output* of ``inner`` from finite
  gradients is not caught (that check costs one more read of the update).

  Cost: one read of the gradients (norm and finiteness, in float32) and,
  for ``skip``/``rescale``, on CPU one update-sized buffer: to undo a step
  the update is computed from the old inner state before the new state
  overwrites it in place (see ``_xla.rollback``).

  State: :class:`GuardState`; figures via ``gt.metrics`` (``guard/...`` and
  ``detect_spikes/...``).

  Args:
    inner: the optimizer to guard (an instance, e.g. ``optax.adam(1e-3)``).
    on: triggers besides ``"nonfinite"``: any of ``"spike"``,
      ``"loss_spike"`` (a string or a sequence).
    action: ``"skip"``, ``"zero"`` or ``"rescale"``.
    max_consecutive_errors: bad steps in a row that set ``halt`` (optax's
      name); None: never.
    reset_inner_state: re-initialise ``inner`` when ``halt`` is reached.
    check_updates: also treat a non-finite output of ``inner`` as bad.
    z_thresh, warmup_steps, decay, loss_z_thresh, layer_axes: the spike rule
      and attribution, as in :func:`gradtransforms.detect_spikes`.
    on_event: optional host hook (``jax.debug.callback``) called with the
      figures on bad steps; None (default) traces nothing.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`; every
      device then takes the same skip decision.
  """
  _check_inner(inner)
  if isinstance(on, str):
    triggers: tuple = (on,)
  elif isinstance(on, (list, tuple)):
    triggers = tuple(on)
  else:
    raise TypeError(f"on must be a string or a sequence of strings from "
                    f"{TRIGGERS}, got {on!r}")
  for t in triggers:
    _checks.one_of("on", t, TRIGGERS)
  _checks.one_of("action", action, ACTIONS)
  if max_consecutive_errors is not None:
    max_consecutive_errors = _checks.integer("max_consecutive_errors",
                                             max_consecutive_errors, 1)
  reset_inner_state = _checks.boolean("reset_inner_state", reset_inner_state)
  check_updates = _checks.boolean("check_updates", check_updates)
  kw = _spikes.rule(z_thresh, warmup_steps, decay, loss_z_thresh, axis_name,
                    layer_axes)
  _events.check_hook(on_event)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    i, f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_)
    own = _xla.fresh(dict(step=i, bad=f, consecutive=i, skipped=i, halt=f,
                          halts=i, resets=i))
    return GuardState(**own, detector=_spikes.init_state(params, kw["layer_axes"]),
                      inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    _checks.float_leaves("updates", updates)
    if reset_inner_state and params is None:
      raise ValueError("guard(reset_inner_state=True) needs params in update")
    loss = extra.get("value")
    if "loss_spike" in triggers and loss is None:
      raise ValueError('guard(on="loss_spike") needs the loss: call '
                       "update(grads, state, params, value=loss)")
    det = _spikes.observe(state.detector, updates, loss, what="guard", **kw)
    updates, det = _xla.detach(updates, det)
    nonfinite = det.nonfinite
    spike = jnp.zeros((), jnp.bool_)
    if "spike" in triggers:
      spike = spike | det.norm_spike
    if "loss_spike" in triggers:
      spike = spike | det.loss_spike
    bad = nonfinite | spike

    if action == "zero":
      g = _norms.select_tree(bad, _norms.zeros_like_tree(updates), updates)
    elif action == "rescale":
      typical = jnp.exp(state.detector.norm_stats.mean)
      s = jnp.where(spike & ~nonfinite, _norms.clip_scale(det.norm, typical), 1.0)
      g = _norms.scale_tree(updates, s)
    else:
      g = updates
    new_updates, inner_state = inner.update(g, state.inner_state, params, **extra)
    if check_updates:
      bad_out = ~jnp.isfinite(_norms.global_norm(new_updates, axis_name))
      bad = bad | bad_out
      nonfinite = nonfinite | bad_out
    if action != "zero":  # with "zero", inner saw a zero gradient: keep that
      skip = bad if action == "skip" else nonfinite
      new_updates, inner_state = _xla.rollback(skip, new_updates,
                                               state.inner_state, inner_state)
    elif check_updates:
      new_updates, inner_state = _xla.rollback(bad_out, new_updates,
                                               state.inner_state, inner_state)

    consecutive = jnp.where(bad, _stats.inc(state.consecutive), 0)
    hit = jnp.zeros((), jnp.bool_)
    if max_consecutive_errors is not None:
      hit = consecutive >= max_consecutive_errors
    resets = state.resets
    if reset_inner_state:
      inner_state = _norms.select_tree(hit, inner.init(params), inner_state)
      consecutive = jnp.where(hit, 0, consecutive)
      resets = _stats.inc(resets, hit)
    new = GuardState(step=_stats.inc(state.step), bad=bad,
                     consecutive=consecutive,
                     skipped=_stats.inc(state.skipped, bad),
                     halt=state.halt | hit, halts=_stats.inc(state.halts, hit),
                     resets=resets, detector=det, inner_state=inner_state)
    figs = dict(_spikes.event_figures(det), bad=bad, consecutive=consecutive,
                halt=new.halt)
    _events.emit(on_event, bad, figs, det.leaf_log_mean.names)
    return new_updates, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
