"""AdaGC: per-tensor adaptive clipping against an EMA of each tensor's norm."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms import _xla
from gradtransforms._registry import register


@register("adagc", ("norm", "threshold", "scale", "count"))
class AdaGCState(NamedTuple):
  """``gamma``: per-leaf EMA of clipped norms; ``count``: finite steps seen.

  ``norm`` (per-leaf, pre-clip), ``threshold`` (per-leaf bound used) and
  ``scale`` (per-leaf) are the last step's figures.
  """
  gamma: optax.Updates
  count: jax.Array
  norm: optax.Updates
  threshold: optax.Updates
  scale: optax.Updates


def adagc(relative_threshold: float = 1.05, beta: float = 0.98,
          warmup_steps: int = 100, max_norm: float = 1.0, *,
          axis_name: str | None = None) -> optax.GradientTransformation:
  """AdaGC (Wang et al., 2025, "AdaGC: Improving Training Stability for
  Large Language Model Pretraining").

  Each leaf ``i`` keeps ``gamma_i``, an EMA of its clipped gradient norm.

  * Warm-up (``t < warmup_steps``): global-norm clipping,
    ``g <- g * min(1, max_norm / ||g||)``, and
    ``gamma_i <- min(gamma_i, ||g_i||)`` (``gamma_i = ||g_i||`` at t = 0),
    with ``g_i`` the clipped leaf.
  * Then: ``g_i <- g_i * min(1, relative_threshold * gamma_i / ||g_i||)`` and
    ``gamma_i <- beta * gamma_i + (1 - beta) * ||g_i||`` (clipped norm).

  Non-finite input: a leaf with a non-finite norm passes unchanged and keeps
  its ``gamma``; during warm-up a non-finite global norm leaves every leaf
  unchanged. ``count`` advances only on steps with a finite global norm.

  State: :class:`AdaGCState`. Defaults are the paper's (lambda_rel = 1.05,
  beta = 0.98, T_start = 100, lambda_abs = 1.0).

  Args:
    relative_threshold: lambda_rel > 0.
    beta: EMA factor in [0, 1).
    warmup_steps: global-clipping steps T_start, >= 1 (the first step sets
      gamma).
    max_norm: global bound during warm-up, >= 0.
    axis_name: as in :func:`gradtransforms.clip_by_global_norm`.
  """
  _checks.positive("relative_threshold", relative_threshold)
  _checks.in_range("beta", beta, 0.0, 1.0, hi_open=True)
  warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1)
  _checks.nonnegative("max_norm", max_norm)

  @_xla.fresh_state
  def init_fn(params):
    zeros = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
    ones = jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)
    return AdaGCState(zeros, jnp.zeros((), jnp.int32), zeros, zeros, ones)

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    leaves, treedef = jax.tree.flatten(updates)
    g_norm, n = _norms.norms(leaves, axis_name)  # vectors over leaves from here
    gamma = jnp.stack(jax.tree.leaves(state.gamma)) if leaves else n
    g_ok = jnp.isfinite(g_norm)
    warm = state.count < warmup_steps
    bound = jnp.where(warm, jnp.where(g_ok, max_norm, jnp.inf),
                      relative_threshold * gamma)
    s = jnp.where(warm, _norms.clip_scale(g_norm, max_norm),
                  _norms.clip_scale(n, bound))
    clipped = n * s
    warm_gamma = jnp.where(state.count == 0, clipped, jnp.minimum(gamma, clipped))
    ema_gamma = beta * gamma + (1 - beta) * clipped
    ok = jnp.where(warm, g_ok, jnp.isfinite(n))
    gamma = jnp.where(ok, jnp.where(warm, warm_gamma, ema_gamma), gamma)
    as_tree = lambda v: jax.tree.unflatten(treedef, list(v))
    new_state = AdaGCState(as_tree(gamma), state.count + g_ok.astype(jnp.int32),
                           as_tree(n), as_tree(bound), as_tree(s))
    return _norms.scale_leaves(treedef, leaves, s), new_state

  return optax.GradientTransformation(init_fn, update_fn)
