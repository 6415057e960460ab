"""Norm clipping: by value, global norm, per-leaf norm, block RMS.

Non-finite input, one rule for all of them: a clip never repairs or spreads
Inf/NaN. Where a norm is non-finite its scale is 1, so the update passes
through unchanged (finite leaves stay finite, an Inf is not turned into NaN,
0/0 never happens) and a downstream :func:`gradtransforms.guard` can act on
it. The non-finite norm is recorded in the state for logging; no later step
depends on it.

Drop-in for optax's stateless clips: ``update(updates, None)`` runs the step
from a fresh state and returns that step's state (figures included).
Integer leaves: accepted where optax accepts them (``clip_by_value``, with
optax's dtype rule; ``clip_by_block_rms`` in float32, returning float32),
refused with ``TypeError`` by ``clip_by_global_norm`` (optax fails on them)
and ``clip_by_leaf_norm``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _layout, _norms, _xla
from gradtransforms._layout import LayerAxes, PerLeaf
from gradtransforms._registry import register


@register("clip_by_value", ("max_abs", "threshold", "clipped"),
          {"threshold": "threshold", "clipped": "clipped",
           "clip_peak": "max_abs"})
class ClipByValueState(NamedTuple):
  """Last step: the largest ``|u|`` before clipping (NaN if the update held
  a NaN, and always NaN unless ``record_peak=True``) and the bound in force
  (``max_abs`` argument, injected or not). ``clipped``: ``max_abs >
  threshold``, so False where the peak is not recorded."""
  max_abs: jax.Array
  threshold: jax.Array

  @property
  def clipped(self) -> jax.Array:
    return self.max_abs > self.threshold


@register("clip_by_global_norm", ("norm", "scale"),
          {"global_norm": "norm", "clip_scale": "scale"})
class ClipByGlobalNormState(NamedTuple):
  """Figures of the last step: pre-clip global norm and the applied scale."""
  norm: jax.Array
  scale: jax.Array


@register("clip_by_leaf_norm", ("norm", "scale", "clipped", "threshold"),
          {"leaf_norm": "norm", "clip_scale": "scale", "clipped": "clipped",
           "threshold": "threshold"})
class ClipByLeafNormState(NamedTuple):
  """Last step: each leaf's (or layer slice's) pre-clip sum of squares, as
  one stacked vector, and the bound. ``norm``, ``scale`` (per leaf) and
  ``clipped`` (how many leaves were scaled down) are derived when read."""
  sumsq: PerLeaf
  threshold: jax.Array

  @property
  def norm(self) -> PerLeaf:
    return self.sumsq.sqrt()

  @property
  def scale(self) -> PerLeaf:
    return self.norm.replace(_norms.clip_scale(self.norm.values, self.threshold))

  @property
  def clipped(self) -> jax.Array:
    return self.scale.count_below(1)


@register("clip_by_block_rms", ("rms", "scale", "clipped", "threshold"),
          {"leaf_norm": "rms", "clip_scale": "scale", "clipped": "clipped",
           "threshold": "threshold"})
class ClipByBlockRMSState(NamedTuple):
  """Last step: each leaf's (or layer slice's) pre-clip mean square, as one
  stacked vector, and the bound; ``rms``, ``scale`` and ``clipped`` are
  derived when read."""
  meansq: PerLeaf
  threshold: jax.Array

  @property
  def rms(self) -> PerLeaf:
    return self.meansq.sqrt()

  @property
  def scale(self) -> PerLeaf:
    return self.rms.replace(_norms.clip_scale(self.rms.values, self.threshold))

  @property
  def clipped(self) -> jax.Array:
    return self.scale.count_below(1)


def _per_leaf_init(params, layer_axes, threshold, cls):
  lay = _layout.layout(params, layer_axes)
  return _xla.fresh(cls(_layout.zeros(lay), jnp.asarray(threshold, jnp.float32)))


def _clip_per_leaf(updates, stored: PerLeaf, bound, layer_axes, axis_name,
                   what: str, rms: bool):
  """Scales each leaf (or layer slice) to ``measure <= bound``, with
  measure = L2 norm or RMS; each leaf's scale comes from its own sum of
  squares, inline. Returns ``(clipped tree, stacked measure**2 vector)``."""
  leaves, treedef = jax.tree.flatten(updates)
  lay = _layout.layout(updates, layer_axes)
  _layout.check_names(lay, stored, what)
  sizes = None
  if rms:  # mean squares: each scale divides inline, the state as one vector
    sizes = [max(x.size // n, 1) for x, n in zip(leaves, lay.counts)]
    if axis_name is not None:
      sizes = jax.lax.psum(jnp.asarray(sizes, jnp.float32), axis_name)
  scales, stacked = _norms.leaf_scales(
      lambda m: _norms.clip_scale(jnp.sqrt(m), bound), leaves, lay, axis_name,
      sizes)
  out = _norms.scale_parts(leaves, lay, scales)
  return jax.tree.unflatten(treedef, out), stored.replace(stacked)


def clip_by_value(max_abs: float, *, record_peak: bool = False
                  ) -> optax.GradientTransformation:
  """Clips every element to ``[-max_abs, max_abs]``.

  ``u <- clip(u, -max_abs, max_abs)``; the same numbers as ``optax.clip``,
  at its cost: XLA fuses the clip into the optimizer's own pass. NaN stays
  NaN, +-Inf become +-max_abs.

  State: :class:`ClipByValueState`: the pre-clip ``max |u|`` (NaN unless
  ``record_peak``) and the bound, both written every step, so a state
  restored from another configuration or an injected bound never leaves a
  stale figure (on an H100 two scalar writes, a kernel each; passing them
  on unchanged saved both but reported a restored run's old bound).

  Args:
    max_abs: the bound, >= 0.
    record_peak: also record the pre-clip ``max |u|`` (and so ``clipped``).
      Off by default because the figure would cost more than the clip on
      XLA:CPU: a reduction is a pass of its own there (measured 1.23x an
      Adam step at 50M params in 100 leaves, where the clip alone is 1.03x).
      On an H100 or TPU it is fused into the optimizer's pass over the
      gradients (H100: 106 kernels against Adam's 102, 1.002x its bytes).
  """
  _checks.bound("max_abs", max_abs)
  record_peak = _checks.boolean("record_peak", record_peak)

  def _clip_leaf(u):
    if not jnp.issubdtype(u.dtype, jnp.floating):  # optax.clip's own form
      return jnp.clip(u, -max_abs, max_abs)
    return jnp.clip(u, -jnp.asarray(max_abs, u.dtype),
                    jnp.asarray(max_abs, u.dtype))

  @_xla.fresh_state
  def init_fn(params):
    del params
    return ClipByValueState(
        max_abs=jnp.asarray(0.0 if record_peak else jnp.nan, jnp.float32),
        threshold=jnp.asarray(max_abs, jnp.float32))

  def update_fn(updates, state, params=None):
    del state, params
    _checks.ints_as_float("updates", updates)  # dtype check only
    peak = (_norms.max_abs(updates) if record_peak
            else jnp.asarray(jnp.nan, jnp.float32))
    new = jax.tree.map(_clip_leaf, updates)
    return new, ClipByValueState(max_abs=peak,
                                 threshold=jnp.asarray(max_abs, jnp.float32))

  return optax.GradientTransformation(
      init_fn, _checks.state_optional(init_fn, update_fn))


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
  _checks.bound("max_norm", max_norm)

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

  return optax.GradientTransformation(
      init_fn, _checks.state_optional(init_fn, update_fn))


def clip_by_leaf_norm(max_norm: float, *, layer_axes: LayerAxes = None,
                      axis_name: str | None = None
                      ) -> optax.GradientTransformation:
  """Scales each leaf (tensor) separately to an L2 norm of at most ``max_norm``.

  ``n_i = ||u_i||_2``, ``u_i <- u_i * (max_norm / n_i if n_i > max_norm else 1)``.
  With ``layer_axes``, a leaf holding L stacked layers is L tensors: each
  slice along its layer axis is clipped on its own (the same numbers as
  clipping the unstacked layers).

  State: :class:`ClipByLeafNormState`: the per-leaf sums of squares as one
  stacked vector (its size does not depend on the number of leaves'
  arrays), the bound; ``norm``/``scale``/``clipped`` derived when read.

  Args:
    max_norm: the bound for every leaf, >= 0 (+inf: never clip).
    layer_axes: None, a callable ``(name, leaf) -> int | None`` (``name`` as
      :func:`gradtransforms.leaf_names` writes it), or a pytree prefix of the
      params holding ints or None: the leaf's stacked-layer axis.
    axis_name: as in :func:`clip_by_global_norm`.
  """
  _checks.bound("max_norm", max_norm)
  layer_axes = _layout.check_layer_axes(layer_axes)

  def init_fn(params):
    return _per_leaf_init(params, layer_axes, max_norm, ClipByLeafNormState)

  def update_fn(updates, state, params=None):
    del params
    _checks.float_leaves("updates", updates)
    new, sumsq = _clip_per_leaf(updates, state.sumsq, max_norm, layer_axes,
                                axis_name, "clip_by_leaf_norm", rms=False)
    return new, ClipByLeafNormState(sumsq, jnp.asarray(max_norm, jnp.float32))

  return optax.GradientTransformation(
      init_fn, _checks.state_optional(init_fn, update_fn))


def clip_by_block_rms(threshold: float, *, layer_axes: LayerAxes = None,
                      axis_name: str | None = None
                      ) -> optax.GradientTransformation:
  """Scales each leaf so its root-mean-square is at most ``threshold``.

  ``r_i = sqrt(mean(u_i**2))``, ``u_i <- u_i / max(1, r_i / threshold)``;
  the same numbers as ``optax.clip_by_block_rms`` (computed as a multiply).
  With ``layer_axes``, per layer slice (see :func:`clip_by_leaf_norm`).

  State: :class:`ClipByBlockRMSState`: per-leaf mean squares as one stacked
  vector, the bound; ``rms``/``scale``/``clipped`` derived when read.

  Args:
    threshold: the RMS bound, >= 0 (+inf: never clip).
    layer_axes: as in :func:`clip_by_leaf_norm`.
    axis_name: as in :func:`clip_by_global_norm`; the element count is summed
      over the axis too.
  """
  _checks.bound("threshold", threshold)
  layer_axes = _layout.check_layer_axes(layer_axes)

  def init_fn(params):
    return _per_leaf_init(params, layer_axes, threshold, ClipByBlockRMSState)

  def update_fn(updates, state, params=None):
    del params
    updates = _checks.ints_as_float("updates", updates)  # as optax
    new, meansq = _clip_per_leaf(updates, state.meansq, threshold, layer_axes,
                                 axis_name, "clip_by_block_rms", rms=True)
    return new, ClipByBlockRMSState(meansq, jnp.asarray(threshold, jnp.float32))

  return optax.GradientTransformation(
      init_fn, _checks.state_optional(init_fn, update_fn))
