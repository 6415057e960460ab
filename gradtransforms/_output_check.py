"""The guard's check of an optimizer's output, fused with the gradients'
norms on GPU/TPU: :func:`sums_with_output_check`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradtransforms import _norms, _xla


def _sums_and_finite_rows(leaves, lay_axes, probe, axis_name):
  """XLA:GPU form of :func:`sums_with_output_check`: each leaf's two
  row-partial sums are stacked and finished by one reduction, one kernel
  per leaf where two separate sums cost two."""
  out, fins = [], []
  for x, a, u in zip(leaves, lay_axes, probe):
    if a not in (None, 0) or x.ndim < 2 or x.size == 0:
      out.append(_norms.sumsq(x, a))
      fins.append(_xla.zero_sum(u))
      continue
    layers = 1 if a is None else x.shape[0]
    x = x.astype(_norms.acc_dtype(x)).reshape(-1, x.shape[-1])
    u = u.astype(jnp.promote_types(u.dtype, jnp.float32)).reshape(x.shape)
    rows = jnp.stack([jnp.sum(x * x, axis=1), jnp.sum(u - u, axis=1)])
    both = jnp.sum(rows.reshape(2, layers, -1), axis=2)  # (2, layers)
    out.append(both[0, 0] if a is None else both[0])
    fins.append(jnp.sum(both[1]))
  return _finish(out, fins, lay_axes, axis_name)


def _sums_and_finite_plain(leaves, lay_axes, probe, axis_name):
  """TPU form of :func:`sums_with_output_check`: plain sums (XLA:TPU fuses
  each leaf's two into one pass; stacking costs it a copy per leaf)."""
  out = [_norms.sumsq(x, a) for x, a in zip(leaves, lay_axes)]
  return _finish(out, [_xla.zero_sum(u) for u in probe], lay_axes, axis_name)


def _finish(parts, fins, lay_axes, axis_name):
  fin = sum(fins, jnp.zeros((), jnp.float32))
  if axis_name is not None:
    parts, fin = lax.psum((parts, fin), axis_name)
  if any(a is not None for a in lay_axes):  # as _norms.leaf_sumsq
    parts = lax.optimization_barrier(parts)
  return parts, jnp.isfinite(fin)


def sums_with_output_check(leaves: list, lay: Any, probe: Any,
                           state: Any, axis_name: str | None = None
                           ) -> tuple[list, jax.Array]:
  """``(parts, out_ok)``: each leaf's sum of squares (per layer slice where
  the layout ``lay`` has a layer axis), as ``_norms.leaf_sumsq``, and
  whether ``probe(state)`` (an optimizer's output leaves, computed from
  ``state`` behind an ``optimization_barrier`` so that XLA computes it
  again rather than keeping the real step's update) is all finite: one pass
  over what the optimizer reads, fused with the gradients' sums, and no
  update-sized buffer written. On CPU ``out_ok`` is True and the caller
  checks the output itself (``_xla.guarded_cond``)."""
  def accel(form):
    def run(state):
      out = jax.tree.leaves(probe(lax.optimization_barrier(state)))
      return form(leaves, lay.axes, out, axis_name)
    return run

  def cpu(state):
    del state
    return (_norms.leaf_sumsq(leaves, lay, axis_name),
            jnp.ones((), jnp.bool_))
  return lax.platform_dependent(state, cpu=cpu,
                                cuda=accel(_sums_and_finite_rows),
                                rocm=accel(_sums_and_finite_rows),
                                default=accel(_sums_and_finite_plain))
