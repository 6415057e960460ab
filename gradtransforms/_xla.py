"""Scheduling tricks for XLA, and fresh state buffers.

``detach``, ``after`` and ``kept`` exist for XLA:CPU, where they avoid
single-threaded multi-output loops, copies of state into freshly
page-faulted buffers and joins compiled in O(N^2); ``read_once`` for
XLA:GPU. Elsewhere they bought nothing (measured on an H100), so each
picks its form per platform with ``jax.lax.platform_dependent`` (decided
when the step is lowered, no run-time branch). Undoing a step: a plain
``where`` (:func:`rollback_plain`) on GPU/TPU; on CPU ``_in_place.step``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax


def detach(updates: Any, figures: Any) -> tuple[Any, Any]:
  """Returns ``(updates, figures)``, on CPU behind an ``optimization_barrier``.

  For transforms that only *record* a reduction over ``updates`` (monitors,
  detectors): without the barrier XLA on CPU may fuse that reduction with
  the optimizer's elementwise update into one multi-output loop, which runs
  on one thread; measured 2-2.5x an Adam step instead of ~1.15x. On GPU/TPU
  the barrier changed nothing measurable and is left out.
  """
  return lax.platform_dependent(
      updates, figures, cpu=lambda u, f: lax.optimization_barrier((u, f)),
      default=lambda u, f: (u, f))


def skip_updates(skip: jax.Array, updates: Any) -> Any:
  """``where(skip, -0.0, updates)``: the update of a skipped step."""
  one = per_leaf(_skip_leaf)
  return jax.tree.map(lambda u: one(skip, u), updates)


def _skip_leaf(skip: jax.Array, u: jax.Array) -> jax.Array:
  return jnp.where(skip, jnp.asarray(-0.0, u.dtype), u)


def _select(pred: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.where(pred, a, b)


def rollback_plain(skip: jax.Array, updates: Any, old_state: Any,
                   new_state: Any) -> tuple[Any, Any]:
  """``(where(skip, -0.0, updates), where(skip, old_state, new_state))``:
  undoing an inner optimizer's step on GPU/TPU, where these plain selects
  are the fastest form. ``-0.0`` keeps every parameter bit-identical under
  ``apply_updates``, ``-0.0`` parameters included. (On XLA:CPU the selects
  belong where the new state is computed: ``_in_place.step``.)"""
  one = per_leaf(_select)
  return skip_updates(skip, updates), jax.tree.map(
      lambda a, b: one(skip, a, b), old_state, new_state)


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


def on_cpu() -> jax.Array:
  """A bool scalar, True where the step is lowered for CPU: one
  ``platform_dependent`` for a whole step, where a branch per leaf traced
  every leaf's code twice (XLA folds the constant it lowers to)."""
  return lax.platform_dependent(cpu=lambda: jnp.ones((), bool),
                                default=lambda: jnp.zeros((), bool))


def after(x: jax.Array, *deps: jax.Array, cpu: jax.Array | None = None
          ) -> jax.Array:
  """``x``, on CPU computed after ``deps`` (arrays) have been: a select on a
  comparison that is always false, the sum of each dep's first entry
  ``> inf`` (not even NaN is; ``inf - inf`` is NaN), which XLA cannot
  fold. For an in-place state update whose old value other loops still
  read: XLA:CPU otherwise may copy the old state to a fresh, page-faulted
  buffer first. On GPU/TPU the tie would split a fused kernel, and is left
  out. ``cpu``: :func:`on_cpu`, computed once by a caller that ties many
  leaves (the select then folds away on GPU/TPU, to the same program)."""
  def tied(x, *deps, cpu=True):
    firsts = [d.reshape(-1)[0].astype(jnp.float32) for d in deps if d.size]
    if not firsts:
      return x
    never = sum(firsts[1:], firsts[0]) > jnp.inf
    return jnp.where(cpu & never, jnp.zeros_like(x), x)
  if cpu is not None:
    return tied(x, *deps, cpu=cpu)
  return lax.platform_dependent(x, *deps, cpu=tied,
                                default=lambda x, *deps: x)


def per_leaf(fn: Any, static_argnames: tuple[str, ...] = ()) -> Any:
  """``fn`` (a function applied to every leaf) as one ``jax.jit``: traced
  once per distinct leaf shape and dtype, where called as it is each of
  its ``jnp`` ops is traced again for every leaf (each a jit of its own:
  about 0.1 ms an op, so a transform's per-leaf ops cost it more time to
  trace at 500 leaves than XLA takes to compile them). XLA inlines the
  calls before it optimizes: the compiled program is the same. Make one
  per ``update`` call; pass what varies as arguments (static ones bound
  with ``functools.partial``, or named in ``static_argnames``)."""
  return jax.jit(fn, static_argnames=static_argnames)


def traced_once(inner: Any) -> Any:
  """``inner`` (an optimizer) with its ``update`` as one ``jax.jit``: a
  wrapper that calls its inner optimizer from several places (each branch
  of a ``platform_dependent``, a ``cond`` and its probe) traces it once
  and reuses the jaxpr; XLA inlines the call, so the compiled step is the
  same. Make one per ``update_fn`` call: the inner may close over that
  trace's values (``inject_hyperparams``). The guard traced Adam five
  times: 1.9 s to trace at 100 leaves, Adam's own step 0.18."""
  once = jax.jit(lambda u, s, p, extra: inner.update(u, s, p, **extra))

  def update(updates, state, params=None, **extra):
    return once(updates, state, params, extra)
  return optax.GradientTransformationExtraArgs(inner.init, update)


def kept(v: jax.Array) -> jax.Array:
  """A vector of per-leaf figures that XLA:CPU reduces as one: behind a
  barrier there, its algebraic simplifier no longer splits the reduction
  into a chain of N scalar ops, which XLA:CPU's fusion pass builds in
  O(N^2) (clip_by_value at 1,000 leaves: 11x Adam's compile time; a join
  of 1,600 figures: 10.9 s against 1.7). GPU/TPU: ``v`` itself."""
  return lax.platform_dependent(v, cpu=lax.optimization_barrier,
                                default=lambda x: x)


def zero_sum(x: jax.Array) -> jax.Array:
  """``sum(x - x)`` in float32 or wider: 0 if every entry of ``x`` is
  finite, else NaN (see :func:`all_finite`)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sum(x - x).astype(jnp.float32)


def all_finite(tree: Any, axis_name: str | None = None) -> jax.Array:
  """True iff every entry of ``tree`` is finite: ``sum(x - x)`` in float32
  is 0 for finite entries and NaN for an Inf or NaN one (no overflow, unlike
  a sum of squares). ``x - x`` rather than ``x * 0``: XLA:CPU materialised
  the broadcast 0 (a parameter-sized buffer per shape shared by leaves).
  With ``axis_name`` the sums are ``psum``-ed, so every device agrees. The
  sums are added as one :func:`kept` vector: as a chain, XLA:CPU copied the
  chain of N reductions into every select that reads the flag (rewind's
  snapshot: a program quadratic in the leaves, 275 s to compile 500)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones((), jnp.bool_)
  one = per_leaf(zero_sum)
  s = jnp.sum(kept(jnp.stack([one(x) for x in leaves])))
  if axis_name is not None:
    s = lax.psum(s, axis_name)
  return jnp.isfinite(s)


def operands(parts: Any, anchor: jax.Array) -> Any:
  """``parts`` (per-leaf figures, the step's scalars), on CPU returned
  through a ``lax.cond`` whose predicate is True at run time but not to
  XLA: ``isfinite(float(anchor))`` for an integer scalar ``anchor`` (a
  step counter; any value, a corrupt negative one included, gives True).
  XLA:CPU fuses what the figures are made of (a static slice with its
  index, selects, the scalar chain) into every loop that consumes them, so
  each leaf's loops grow or become distinct computations compiled one by
  one; out of a conditional the figures are plain operands and the loops
  are one small computation per shape (adagc at 100 leaves: 6.7x Adam's
  compile time -> 3.7x; spike_clip's per-leaf HLO 2.59x Adam's -> 2.31x).
  A conditional with the same value on both sides is folded away, hence
  the zeros on the side never taken. On GPU/TPU a conditional costs a
  launch and a sync, and is left out."""
  live = jnp.isfinite(jnp.asarray(anchor).astype(jnp.float32))

  def via_cond(live, parts):
    return lax.cond(live, lambda: parts,
                    lambda: jax.tree.map(jnp.zeros_like, parts))
  return lax.platform_dependent(live, parts, cpu=via_cond,
                                default=lambda live, parts: parts)


def flag_operand(flag: jax.Array) -> jax.Array:
  """A bool scalar that every leaf's loop reads as a plain operand on CPU
  (:func:`operands`, anchored on the flag itself): a skip or commit
  decision made of a chain of scalar ops that XLA:CPU otherwise copies into
  each loop that selects on it (rewind's snapshot write: 17 instructions a
  carried buffer instead of 5; rewind at 100 leaves: 27,281 instructions
  compiled -> 21,479). GPU/TPU: ``flag`` itself."""
  return operands(flag, flag.astype(jnp.int32))
