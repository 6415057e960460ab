"""Argument and trace-time checks of :func:`gradtransforms.guard`, and its
triggers (:func:`_fired`)."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from gradtransforms import _checks, _events, _spikes

TRIGGERS = ("nonfinite", "spike", "loss_spike", "layer_spike", "norm_sigma")
ACTIONS = ("skip", "zero", "rescale")
CHECKS = ("updates", "gradients")


def _refuse_multisteps() -> None:
  """Raises if this update runs inside ``optax.MultiSteps`` without a
  ``should_skip_update_fn``: MultiSteps keeps a NaN micro-batch in its
  accumulator for ever (it clears it by multiplying by 0), so a guard
  inside it would skip every later step. Checked at trace time (a walk up
  the Python stack, no run-time cost)."""
  f = sys._getframe(2)
  for _ in range(64):
    if f is None:
      return
    code = f.f_code
    if (getattr(code, "co_qualname", "").startswith("MultiSteps.")
        and "optax" in code.co_filename):
      ms = f.f_locals.get("self")
      fn = getattr(ms, "_should_skip_update_fn", None)
      if fn is None or "MultiSteps.__init__" in getattr(fn, "__qualname__", ""):
        raise ValueError(
            "gt.guard inside optax.MultiSteps: one non-finite micro-batch "
            "would stay in MultiSteps' accumulator (0 * NaN = NaN) and every "
            "later step would be skipped. Put the guard outside: "
            "gt.guard(optax.MultiSteps(opt, k).gradient_transformation()) "
            "(it skips the bad micro-batch only), or pass "
            "should_skip_update_fn=optax.skip_not_finite to MultiSteps.")
      return
    f = f.f_back


def _triggers(on: Any) -> tuple:
  if isinstance(on, str):
    triggers: tuple = (on,)
  elif isinstance(on, (list, tuple)):
    triggers = tuple(on)
  else:
    raise TypeError(f"on must be a string or a sequence of strings from "
                    f"{TRIGGERS}, got {on!r}")
  for t in triggers:
    _checks.one_of("on", t, TRIGGERS)
  return triggers


def _check_mode(check: Any, check_updates: Any) -> str:
  """``check``, with the 0.2 keyword ``check_updates`` mapped onto it."""
  if check_updates is not None:
    check_updates = _checks.boolean("check_updates", check_updates)
    warnings.warn("guard(check_updates=...) is deprecated: the default "
                  'check="updates" checks the inner output; '
                  'check_updates=False is check="gradients"',
                  DeprecationWarning, stacklevel=3)
    mapped = "updates" if check_updates else "gradients"
    if check is not None and check != mapped:
      raise ValueError(f"guard: check={check!r} contradicts "
                       f"check_updates={check_updates}")
    return mapped
  check = "updates" if check is None else check
  _checks.one_of("check", check, CHECKS)
  return check


def _configure(inner, on_event, on, action, max_consecutive_errors,
               reset_inner_state, check, check_updates, norm_sigma,
               layer_z_thresh, rule):
  """Checks guard's arguments; returns the triggers, the checked
  arguments and the spike rules' kwargs (``rule``: the detector's own)."""
  _check_inner(inner)
  _events.check_hook(on_event)
  triggers = _triggers(on)
  _checks.one_of("action", action, ACTIONS)
  if max_consecutive_errors is not None:
    max_consecutive_errors = _checks.integer("max_consecutive_errors",
                                             max_consecutive_errors, 1)
  reset_inner_state = _checks.boolean("reset_inner_state", reset_inner_state)
  check_out = _check_mode(check, check_updates) == "updates"
  _checks.bound("norm_sigma", norm_sigma, strict=True)
  if layer_z_thresh is not None:
    _checks.bound("layer_z_thresh", layer_z_thresh, strict=True)
  z_thresh = rule[0]
  kw = _spikes.rule(
      *rule,
      layer_z_thresh=((z_thresh if layer_z_thresh is None else layer_z_thresh)
                      if "layer_spike" in triggers else None),
      norm_sigma=norm_sigma if "norm_sigma" in triggers else None)
  return triggers, max_consecutive_errors, reset_inner_state, check_out, kw


def _entry_checks(updates, params, extra, reset_inner_state, triggers):
  """Trace-time checks of an update call; returns the loss (or None)."""
  _checks.float_leaves("updates", updates)
  _refuse_multisteps()
  if reset_inner_state and params is None:
    raise ValueError("guard(reset_inner_state=True) needs params in update")
  loss = extra.get("value")
  if "loss_spike" in triggers and loss is None:
    raise ValueError('guard(on="loss_spike") needs the loss: call '
                     "update(grads, state, params, value=loss)")
  return loss


def _check_inner(inner: Any) -> None:
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    hint = (" (a factory such as optax.adam was given: call it, e.g. "
            "optax.adam(1e-3))" if callable(inner) else "")
    raise TypeError("inner must be an optax.GradientTransformation, got "
                    f"{inner!r}{hint}")


def _fired(det: Any, triggers: tuple) -> jax.Array:
  """Whether any spike rule listed in ``triggers`` fired on this step."""
  spike = jnp.zeros((), jnp.bool_)
  for t, flag in (("spike", det.norm_spike), ("loss_spike", det.loss_spike),
                  ("layer_spike", det.layer_spike),
                  ("norm_sigma", det.sigma_spike)):
    if t in triggers:
      spike = spike | flag
  return spike
