"""Norm clipping: by value, global norm, per-leaf norm, block RMS.

Non-finite input, one rule for all of them: a clip never repairs or spreads
Inf/NaN. Where a norm is non-finite its scale is 1, so the update passes
through unchanged (finite leaves stay finite, an Inf is not turned into NaN,
0/0 never happens) and a downstream :func:`gradtransforms.guard` can act on
it. The non-finite norm is recorded in the state for logging; no later step
depends on it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks
from gradtransforms import _norms
from gradtransforms import _xla
from gradtransforms._registry import register


@register("clip_by_value", ("max_abs", "threshold", "clipped"),
          {"threshold": "threshold", "clipped": "clipped"})
class ClipByValueState(NamedTuple):
  """Last step: the largest ``|u|`` before clipping (NaN if the update held
  a NaN) and the bound in force (``max_abs`` argument, injected or not)."""
  max_abs: jax.Array
  threshold: jax.Array

  @property
  def clipped(self) -> jax.Array:
    return self.max_abs > self.threshold


@register("clip_by_global_norm", ("norm", "scale"))
class ClipByGlobalNormState(NamedTuple):
  """Figures of the last step: pre-clip global norm and the applied scale."""
  norm: jax.Array
  scale: jax.Array


@register("clip_by_leaf_norm", ("norm", "scale"))
class ClipByLeafNormState(NamedTuple):
  """Per-leaf pre-clip L2 norms and scales (trees of scalars)."""
  norm: optax.Updates
  scale: optax.Updates


@register("clip_by_block_rms", ("rms", "scale"))
class ClipByBlockRMSState(NamedTuple):
  """Per-leaf pre-clip RMS and scales (trees of scalars)."""
  rms: optax.Updates
  scale: optax.Updates


def _scalar_tree(params) -> optax.Updates:
  return jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)


def _ones_tree(params) -> optax.Updates:
  return jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)


def _clip_per_leaf(updates, bound, axis_name, rms: bool):
  """Scales each leaf to ``||u_i|| <= bound`` (``rms``: ``||u_i|| / sqrt(size_i)``).

  Returns ``(clipped tree, per-leaf measure tree, per-leaf scale tree)``; the
  scales are one vector op over the leaves, not one op per leaf.
  """
  leaves, treedef = jax.tree.flatten(updates)
  _, m = _norms.norms(leaves, axis_name)
  if rms:
    sizes = jnp.asarray([max(x.size, 1) for x in leaves], jnp.float32)
    if axis_name is not None:
      sizes = jax.lax.psum(sizes, axis_name)
    m = m * jax.lax.rsqrt(sizes)
  s = _norms.clip_scale(m, bound)
  as_tree = lambda v: jax.tree.unflatten(treedef, list(v))
  return _norms.scale_leaves(treedef, leaves, s), as_tree(m), as_tree(s)


def clip_by_value(max_abs: float) -> optax.GradientTransformation:
  """Clips every element to ``[-max_abs, max_abs]``.

  ``u <- clip(u, -max_abs, max_abs)``; the same numbers as ``optax.clip``.
  NaN stays NaN, +-Inf become +-max_abs.

  State: :class:`ClipByValueState`: the pre-clip ``max |u|`` and the bound.

  Args:
    max_abs: the bound, >= 0.
  """
  _checks.nonnegative("max_abs", max_abs)

  @_xla.fresh_state
  def init_fn(params):
    del params
    return ClipByValueState(max_abs=jnp.zeros((), jnp.float32),
                            threshold=jnp.asarray(max_abs, jnp.float32))

  def update_fn(updates, state, params=None):
    del state, params
    _checks.float_leaves("updates", updates)
    leaves = jax.tree.leaves(updates)
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(u)).astype(jnp.float32)
                              for u in leaves if u.size] or [jnp.zeros(())]))
    new = jax.tree.map(
        lambda u: jnp.clip(u, -jnp.asarray(max_abs, u.dtype),
                           jnp.asarray(max_abs, u.dtype)), updates)
    return new, ClipByValueState(max_abs=peak,
                                 threshold=jnp.asarray(max_abs, jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float, *, axis_name: str | None = None
                        ) -> optax.GradientTransformation:
  """Scales the whole update so its global L2 norm is at most ``max_norm``.

  ``n = sqrt(sum_leaves sum u**2)``, ``s = max_norm / n if n > max_norm else 1``,
  ``u <- s * u`` (Pascanu et al., 2013, "On the difficulty of training
  recurrent neural networks"). The same numbers as
  ``optax.clip_by_global_norm`` and ``torch.nn.utils.clip_grad_norm_`` on
  finite input, at about one extra read of the update: the scale is a scalar
  multiplied in, not an elementwise divide.

  Norms accumulate in float32; output dtypes equal input dtypes. A zero update
  stays zero; ``max_norm = 0`` zeroes the update. A non-finite norm leaves the
  update unchanged (see module doc).

  State: :class:`ClipByGlobalNormState` ``(norm, scale)`` of the last step.

  Args:
    max_norm: the bound, >= 0.
    axis_name: inside ``shard_map``/``pmap`` with leaves sharded over this
      axis, the squared norms are summed over it so all devices agree. Leave
      None for replicated (data-parallel, already averaged) gradients.
  """
  _checks.nonnegative("max_norm", max_norm)

  @_xla.fresh_state
  def init_fn(params):
    del params
    return ClipByGlobalNormState(jnp.zeros((), jnp.float32),
                                 jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None):
    del state, params
    _checks.float_leaves("updates", updates)
    norm = _norms.global_norm(updates, axis_name)
    s = _norms.clip_scale(norm, max_norm)
    return _norms.scale_tree(updates, s), ClipByGlobalNormState(norm, s)

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_leaf_norm(max_norm: float, *, axis_name: str | None = None
                      ) -> optax.GradientTransformation:
  """Scales each leaf (tensor) separately to an L2 norm of at most ``max_norm``.

  ``n_i = ||u_i||_2``, ``u_i <- u_i * (max_norm / n_i if n_i > max_norm else 1)``.

  State: :class:`ClipByLeafNormState`, per-leaf ``norm`` and ``scale``.

  Args:
    max_norm: the bound for every leaf, >= 0.
    axis_name: as in :func:`clip_by_global_norm`.
  """
  _checks.nonnegative("max_norm", max_norm)

  @_xla.fresh_state
  def init_fn(params):
    return ClipByLeafNormState(_scalar_tree(params), _ones_tree(params))

  def update_fn(updates, state, params=None):
    del state, params
    _checks.float_leaves("updates", updates)
    new, norm, s = _clip_per_leaf(updates, max_norm, axis_name, rms=False)
    return new, ClipByLeafNormState(norm, s)

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_block_rms(threshold: float, *, axis_name: str | None = None
                      ) -> optax.GradientTransformation:
  """Scales each leaf so its root-mean-square is at most ``threshold``.

  ``r_i = sqrt(mean(u_i**2))``, ``u_i <- u_i / max(1, r_i / threshold)``;
  the same numbers as ``optax.clip_by_block_rms`` (computed as a multiply).

  State: :class:`ClipByBlockRMSState`, per-leaf ``rms`` and ``scale``.

  Args:
    threshold: the RMS bound, >= 0.
    axis_name: as in :func:`clip_by_global_norm`; the element count is summed
      over the axis too.
  """
  _checks.nonnegative("threshold", threshold)

  @_xla.fresh_state
  def init_fn(params):
    return ClipByBlockRMSState(_scalar_tree(params), _ones_tree(params))

  def update_fn(updates, state, params=None):
    del state, params
    _checks.float_leaves("updates", updates)
    new, r, s = _clip_per_leaf(updates, threshold, axis_name, rms=True)
    return new, ClipByBlockRMSState(r, s)

  return optax.GradientTransformation(init_fn, update_fn)
