"""Shared numerics: tree norms, clip scales, EMA statistics and quantiles.

Every transform in the package computes its norms, scales and running
statistics through this module, so that precision, overflow and non-finite
handling are decided once:

* Squared norms accumulate in float32 (float64 stays float64), whatever the
  leaf dtype, so float16/bfloat16 leaves never overflow while squaring.
* One read of the tree gives both the per-leaf and the global norm.
* An Inf or NaN entry makes that leaf's norm (and the global norm) non-finite:
  ``isfinite(norm)`` is therefore a free non-finite check. A norm beyond the
  float32 range (about 1.8e19) also reads as Inf and is treated the same way:
  such a gradient has exploded. (A max-scaled recomputation behind a
  ``lax.cond`` would rescue it, but measured 4-5% of an Adam step on CPU for
  every step; a guard skipping the step is the better remedy.)
* Scales are computed once per tree or per leaf and multiplied in, never
  divided elementwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def acc_dtype(x: Any) -> jnp.dtype:
  """The dtype reductions over ``x`` accumulate in: float32 or wider."""
  return jnp.promote_types(jnp.result_type(x), F32)


def _sum_sq(x: jax.Array) -> jax.Array:
  x = x.astype(acc_dtype(x))
  return jnp.sum(x * x).astype(F32)


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def norms(leaves: Sequence[jax.Array], axis_name: str | None = None
          ) -> tuple[jax.Array, jax.Array]:
  """Global L2 norm and a vector of per-leaf L2 norms, both float32.

  One pass over the leaves. With ``axis_name`` (inside ``shard_map``/``pmap``)
  the leaves are taken as shards of larger arrays and the sums of squares are
  ``psum``-ed over that axis, so every device gets the same, global, figures.
  """
  leaves = list(leaves)
  if not leaves:
    return jnp.zeros((), F32), jnp.zeros((0,), F32)
  sq = _psum(jnp.stack([_sum_sq(x) for x in leaves]), axis_name)
  return jnp.sqrt(jnp.sum(sq)), jnp.sqrt(sq)


def global_norm(tree: Any, axis_name: str | None = None) -> jax.Array:
  """Float32 global L2 norm of a pytree (one read; Inf beyond ~1.8e19)."""
  return norms(jax.tree.leaves(tree), axis_name)[0]


def clip_scale(norm: jax.Array, max_norm: Any, eps: float = 0.0) -> jax.Array:
  """``max_norm / (norm + eps)`` where ``norm > max_norm``, else 1.

  A non-finite ``norm`` gives 1: clipping never turns Inf into NaN and never
  computes 0/0; the non-finite values pass on for a guard to see.
  """
  norm = jnp.asarray(norm, F32)
  max_norm = jnp.asarray(max_norm, F32)
  clip = jnp.isfinite(norm) & (norm > max_norm)
  return jnp.where(clip, max_norm / jnp.where(clip, norm + eps, 1.0), 1.0)


def scale(x: jax.Array, s: jax.Array) -> jax.Array:
  """``x * s`` computed in float32 or wider and cast back to ``x.dtype``."""
  return (x * s.astype(acc_dtype(x))).astype(x.dtype)


def scale_tree(tree: Any, s: Any) -> Any:
  """Multiplies every leaf by ``s`` (a scalar, or a tree of broadcastables)."""
  if isinstance(s, jax.Array) or jnp.isscalar(s):
    s = jnp.asarray(s)
    return jax.tree.map(lambda x: scale(x, s), tree)
  return jax.tree.map(scale, tree, s)


def scale_leaves(treedef: Any, leaves: Sequence[jax.Array], s: jax.Array) -> Any:
  """Rebuilds a tree from ``leaves``, leaf ``i`` multiplied by ``s[i]``."""
  return jax.tree.unflatten(treedef, [scale(x, s[i]) for i, x in enumerate(leaves)])


def detach(updates: Any, figures: Any) -> tuple[Any, Any]:
  """Returns ``(updates, figures)`` behind an ``optimization_barrier``.

  For transforms that only *record* a reduction over ``updates`` (monitors,
  detectors): without the barrier XLA on CPU may fuse that reduction with
  the optimizer's elementwise update into one multi-output loop, which runs
  on one thread; measured 2-2.5x an Adam step instead of ~1.15x.
  """
  return lax.optimization_barrier((updates, figures))


def rollback(skip: jax.Array, updates: Any, old_state: Any, new_state: Any
             ) -> tuple[Any, Any]:
  """``(where(skip, -0.0, updates), where(skip, old_state, new_state))``.

  For wrappers that undo an inner optimizer's step. Each state leaf's select
  is made to depend on a value of the matching update leaf (a comparison
  that is always false, which XLA cannot fold): for a state subtree shaped
  like ``updates`` (Adam's ``mu``, ``nu``, ...) leaf ``i`` waits for update
  ``i``. So the updates are computed before the new state overwrites the old
  one in place. Otherwise XLA recomputes the updates from the old state
  inside the caller's ``apply_updates`` and has to copy the whole old state
  first: on CPU each copy is a fresh, page-faulted buffer (6x an Adam step
  at 10M parameters; this way one update-sized buffer is written instead).
  Tying every state leaf to every update leaf compiles in O(leaves^2) (XLA
  fuses the tie into each select); an ``optimization_barrier`` does not
  order anything (XLA removes barriers before it orders the copies).
  ``-0.0`` keeps every parameter bit-identical under ``apply_updates``,
  ``-0.0`` parameters included.
  """
  updates = jax.tree.map(
      lambda u: jnp.where(skip, jnp.asarray(-0.0, u.dtype), u), updates)
  u_leaves, u_def = jax.tree.flatten(updates)
  # never true, not even for NaN: only the dependency matters
  ties = [skip | (u.reshape(-1)[0] > jnp.inf) if u.size else skip
          for u in u_leaves]

  def like_updates(x):
    return jax.tree.structure(x) == u_def

  def select(old, new):
    if like_updates(old):
      return jax.tree.unflatten(u_def, [
          jnp.where(t, a, b) for t, a, b in
          zip(ties, jax.tree.leaves(old), jax.tree.leaves(new))])
    return jnp.where(skip, old, new)

  return updates, jax.tree.map(select, old_state, new_state,
                               is_leaf=like_updates)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Elementwise ``where(pred, a, b)`` over two trees with a scalar pred."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def zeros_like_tree(tree: Any) -> Any:
  return jax.tree.map(jnp.zeros_like, tree)


# --- running statistics ------------------------------------------------------


class MeanVar(NamedTuple):
  """Exponential moving mean and variance of a scalar (or array) series."""
  mean: jax.Array
  var: jax.Array


def ema_mean_var(stats: MeanVar, x: jax.Array, alpha: Any,
                 ok: jax.Array | bool = True) -> MeanVar:
  """One EMA step, skipped where ``ok`` is False (e.g. ``x`` non-finite).

  ``mean' = alpha * mean + (1 - alpha) * x``
  ``var'  = alpha * var  + (1 - alpha) * (x - mean')**2``

  (the ZClip reference's form: the deviation uses the *updated* mean.)
  """
  alpha = jnp.asarray(alpha, F32)
  mean = alpha * stats.mean + (1 - alpha) * x
  var = alpha * stats.var + (1 - alpha) * jnp.square(x - mean)
  return MeanVar(jnp.where(ok, mean, stats.mean), jnp.where(ok, var, stats.var))


def zscore(stats: MeanVar, x: jax.Array, eps: Any = 1e-6) -> jax.Array:
  """``(x - mean) / (sqrt(var) + eps)``."""
  return (x - stats.mean) / (jnp.sqrt(stats.var) + eps)


def ring_push(buffer: jax.Array, count: jax.Array, x: jax.Array,
              ok: jax.Array | bool = True) -> tuple[jax.Array, jax.Array]:
  """Writes ``x`` at slot ``count % len(buffer)`` if ``ok``; returns (buf, count)."""
  slot = count % buffer.shape[0]
  new = buffer.at[slot].set(jnp.where(ok, x, buffer[slot]))
  return new, count + jnp.asarray(ok, count.dtype)


def percentile(buffer: jax.Array, count: jax.Array, q: Any) -> jax.Array:
  """``numpy.percentile(buffer[:n], q)`` (linear method), n = min(count, len).

  The valid entries are the first ``n`` slots of a ring buffer (their order
  does not matter). Returns NaN when ``count == 0``.
  """
  size = buffer.shape[0]
  n = jnp.minimum(count, size)
  valid = jnp.arange(size) < n
  v = jnp.sort(jnp.where(valid, buffer, jnp.inf))
  pos = (n - 1).astype(F32) * (jnp.asarray(q, F32) / 100.0)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, size - 1)
  hi = jnp.clip(lo + 1, 0, jnp.maximum(n - 1, 0))
  t = pos - lo.astype(F32)
  a, b = v[lo], v[hi]
  out = jnp.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
  return jnp.where(n > 0, out, jnp.nan)


def warm_alpha(alpha: Any, count: jax.Array) -> jax.Array:
  """EMA factor ``min(alpha, k / (k + 1))`` after ``k`` observations: the
  first steps give the exact running mean instead of a bias towards 0."""
  k = count.astype(F32)
  return jnp.minimum(jnp.asarray(alpha, F32), k / (k + 1.0))


class SeriesStats(NamedTuple):
  """Running statistics of a scalar series, for spike detection."""
  mean: jax.Array
  var: jax.Array
  count: jax.Array  # finite observations so far


def series_init() -> SeriesStats:
  z = jnp.zeros((), F32)
  return SeriesStats(z, z, jnp.zeros((), jnp.int32))


def series_observe(stats: SeriesStats, x: jax.Array, alpha: Any,
                   z_thresh: Any, warmup_steps: int, eps: Any = 1e-6
                   ) -> tuple[SeriesStats, jax.Array, jax.Array]:
  """Scores ``x`` against the running statistics, then folds it in.

  Returns ``(stats', z, spike)``. ``z = (x - mean) / (std + eps)``; a spike is
  ``z > z_thresh`` once ``warmup_steps`` finite values were seen. The EMA
  factor is ``min(alpha, k / (k + 1))`` after ``k`` values, so the first
  steps give the exact running mean instead of a bias towards 0. A non-finite
  ``x`` is not folded in; a spike is folded in clamped to
  ``mean + z_thresh * std``, so one outlier neither inflates the variance nor
  stops the statistics from following a real shift of level.
  """
  x = jnp.asarray(x, F32)
  ok = jnp.isfinite(x)
  z = zscore(MeanVar(stats.mean, stats.var), x, eps)
  spike = ok & (stats.count >= warmup_steps) & (z > z_thresh)
  folded = jnp.where(spike, stats.mean + z_thresh * jnp.sqrt(stats.var), x)
  a = warm_alpha(alpha, stats.count)
  mv = ema_mean_var(MeanVar(stats.mean, stats.var), folded, a, ok)
  z = jnp.where(ok & (stats.count > 0), z, 0.0)
  return SeriesStats(mv.mean, mv.var, stats.count + ok.astype(jnp.int32)), z, spike


def fresh_state(init_fn):
  """Decorator: ``init`` returns a state with one buffer per leaf.

  States built from shared constants (``z, z, z``) would alias one buffer
  several times, which ``jax.jit(..., donate_argnums=...)`` rejects. Copying
  the leaves of the (small, or freshly zero-filled) state at init avoids it.
  The copy also drops weak types, so that the state ``update`` returns has
  the same types as ``init``'s and a jitted step compiles once.
  """
  def wrapped(params):
    return fresh(init_fn(params))
  wrapped.__doc__ = init_fn.__doc__
  return wrapped


def fresh(tree: Any) -> Any:
  """A copy of ``tree`` with one strongly typed buffer per leaf (see
  :func:`fresh_state`). Wrappers apply it to their own fields only, so an
  inner optimizer's (parameter-sized) state is not copied."""
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.result_type(x),
                                          copy=True), tree)
