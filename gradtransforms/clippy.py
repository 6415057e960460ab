"""Clippy: clip each tensor's update relative to its weights."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _layout, _norms, _xla
from gradtransforms._layout import LayerAxes, PerLeaf
from gradtransforms._registry import register


@register("clippy", ("scale", "clipped", "min_scale"),
          {"clip_scale": "scale", "clipped": "clipped"})
class ClippyState(NamedTuple):
  """Per-leaf (per layer slice) scale applied at the last step (1 = not
  clipped), as one stacked vector; ``clipped`` (how many leaves were scaled
  down) and ``min_scale`` are derived when read."""
  scale: PerLeaf

  @property
  def clipped(self) -> jax.Array:
    return self.scale.count_below(1)

  @property
  def min_scale(self) -> jax.Array:
    return jnp.min(self.scale.values, initial=1.0)


def clippy(relative_factor: float = 0.5, absolute_factor: float = 1e-2, *,
           layer_axes: LayerAxes = None, axis_name: str | None = None
           ) -> optax.GradientTransformation:
  """Clippy (Tang et al., 2023, "Improving Training Stability for Multitask
  Ranking Models in Recommender Systems").

  Bounds every entry of the *update* ``u`` (chain it after the optimizer, so
  ``u`` includes the learning rate) by ``relative_factor * |w| +
  absolute_factor``, with one scale per tensor so its direction is kept:
  ``sigma_i = min(1, min_j (relative_factor |w_ij| + absolute_factor) / |u_ij|)``,
  ``u_i <- sigma_i * u_i``. With ``layer_axes``, one scale per layer slice.

  A tensor (slice) whose update has a non-finite entry passes unchanged;
  empty leaves have scale 1.

  Cost: the update must exist in memory before it can be scaled (its
  per-tensor maximum is needed first), so XLA writes one update-sized buffer
  that ``apply_updates`` then reads, where Adam alone fuses the update into
  the parameter write.

  State: :class:`ClippyState`, the per-leaf ``scale`` as one stacked vector.

  Args:
    relative_factor: lambda_rel >= 0 (+inf: never clip).
    absolute_factor: lambda_abs > 0 (keeps zero weights movable; +inf: never
      clip).
    layer_axes: stacked-layer axes, as in
      :func:`gradtransforms.clip_by_leaf_norm`.
    axis_name: inside ``shard_map``/``pmap`` with leaves sharded over this
      axis, the per-tensor maximum is taken over it so all shards agree.
  """
  _checks.bound("relative_factor", relative_factor)
  _checks.bound("absolute_factor", absolute_factor, strict=True)
  layer_axes = _layout.check_layer_axes(layer_axes)
  traced = any(isinstance(v, jax.core.Tracer)
               for v in (relative_factor, absolute_factor))

  # |u| / (rel |w| + abs) = (|u| / (|w| + abs / rel)) / rel; rel = 0 (or so
  # small that abs / rel overflows float32) bounds |u| by abs alone.
  offset = None
  if not traced and relative_factor:
    offset = absolute_factor / relative_factor
    if offset > float(jnp.finfo(jnp.float32).max):
      offset = None

  def init_fn(params):
    lay = _layout.layout(params, layer_axes)
    return _xla.fresh(ClippyState(_layout.zeros(lay, fill=1.0)))

  # each leaf's max, divided by this (None: already the ratio) afterwards
  divisor = (None if traced else absolute_factor if offset is None
             else relative_factor)

  def peak(u, w, axis):
    """max |u| / (rel |w| + abs) but for the division by ``divisor`` (done
    on the stacked peaks, :func:`scale`); with at most one scalar
    inside the reduction where the factors are concrete: XLA:CPU
    materialises every scalar broadcast a reduction contains as a
    leaf-sized buffer. A plain max reduction from 0 (``jnp.max``'s
    ``initial`` adds a maximum after it, a kernel per leaf on TPU)."""
    acc = _norms.acc_dtype(u)
    au = jnp.abs(u.astype(acc))
    if traced:  # injected hyperparameters: the direct form
      rel = jnp.asarray(relative_factor, acc)
      au = au / (rel * jnp.abs(w.astype(acc)) + absolute_factor)
    elif offset is not None:
      au = au / (jnp.abs(w.astype(acc)) + offset)
    axes = _layout.reduce_axes(u, axis)
    return jax.lax.reduce(au, jnp.zeros((), acc), jax.lax.max,
                          tuple(range(u.ndim)) if axes is None else axes)

  def scale(m):
    r = (m if divisor is None else m / divisor).astype(jnp.float32)
    return _norms.clip_scale(r, 1.0)  # 1 / r where r > 1 (finite), else 1

  def update_fn(updates, state, params=None):
    _checks.needs_params("clippy", params)
    _checks.float_leaves("updates", updates)
    leaves, treedef = jax.tree.flatten(updates)
    lay = _layout.layout(updates, layer_axes)
    _layout.check_names(lay, state.scale, "clippy")
    w_leaves = treedef.flatten_up_to(params)
    peak_of = _xla.per_leaf(peak, ("axis",))  # traced once per leaf shape
    peaks = [peak_of(u, w, axis=a)
             for u, w, a in zip(leaves, w_leaves, lay.axes)]
    if axis_name is not None:
      peaks = jax.lax.pmax(peaks, axis_name)
    if all(m.dtype == jnp.float32 for m in peaks):
      scales = _norms.segment_scales(scale, peaks, _layout.stack(peaks), lay)
    else:  # float64: each leaf's ratio in its own precision
      scale_of = _xla.per_leaf(scale)
      scales = [scale_of(m) for m in peaks]
    out = _norms.scale_parts(leaves, lay, scales)
    return jax.tree.unflatten(treedef, out), ClippyState(
        state.scale.replace(_layout.stack(scales)))

  return optax.GradientTransformation(init_fn, update_fn)
