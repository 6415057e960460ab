"""``guard``: wrap an optimizer and act on non-finite or spiking steps."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _events
from gradtransforms import _norms
from gradtransforms import _xla
from gradtransforms import detect
from gradtransforms._registry import register

TRIGGERS = ("nonfinite", "spike", "loss_spike")
ACTIONS = ("skip", "zero", "rescale")


@register("guard", ("step", "bad", "consecutive", "skipped", "halt", "halts",
                    "resets"))
class GuardState(NamedTuple):
  """``bad``: the last step triggered; ``consecutive``: bad steps in a row;
  ``skipped``: bad steps so far; ``halt``: ``max_consecutive`` was reached
  (sticky: poll it to stop a run); ``halts``/``resets``: how often it was
  reached / the inner state was re-initialised. ``detector`` holds the
  spike detector's state (its figures appear under ``detect_spikes/``).
  """
  step: jax.Array
  bad: jax.Array
  consecutive: jax.Array
  skipped: jax.Array
  halt: jax.Array
  halts: jax.Array
  resets: jax.Array
  detector: detect.DetectSpikesState
  inner_state: optax.OptState


def guard(inner: optax.GradientTransformation,
          on: str | Sequence[str] = "nonfinite", action: str = "skip",
          max_consecutive: int | None = None, reset_inner_state: bool = False,
          *, z_thresh: float = 6.0, warmup_steps: int = 20, alpha: float = 0.98,
          loss_z_thresh: float | None = None,
          on_event: Callable[[dict], Any] | None = None,
          axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on good steps and acts on bad ones.

  A step is *bad* if its gradient norm (or the loss, when passed as
  ``value=loss``) is non-finite, always, and, if listed in ``on``, if
  :func:`gradtransforms.detect_spikes`'s rule flags a gradient-norm
  (``"spike"``) or loss (``"loss_spike"``) spike. On a bad step:

  * ``action="skip"``: the update is zero (``-0.0``, so ``apply_updates``
    leaves every parameter bit-identical, ``-0.0`` included) and ``inner``'s
    state is left untouched.
  * ``action="zero"``: ``inner`` sees a zero gradient (its state advances,
    e.g. momentum decays and Adam's count grows).
  * ``action="rescale"``: on a spike the gradient is scaled down to the
    running typical norm ``exp(mean log ||g||)`` and passed to ``inner``; a
    non-finite step is skipped.

  Unlike ``optax.apply_if_finite``, the guard never applies a non-finite
  update, however many bad steps come in a row: after ``max_consecutive``
  of them it sets the sticky ``halt`` flag (and, with
  ``reset_inner_state=True``, re-initialises ``inner``'s state from
  ``params`` and starts counting again), and keeps skipping.

  Cost: one read of the gradients (norm and finiteness, in float32) and,
  for ``skip``/``rescale``, one update-sized buffer: to undo a step the
  update is computed from the old inner state before the new state
  overwrites it in place (see ``_xla.rollback``); otherwise XLA would
  copy the whole inner state every step.

  State: :class:`GuardState`; figures via ``gt.metrics`` (``guard/...`` and
  ``detect_spikes/...``).

  Args:
    inner: the optimizer to guard.
    on: triggers besides ``"nonfinite"``: any of ``"spike"``,
      ``"loss_spike"`` (a string or a sequence).
    action: ``"skip"``, ``"zero"`` or ``"rescale"``.
    max_consecutive: bad steps in a row that set ``halt``; None: never.
    reset_inner_state: re-initialise ``inner`` when ``halt`` is reached.
    z_thresh, warmup_steps, alpha, loss_z_thresh: the spike rule, as in
      :func:`gradtransforms.detect_spikes`.
    on_event: optional host hook (``jax.debug.callback``) called with the
      figures on bad steps; None (default) traces nothing.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`; every
      device then takes the same skip decision.
  """
  triggers = (on,) if isinstance(on, str) else tuple(on)
  for t in triggers:
    _checks.one_of("on", t, TRIGGERS)
  _checks.one_of("action", action, ACTIONS)
  if max_consecutive is not None:
    max_consecutive = _checks.integer("max_consecutive", max_consecutive, 1)
  rule = detect.spike_rule(z_thresh, warmup_steps, alpha, loss_z_thresh,
                           axis_name)
  _events.check_hook(on_event)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    i, f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_)
    return GuardState(*_xla.fresh((i, f, i, i, f, i, i)),
                      detect.init_state(params), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    _checks.float_leaves("updates", updates)
    if reset_inner_state and params is None:
      raise ValueError("guard(reset_inner_state=True) needs params in update")
    det = detect.observe(state.detector, updates, extra.get("value"), **rule)
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
    if action != "zero":  # with "zero", inner saw a zero gradient: keep that
      skip = bad if action == "skip" else nonfinite
      new_updates, inner_state = _xla.rollback(skip, new_updates,
                                              state.inner_state, inner_state)

    consecutive = jnp.where(bad, state.consecutive + 1, 0)
    hit = jnp.zeros((), jnp.bool_)
    if max_consecutive is not None:
      hit = consecutive >= max_consecutive
    resets = state.resets
    if reset_inner_state:
      inner_state = _norms.select_tree(hit, inner.init(params), inner_state)
      consecutive = jnp.where(hit, 0, consecutive)
      resets = resets + hit.astype(jnp.int32)
    new = GuardState(state.step + 1, bad, consecutive,
                     state.skipped + bad.astype(jnp.int32), state.halt | hit,
                     state.halts + hit.astype(jnp.int32), resets, det,
                     inner_state)
    _events.emit(on_event, bad, dict(detect.event_figures(det), bad=bad,
                                     consecutive=consecutive, halt=new.halt))
    return new_updates, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
