"""``guard``: wrap an optimizer and act on non-finite or spiking steps.

Cost, per step (+ Adam; H100 and TPU v5e deviceless, 2-core CPU): the
gradient's norm and finiteness take one read of the gradients. The default
``check="updates"`` needs ``inner``'s output before the step is taken, so
it computes that output once more and reduces it without writing it: a
second read of what ``inner`` reads (for Adam the gradients and both
moments: 1.43x Adam's DRAM bytes, the floor of any check of a generic
optimizer's output; ``optax.apply_if_finite`` checks only the gradient,
1.14x). On GPU/TPU that reduction is fused with the gradients' norms (one
kernel per leaf; H100: 3 kernels per leaf like ``apply_if_finite``, plus
13 small scalar kernels of bookkeeping where it has 4) and the step is a
select (no branch, no host sync). On CPU the output check runs first, in
a ``lax.cond`` that reduces ``inner``'s output without writing it, and the
step is then taken in place with the skip selected where ``inner`` computes
its new state (``_in_place.step``): no copy of the state to undo a step, no
update-sized buffer (50M parameters in 100 leaves, 2-core CPU: 1.81x Adam's
step, 2.33x before; ``apply_if_finite`` 2.5-3.2x). ``check="gradients"``,
the cheaper mode, skips the output check (1.14x bytes, as
``apply_if_finite``; CPU 1.12x Adam's step) and lets a non-finite output of
``inner`` from finite gradients through.

Gradient accumulation: wrap the accumulator,
``gt.guard(optax.MultiSteps(opt, k).gradient_transformation())``: each
micro-batch is checked and a bad one is dropped (step numbers then count
micro-batches). ``optax.MultiSteps(gt.guard(opt), k)`` raises at trace
time unless MultiSteps is given ``should_skip_update_fn`` (e.g.
``optax.skip_not_finite``): its accumulator would keep a NaN for ever.

Unlike ``optax.apply_if_finite`` (which, in optax 0.2.8, checks only the
gradient it is given: float16 Adam on a gradient of 1e-4, Adam with
``eps=0`` on a zero gradient and an overflowing scale all reach the params
through it as Inf/NaN), the guard by default also checks what it applies,
and never lets a non-finite gradient reach ``inner`` or the params,
however many bad steps come in a row: after ``max_consecutive_errors`` of
them it sets the sticky ``halt`` flag (and, with
``reset_inner_state=True``, re-initialises ``inner``'s state from
``params`` and starts counting again), and keeps skipping.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from gradtransforms import (_events, _layout, _norms, _output_check,
                            _read_once, _spikes, _stats, _xla)
from gradtransforms._layout import LayerAxes
from gradtransforms._registry import register

from gradtransforms._guard_checks import (  # noqa: F401 (TRIGGERS re-exported)
    ACTIONS, CHECKS, TRIGGERS, _configure, _entry_checks, _fired)


@register("guard", ("step", "norm", "bad", "output_bad", "consecutive",
                    "skipped", "halt", "halts", "resets"),
          {"skip": "bad", "global_norm": "norm"})
class GuardState(NamedTuple):
  """The guard's state; every figure describes the step just taken.

  ``step``: update calls (with gradient accumulation as documented,
  micro-batches); ``norm`` (a property): that step's own global gradient
  norm, as the guard saw it (before ``inner``; NaN/Inf on a non-finite
  step), also on a skipped step; ``bad``: that step triggered (so it was
  skipped, zeroed or rescaled per ``action``); ``output_bad``: the
  gradient passed but ``inner``'s output was non-finite (``check="updates"``;
  the step was skipped);
  ``consecutive``: bad steps in a row; ``skipped``: bad steps so far;
  ``halt``: ``max_consecutive_errors`` was reached (sticky: poll it to stop
  a run); ``halts``/``resets``: how often it was reached / the inner state
  was re-initialised. ``detector`` holds the spike detector's state
  (:class:`gradtransforms.DetectSpikesState`: the loss, z-scores, per-rule
  spike flags, and ``culprit``/``culprit_step``, the segment blamed at the
  last bad step, named by ``gt.culprits``). ``inner_state``: ``inner``'s
  state, whose figures are those of the last step ``inner`` ran (on a
  skipped step they are stale: read ``norm`` here).
  """
  step: jax.Array
  bad: jax.Array
  output_bad: jax.Array
  consecutive: jax.Array
  skipped: jax.Array
  halt: jax.Array
  halts: jax.Array
  resets: jax.Array
  detector: _spikes.DetectSpikesState
  inner_state: optax.OptState

  @property
  def norm(self) -> jax.Array:
    return self.detector.norm


def _prepare(action, bad, spike, nonfinite, det, state):
  """``(prep, pre_skip)``: what ``inner`` gets as gradient, and whether the
  step is skipped before ``inner`` runs."""
  if action == "zero":
    return (lambda u: _norms.select_tree(bad, _norms.zeros_like_tree(u), u),
            jnp.zeros((), jnp.bool_))
  if action == "rescale":
    typical = jnp.exp(state.detector.norm_stats.mean)
    s = jnp.where(spike & ~nonfinite, _norms.clip_scale(det.norm, typical), 1.0)
    return (lambda u: _norms.scale_tree(u, s)), nonfinite
  return (lambda u: u), bad


def _counted(state, bad, max_errors) -> tuple[jax.Array, jax.Array]:
  """``(consecutive, hit)``: bad steps in a row, and whether that reaches
  ``max_errors``."""
  consecutive = jnp.where(bad, _stats.inc(state.consecutive), 0)
  hit = jnp.zeros((), jnp.bool_)
  if max_errors is not None:
    hit = consecutive >= max_errors
  return consecutive, hit


def _bookkeep(state, bad, out_bad, det, inner_state, params, *, inner,
              max_errors, reset, on_event, reset_done=False) -> GuardState:
  """The guard's counters, ``halt`` and the optional reset (unless the step
  did it, ``reset_done``) and event."""
  consecutive, hit = _counted(state, bad, max_errors)
  resets = state.resets
  if reset:
    if not reset_done:
      inner_state = _norms.select_tree(hit, inner.init(params), inner_state)
    consecutive = jnp.where(hit, 0, consecutive)
    resets = _stats.inc(resets, hit)
  halt, halts = state.halt, state.halts  # never reached: passed on as is
  if max_errors is not None:
    halt, halts = halt | hit, _stats.inc(halts, hit)
  new = GuardState(step=_stats.inc(state.step), bad=bad, output_bad=out_bad,
                   consecutive=consecutive,
                   skipped=_stats.inc(state.skipped, bad), halt=halt, halts=halts,
                   resets=resets, detector=det, inner_state=inner_state)
  figs = dict(_spikes.event_figures(det), bad=bad, output_bad=out_bad,
              consecutive=consecutive, halt=new.halt)
  _events.emit(on_event, bad, figs, det.leaf_log_mean.names)
  return new


def _observe(inner, updates, state, params, extra, loss, kw, *, fused):
  """``(detector, out_ok)``: the detector's step and, with ``fused``
  (``check="updates"``, ``action="skip"``), on GPU/TPU whether ``inner``'s
  output is finite, reduced in the same pass as the gradients' norms
  (``_output_check.sums_with_output_check``); else ``out_ok`` is None."""
  sums = out_ok = None
  if fused:
    sums, out_ok = _output_check.sums_with_output_check(
        jax.tree.leaves(updates), _layout.layout(updates, kw["layer_axes"]),
        lambda s: inner.update(updates, s, params, **extra)[0],
        state.inner_state, kw["axis_name"])
  return _spikes.observe(state.detector, updates, loss, what="guard",
                         sums=sums, **kw), out_ok


def _run(inner, det, state, updates, params, extra, *, triggers, action,
         check_out, axis_name, out_ok=None, reset_at=None):
  """Decides the step from the gradient's figures and runs ``inner`` (or
  not); returns ``(updates, inner_state, bad, output_bad)``. With
  ``reset_at`` (``action="skip"``, where a step is bad iff it is skipped)
  a skipped step that reaches ``reset_at`` bad steps in a row keeps a fresh
  ``inner.init(params)`` instead of the old state, selected in the same
  place (on CPU a select after the step would cost a parameter-sized
  temporary)."""
  nonfinite = det.nonfinite
  spike = _fired(det, triggers)
  bad = nonfinite | spike
  prep, pre_skip = _prepare(action, bad, spike, nonfinite, det, state)

  def run(grads, inner_state, params):  # the gradient is prepared inside,
    return inner.update(prep(grads), inner_state, params, **extra)  # fused
  if action == "zero" and not check_out:  # inner always runs
    new_updates, inner_state = run(updates, state.inner_state, params)
    out_bad = jnp.zeros((), jnp.bool_)
  else:
    skip_state = None
    if reset_at is not None:
      def skip_state(skip):
        hit = _counted(state, skip, reset_at)[1]
        return _norms.select_tree(hit, inner.init(params), state.inner_state)
    new_updates, inner_state, out_bad = _output_check.guarded_step(
        pre_skip, run, updates, state.inner_state, params, check_out,
        axis_name, out_ok, skip_state)
  bad = bad | out_bad
  return new_updates, inner_state, bad, out_bad


def guard(inner: optax.GradientTransformation,
          on: str | Sequence[str] = "nonfinite", action: str = "skip",
          max_consecutive_errors: int | None = None,
          reset_inner_state: bool = False, *, check: str | None = None,
          check_updates: bool | None = None,
          z_thresh: float = 6.0, warmup_steps: int = 20, decay: float = 0.98,
          loss_z_thresh: float | None = None,
          layer_z_thresh: float | None = None, norm_sigma: float = 6.0,
          layer_axes: LayerAxes = None,
          on_event: Callable[[dict], Any] | None = None,
          axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on good steps and acts on bad ones.

  A step is *bad* if its gradient norm (or the loss, when passed as
  ``value=loss``) is non-finite; with ``check="updates"`` (the default)
  also if ``inner``'s output is non-finite (an optimizer can make Inf/NaN
  from finite gradients: float16 state, ``eps=0`` on a zero gradient, an
  overflowing scale; such a step is always skipped); and if a rule listed
  in ``on`` fires (:func:`gradtransforms.detect_spikes`'s rules, on the
  same one read of the gradients):

  * ``"spike"``: ``z(log ||g||) > z_thresh`` against its EMA statistics;
  * ``"loss_spike"``: the loss's z-score ``> loss_z_thresh`` (needs
    ``value=loss``);
  * ``"layer_spike"``: any segment's (leaf's, or with ``layer_axes`` layer
    slice's) ``z(log ||g_i||) > layer_z_thresh`` (default ``z_thresh``)
    against its own statistics: a fault in one small layer that the global
    norm hides;
  * ``"norm_sigma"``: ``||g|| > mean + norm_sigma * std`` of the raw norm
    (EMA statistics, decay ``decay``): the rule of OLMo-core, Levanter and
    MaxText (they keep a 128-step window instead).

  On a bad step:

  * ``action="skip"``: the update is zero (``-0.0``, so ``apply_updates``
    leaves every parameter bit-identical, ``-0.0`` included) and ``inner``'s
    state is left untouched.
  * ``action="zero"``: ``inner`` sees a zero gradient (its state advances,
    e.g. momentum decays and Adam's count grows).
  * ``action="rescale"``: on a spike the gradient is scaled down to the
    running typical norm ``exp(mean log ||g||)`` and passed to ``inner``; a
    non-finite step is skipped.

  Comparison with ``optax.apply_if_finite``, cost, gradient accumulation:
  see the module docstring. State: :class:`GuardState`; figures via
  ``gt.metrics`` (``guard/...`` and ``detect_spikes/...``).

  Args:
    inner: the optimizer to guard (an instance, e.g. ``optax.adam(1e-3)``).
    on: triggers besides ``"nonfinite"``: any of ``"spike"``,
      ``"loss_spike"``, ``"layer_spike"``, ``"norm_sigma"`` (a string or a
      sequence).
    action: ``"skip"``, ``"zero"`` or ``"rescale"``.
    max_consecutive_errors: bad steps in a row that set ``halt`` (optax's
      name); None: never.
    reset_inner_state: re-initialise ``inner`` when ``halt`` is reached.
    check: ``"updates"`` (default: the gradient and ``inner``'s output) or
      ``"gradients"`` (the gradient only; cheaper).
    check_updates: deprecated (0.2): True/False is ``check="updates"/"gradients"``.
    z_thresh, warmup_steps, decay, loss_z_thresh, layer_axes: the spike
      rules and attribution, as in :func:`gradtransforms.detect_spikes`.
    layer_z_thresh: threshold of ``"layer_spike"``; default ``z_thresh``.
    norm_sigma: ``k`` of ``"norm_sigma"``, > 0 (default 6, as OLMo-core).
    on_event: optional host hook (``jax.debug.callback``) called with the
      figures on bad steps; None (default) traces nothing.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`; every
      device then takes the same skip decision.
  """
  triggers, max_consecutive_errors, reset_inner_state, check_out, kw = (
      _configure(inner, on_event, on, action, max_consecutive_errors,
                 reset_inner_state, check, check_updates, norm_sigma,
                 layer_z_thresh, (z_thresh, warmup_steps, decay,
                                  loss_z_thresh, axis_name, layer_axes)))
  inner = optax.with_extra_args_support(inner)
  in_step = reset_inner_state and action == "skip"  # the reset, in the step

  def init_fn(params):
    i, f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_)
    own = _xla.fresh(dict(step=i, bad=f, output_bad=f, consecutive=i,
                          skipped=i, halt=f, halts=i, resets=i))
    return GuardState(**own, detector=_spikes.init_state(params, kw["layer_axes"]),
                      inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    loss = _entry_checks(updates, params, extra, reset_inner_state, triggers)
    inner_once = _xla.traced_once(inner)
    state, restore = _read_once.read_once(state, bools_as_words=True)
    det, out_ok = _observe(inner_once, updates, state, params, extra, loss, kw,
                           fused=check_out and action == "skip")
    updates, det = _xla.detach(updates, restore(det))
    new_updates, inner_state, bad, out_bad = _run(
        inner_once, det, state, updates, params, extra, triggers=triggers,
        action=action, check_out=check_out, axis_name=axis_name, out_ok=out_ok,
        reset_at=max_consecutive_errors if in_step else None)
    return new_updates, restore(_bookkeep(
        state, bad, out_bad, det, inner_state, params, inner=inner,
        max_errors=max_consecutive_errors, reset=reset_inner_state,
        on_event=on_event, reset_done=in_step))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
