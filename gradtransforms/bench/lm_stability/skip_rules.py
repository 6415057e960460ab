"""The skip-step rules of three large training stacks, restated as optax wrappers.

Baselines for ``benchmarks/lm_stability.py``. Each is our own code, written
after reading the file it restates (cited per function, with the commit);
none is imported from those stacks. All three share one idea: keep the last
``window`` losses and global gradient norms, and skip a step whose loss or
norm exceeds ``mean + sigma * std`` of that history, except during the
first half window. They differ in details that matter when a value is
non-finite:

* what enters the history (every value, NaN included, or finite ones only):
  a NaN in the history makes the mean and std NaN, every comparison false,
  and so every step is skipped until the NaN leaves the window;
* how a step is skipped: multiplying by a 0/1 factor (``0 * NaN = NaN``),
  ``jnp.where`` on the inner state, or ``lax.cond`` with a zero update.

The loss comes in as the extra argument ``value=loss`` (as for
``gt.guard``; ``loss=loss``, the stacks' own name, is accepted too). Every
state is a :class:`SkipRuleState` with ``skipped`` (last step) and
``skips`` (total) for the benchmark to read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SOURCES = {
    "olmo": "allenai/OLMo-core src/olmo_core/optim/skip_step_optimizer.py and "
            "adamw.py @ fa6c5014c9f6e9ee789da2d9c20d5126fee8df0d (main, "
            "2026-06-22; rule unchanged since 7633461e9, 2025-01-21)",
    "olmo_fix": "allenai/OLMo-core src/olmo_core/optim/skip_step_optimizer.py @ "
                "18079323606223bd90df6d5f574801b1f444e710 (PR #424 'handle nan "
                "losses/gnorms in the SkipStepOptimizer', 2025-10-16; not in "
                "main at fa6c5014c)",
    "levanter": "stanford-crfm/levanter src/levanter/optim/skipstep.py @ "
                "9263f81e8b453241332c2c0b2d2001bfb2d2241c (2025-09-26)",
    "maxtext": "AI-Hypercomputer/maxtext src/maxtext/optimizers/optimizers.py "
               "(skip_step_on_spikes) @ e591f30cbbf217ed67ef71263ec0538239f9c3b8 "
               "(2026-08-22)",
}


class SkipRuleState(NamedTuple):
  """``losses``/``norms``: ring buffers of the last ``window`` values (slot
  ``count % window``); ``count``: values seen; ``skipped``: the last step
  was skipped; ``skips``: steps skipped so far."""
  losses: jax.Array
  norms: jax.Array
  count: jax.Array  # type: ignore[assignment]
  skipped: jax.Array
  skips: jax.Array
  inner_state: optax.OptState


def _stats(buf: jax.Array, count: jax.Array, ddof: int, finite_only: bool,
           floor_ddof: bool) -> tuple[jax.Array, jax.Array]:
  """Mean and std of the filled slots of a ring buffer. A NaN in a used slot
  makes both NaN unless ``finite_only``. ``ddof=1`` is Bessel's correction
  (torch.std's default); with ``floor_ddof`` the divisor is at least 1 (as
  MaxText), otherwise fewer than ``ddof + 1`` values give NaN (as torch)."""
  used = jnp.arange(buf.shape[0]) < jnp.minimum(count, buf.shape[0])
  if finite_only:
    used = used & jnp.isfinite(buf)
  n = jnp.sum(used).astype(jnp.float32)
  mean = jnp.sum(jnp.where(used, buf, 0.0)) / jnp.maximum(n, 1.0)
  ss = jnp.sum(jnp.where(used, jnp.square(buf - mean), 0.0))
  if floor_ddof:
    var = ss / jnp.maximum(n - ddof, 1.0)
  else:
    var = jnp.where(n > ddof, ss / jnp.maximum(n - ddof, 1.0), jnp.nan)
    mean = jnp.where(n > 0, mean, jnp.nan)  # torch/jnp mean of nothing
  return mean, jnp.sqrt(var)


def _loss_of(extra: dict) -> jax.Array:
  loss = extra.pop("value", None)
  loss = extra.pop("loss", loss)
  if loss is None:
    raise ValueError("skip rules need the loss: tx.update(g, s, p, value=loss)")
  return jnp.asarray(loss, jnp.float32).reshape(())


def _factor_select(f: jax.Array, new: Any, old: Any) -> Any:
  """``f * new + (1 - f) * old`` per float leaf, the arithmetic of OLMo-core's
  skip-step AdamW (its moments are ``lerp``-ed with weight ``f * (1 - beta)``,
  the same numbers); integer leaves (step counts) take ``new`` iff ``f > 0``.
  ``0 * NaN = NaN``: a skipped NaN step still writes NaN."""
  def one(n, o):
    if jnp.issubdtype(jnp.asarray(n).dtype, jnp.inexact):
      return f.astype(n.dtype) * n + (1 - f).astype(n.dtype) * o
    return jnp.where(f > 0, n, o)
  return jax.tree.map(one, new, old)


def _skip_rule(inner: optax.GradientTransformation, *, window: int,
               sigma: float, ddof: int, floor_ddof: bool, std_floor: float,
               finite_only: bool, require_finite: bool, warmup_incl_current: bool,
               apply: str) -> optax.GradientTransformationExtraArgs:
  """The shared rule; each public function below fixes its stack's choices."""
  if window < 4:
    raise ValueError(f"window must be >= 4, got {window}")
  inner = optax.with_extra_args_support(inner)
  min_history = max(2, window // 2)

  def init_fn(params):
    z = jnp.zeros((window,), jnp.float32)
    return SkipRuleState(z, z, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                         jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    loss = _loss_of(extra)
    norm = optax.global_norm(updates).astype(jnp.float32)
    l_mean, l_std = _stats(state.losses, state.count, ddof, finite_only,
                           floor_ddof)
    n_mean, n_std = _stats(state.norms, state.count, ddof, finite_only,
                           floor_ddof)
    l_std, n_std = jnp.maximum(l_std, std_floor), jnp.maximum(n_std, std_floor)
    ok = ((loss - l_mean) <= sigma * l_std) & ((norm - n_mean) <= sigma * n_std)
    if require_finite:
      ok = ok & jnp.isfinite(loss) & jnp.isfinite(norm)
    seen = state.count + 1 if warmup_incl_current else state.count
    ok = ok | (seen < min_history)

    if apply == "cond":
      new_updates, inner_state = jax.lax.cond(
          ok, lambda: inner.update(updates, state.inner_state, params, **extra),
          lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state))
    else:
      f = ok.astype(jnp.float32)
      new_updates, inner_state = inner.update(updates, state.inner_state,
                                              params, **extra)
      new_updates = jax.tree.map(lambda u: f.astype(u.dtype) * u, new_updates)
      if apply == "factor":
        inner_state = _factor_select(f, inner_state, state.inner_state)
      else:  # "where"
        inner_state = jax.tree.map(lambda o, n: jnp.where(ok, n, o),
                                   state.inner_state, inner_state)

    slot = state.count % window  # every value enters, NaN included
    return new_updates, SkipRuleState(
        state.losses.at[slot].set(loss), state.norms.at[slot].set(norm),
        state.count + 1, ~ok, state.skips + (~ok).astype(jnp.int32),
        inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def olmo_skip_step(inner: optax.GradientTransformation, window: int = 128,
                   sigma: float = 6.0, *, fixed: bool = False
                   ) -> optax.GradientTransformationExtraArgs:
  """OLMo-core's ``SkipStepOptimizer`` with its ``SkipStepAdamW`` arithmetic.

  ``fixed=False`` restates main (``SOURCES["olmo"]``): the history keeps the
  last ``window`` losses and norms, every value appended, NaN included; the
  step goes ahead (factor 1) while fewer than ``max(2, window // 2)`` values,
  the current one included, were seen, and otherwise iff
  ``x - mean <= sigma * std`` for both the loss and the norm, with torch's
  unbiased ``std_mean`` over the previous values. ``fixed=True`` restates
  PR #424 (``SOURCES["olmo_fix"]``): mean and std over the finite values
  only, and a non-finite current loss or norm forces factor 0; the warm-up
  still lets everything through.

  The step is multiplied by the factor: new state ``f * new + (1 - f) * old``
  and update ``f * update`` (``SkipStepAdamW`` multiplies the moment EMAs'
  weights, the step increment, the decay and the update by ``f``). So a
  skipped step whose gradient is NaN still writes NaN into the moments and
  the parameters. Restating it around any inner optimizer is exact for Adam.
  """
  return _skip_rule(inner, window=window, sigma=sigma, ddof=1, floor_ddof=False,
                    std_floor=0.0, finite_only=fixed, require_finite=fixed,
                    warmup_incl_current=True, apply="factor")


def levanter_skip_bad_steps(inner: optax.GradientTransformation,
                            window: int = 128, sigma: float = 6.0
                            ) -> optax.GradientTransformationExtraArgs:
  """Levanter's ``SkipStepConfig.wrap`` (``skip_bad_steps``; ``SOURCES["levanter"]``).

  Ring buffers of ``window`` losses and norms (every value appended, NaN
  included); population std (``jnp.std``) floored at 1e-6; skip iff
  ``loss > mean + sigma * std`` or ``norm > ...``, possible once at least
  ``max(2, window // 2)`` previous values are in the buffer. The inner
  optimizer always runs; its new state is kept with ``jnp.where`` (a skipped
  step leaves the moments exactly as they were) but the update is
  ``factor * update``, so a skipped NaN gradient still gives a NaN update.
  """
  return _skip_rule(inner, window=window, sigma=sigma, ddof=0, floor_ddof=False,
                    std_floor=1e-6, finite_only=False, require_finite=False,
                    warmup_incl_current=False, apply="where")


def maxtext_skip_step_on_spikes(inner: optax.GradientTransformation,
                                interval: int = 128, scaling_factor: float = 6.0
                                ) -> optax.GradientTransformationExtraArgs:
  """MaxText's ``skip_step_on_spikes`` (``SOURCES["maxtext"]``).

  Ring buffers of ``interval`` losses and norms (every value appended, NaN
  included, "so spikes can become the new baseline"); mean and Bessel
  -corrected std with the divisor floored at 1; ok iff
  ``x - mean <= scaling_factor * std`` for both; ok anyway while
  ``count + 1 < max(2, interval // 2)``. ``lax.cond``: a skipped step runs
  no inner update, returns zeros and leaves the inner state frozen, so no
  NaN reaches parameters or moments on a skipped step.
  """
  return _skip_rule(inner, window=interval, sigma=scaling_factor, ddof=1,
                    floor_ddof=True, std_floor=0.0, finite_only=False,
                    require_finite=False, warmup_incl_current=True, apply="cond")


def find_states(opt_state: Any) -> list[Any]:
  """Every :class:`SkipRuleState` and ``optax.ApplyIfFiniteState`` in a state."""
  kinds = (SkipRuleState, optax.ApplyIfFiniteState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, kinds)) if isinstance(s, kinds)]
