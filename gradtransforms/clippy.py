"""Clippy: clip each tensor's update relative to its weights."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks, _collectives, _layout, _norms, _sums, _xla
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
  empty leaves have scale 1. With ``axis_name`` that holds across shards
  (the peaks' ``pmax`` keeps NaN). Under ``jit`` with sharded arrays and no
  ``axis_name``, XLA's own cross-device max takes the peak, and on XLA:CPU
  (jax 0.10.2) it drops a NaN: a tensor with a NaN in one shard is then
  scaled by the other shards' peak (its NaN entries stay NaN). Mapping NaN
  to Inf inside the peak would fix that at 1.6x clippy's CPU step time
  (20M params in 20 leaves: 3.8x Adam against 2.4x), so it is not done.

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

  # each leaf's max, divided by this (None: already the ratio) afterwards
  bound = _Bound(relative_factor, absolute_factor, offset, traced,
                 None if traced else absolute_factor if offset is None
                 else relative_factor)

  def init_fn(params):
    lay = _layout.layout(params, layer_axes)
    return _xla.fresh(ClippyState(_layout.zeros(lay, fill=1.0)))

  def update_fn(updates, state, params=None):
    _checks.needs_params("clippy", params)
    _checks.float_leaves("updates", updates)
    leaves, treedef = jax.tree.flatten(updates)
    lay = _layout.layout(updates, layer_axes)
    _layout.check_names(lay, state.scale, "clippy")
    scales = _scales(bound, leaves, treedef.flatten_up_to(params), lay,
                     axis_name)
    out = _norms.scale_parts(leaves, lay, scales)
    return jax.tree.unflatten(treedef, out), ClippyState(
        state.scale.replace(_layout.stack(scales)))

  return optax.GradientTransformation(init_fn, update_fn)


class _Bound(NamedTuple):
  """Clippy's factors, and the form its per-leaf peaks take: ``offset =
  absolute / relative`` (None: rel 0, or the factors traced), ``divisor``
  applied to the stacked peaks (None: they are the ratio already)."""
  relative: Any
  absolute: Any
  offset: float | None
  traced: bool
  divisor: Any


def _ratio(b: _Bound, u: jax.Array, w: jax.Array) -> jax.Array:
  """``|u| / (rel |w| + abs)`` but for the division by ``b.divisor``: with
  at most one scalar inside the reduction where the factors are concrete
  (XLA:CPU materialises every scalar broadcast a reduction contains as a
  leaf-sized buffer)."""
  acc = _norms.acc_dtype(u)
  au = jnp.abs(u.astype(acc))
  if b.traced:  # injected hyperparameters: the direct form
    rel = jnp.asarray(b.relative, acc)
    return au / (rel * jnp.abs(w.astype(acc)) + b.absolute)
  if b.offset is not None:
    return au / (jnp.abs(w.astype(acc)) + b.offset)
  return au


def _peak(b: _Bound, u: jax.Array, w: jax.Array, axis: int | None) -> jax.Array:
  """A leaf's (per layer slice) max of :func:`_ratio`."""
  axes = _layout.reduce_axes(u, axis)
  return _sums.max_from_zero(_ratio(b, u, w),
                             range(u.ndim) if axes is None else axes)


def _row_peaks(b: _Bound, u: jax.Array, w: jax.Array, view: tuple) -> jax.Array:
  """The GPU form's row partials of :func:`_peak` (``_sums.row_view``)."""
  return _sums.max_from_zero(_ratio(b, u.reshape(view), w.reshape(view)),
                             (len(view) - 1,))


def _scale(b: _Bound, m: jax.Array) -> jax.Array:
  r = (m if b.divisor is None else m / b.divisor).astype(jnp.float32)
  return _norms.clip_scale(r, 1.0)  # 1 / r where r > 1 (finite), else 1


def _scales(b: _Bound, leaves: list, w_leaves: list, lay: _layout.Layout,
            axis_name: str | None) -> list:
  """Each leaf's scale(s). On GPU the peaks' row partials are finished by
  shape group (``_sums.finish``) and the scales sliced from one vector
  (H100, 50M params in 100 leaves: 403 kernels -> 110); elsewhere each
  leaf's peak, and on CPU its scale, inline (``_norms.segment_scales``)."""
  scale = functools.partial(_scale, b)

  def default(us, ws):
    peak_of = _xla.per_leaf(functools.partial(_peak, b), ("axis",))
    peaks = [peak_of(u, w, axis=a) for u, w, a in zip(us, ws, lay.axes)]
    peaks = _collectives.pmax(peaks, axis_name)
    if all(m.dtype == jnp.float32 for m in peaks):
      return _norms.segment_scales(scale, peaks, _layout.stack(peaks), lay)
    scale_of = _xla.per_leaf(scale)  # float64: each in its own precision
    return [scale_of(m) for m in peaks]

  def gpu(us, ws):
    rows_of = _xla.per_leaf(functools.partial(_row_peaks, b), ("view",))
    rows = [rows_of(u, w, view=_sums.row_view(u.shape, a))
            for u, w, a in zip(us, ws, lay.axes)]
    return _layout.split(scale(_sums.finish(rows, axis_name, peak=True)[0]),
                         lay)
  rowed = all(_norms.acc_dtype(u) == jnp.float32 and _sums.row_view(u.shape, a)
              for u, a in zip(leaves, lay.axes))
  if not rowed:
    return default(leaves, w_leaves)
  return jax.lax.platform_dependent(leaves, w_leaves, cuda=gpu, rocm=gpu,
                                    default=default)
