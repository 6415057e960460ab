"""The snapshot ``gt.rewind`` keeps, and the rare work on it.

On a step that neither writes nor restores it, the snapshot is neither
read (but for the update's select below) nor written nor copied:

* It is written inside a ``while_loop`` of 0 or 1 trips (:func:`maybe`),
  which XLA updates in place, from the params and inner state the step
  *received* (the step after a window's end): those are buffers already,
  where the step's own ``p + u`` would need ``u`` materialised.
* The update is restored by a select, ``where(r, s - p, u)``, which fuses
  into the caller's ``apply_updates``: one read of the snapshot a step (a
  loop around ``u`` would materialise it: a write, a read and a kernel more
  per leaf).
* The inner state's arrays (``BIG`` elements or more) are restored by the
  next step, inside the same loop, before the inner optimizer runs: what
  it reads inside the loop comes out of it, and it updates that in place
  (read in a loop and updated outside, XLA copies them first; two loops a
  step, before and after the inner optimizer, were two host syncs on GPU).
  The loop's body is selects, no loop nested in it (XLA:TPU copied 3-D
  carries of nested loops to another layout and back every step).
* Its scalars (counters, statistics, the flags figures report) are kept
  packed, one vector per dtype, and restored at once by selects, which
  XLA:GPU fuses into one kernel (a select or a loop carry per scalar was a
  kernel each). Packing arrays too made XLA:CPU copy their old values.

With ``offload`` the arrays of ``OFFLOAD_MIN`` elements or more live in
host memory (``jax.memory.Space.Host``) and move only inside the loop; the
update is then restored inside a second loop (a fused kernel cannot read
host memory).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from gradtransforms import _xla

BIG = 2  # elements: an inner-state leaf this large is looped, not packed
OFFLOAD_MIN = 4096  # elements: with offload, snapshot arrays this large
HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device


def on_host(x: Any) -> bool:
  return getattr(jax.typeof(x), "memory_space", None) == HOST


def maybe(pred: jax.Array, fn: Callable, carry: Any) -> Any:
  """``fn(carry)`` if ``pred`` else ``carry``, as a ``while_loop`` of 0 or 1
  trips: a loop carry is updated in place, so a step that skips ``fn``
  reads and copies nothing (a ``lax.cond`` copies what it passes through,
  and XLA:GPU turns a cheap one into selects, which read both sides)."""
  if not jax.tree.leaves(carry):
    return carry

  def body(c):
    return jnp.zeros((), jnp.bool_), fn(c[1])
  return lax.while_loop(lambda c: c[0], body, (pred, carry))[1]


class Layout(NamedTuple):
  """Where each leaf of the inner state lives in its snapshot (static):
  ``big``: the indices of its arrays, one snapshot array each; ``groups``:
  per dtype, the indices of its scalars, packed into one vector."""
  big: tuple[int, ...]
  groups: tuple[tuple[Any, tuple[int, ...]], ...]


def layout(leaves: Sequence[Any]) -> Layout:
  big = tuple(i for i, x in enumerate(leaves) if x.size >= BIG)
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    if 0 < x.size < BIG:
      groups.setdefault(jnp.dtype(x.dtype), []).append(i)
  return Layout(big, tuple((d, tuple(ix)) for d, ix in groups.items()))


def pack(leaves: Sequence[Any], lay: Layout) -> tuple:
  """The snapshot form of the inner state's ``leaves``: its arrays, then
  its scalars, one vector per dtype."""
  return (*(leaves[i] for i in lay.big), *(
      jnp.concatenate([jnp.ravel(leaves[i]) for i in ix]).astype(d)
      for d, ix in lay.groups))


def _unpacked(snap: Sequence[Any], lay: Layout, like: Sequence[Any]) -> dict:
  """``{leaf index: snapshot value}`` of the packed leaves."""
  out = {}
  for (_, ix), vec in zip(lay.groups, snap[len(lay.big):]):
    at = 0
    for i in ix:
      out[i] = vec[at:at + like[i].size].reshape(like[i].shape)
      at += like[i].size
  return out


def _platform(leaves: Sequence[Any]) -> str:
  """The platform of concrete ``leaves``; traced: the default backend's."""
  for x in leaves:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      return next(iter(x.devices())).platform
  return jax.default_backend()


def place(params: Any, inner_leaves: Sequence[Any], offload: bool
          ) -> tuple[Any, tuple]:
  """The initial snapshot: a copy of ``params`` (one strongly typed buffer
  per leaf) and the packed inner state; with ``offload`` the arrays of
  ``OFFLOAD_MIN`` elements or more in host memory, unless the arrays are
  on (or, traced, the default backend is) a CPU, the host itself."""
  p_leaves, p_def = jax.tree.flatten(params)
  host = offload and _platform([*p_leaves, *inner_leaves]) != "cpu"

  def keep(x, packed=False):
    x = jnp.array(x, dtype=jnp.result_type(x), copy=True)
    big = host and not packed and x.size >= OFFLOAD_MIN
    return jax.device_put(x, HOST) if big else x
  lay = layout(inner_leaves)
  snap = [keep(x) for x in p_leaves]
  inner = [keep(x, i >= len(lay.big))
           for i, x in enumerate(pack(inner_leaves, lay))]
  return jax.tree.unflatten(p_def, snap), tuple(inner)


def to_snapshot(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` in the dtype and memory of snapshot leaf ``like``."""
  x = x.astype(like.dtype)
  return jax.device_put(x, HOST) if on_host(like) else x


def to_device(s: jax.Array) -> jax.Array:
  return jax.device_put(s, DEVICE) if on_host(s) else s


def _all_finite(leaves: Sequence[Any]) -> jax.Array:
  return _xla.all_finite([to_device(x) for x in leaves])


def prepare(check: jax.Array, pending: jax.Array, redo: jax.Array,
            params: Sequence[Any], inner: Sequence[Any], snap: Sequence[Any],
            snap_inner: Sequence[Any], axis_name: Any = None) -> dict:
  """The rare work before the inner optimizer runs, in one loop of 0 or 1
  trips (on GPU each loop is a host sync): if ``check``, are ``params``
  and (if ``pending``) the inner state's leaves ``inner`` finite (on every
  device of ``axis_name``)? If ``pending`` and both are, they become the
  snapshot. If ``redo`` (the last step went back to the snapshot), the
  arrays of ``inner`` are replaced by the snapshot's (its scalars were, by
  :func:`restore_small`, at that step).

  Returns ``fine_p``, ``fine_i``, ``commit`` (written), the snapshot, and
  ``inner``, whose arrays come out of the loop, for the inner optimizer to
  update in place."""
  lay = layout(inner)
  n_big = len(lay.big)
  # True, computed: a constant loop carry cost XLA:GPU a copy kernel into
  # the loop's buffer (rewind at 100 leaves, H100: 229 kernels -> 228)
  true = check | ~check
  small = [inner[i] for _, ix in lay.groups for i in ix]

  def flags(fine_p, fine_i):
    bad = [(~fine_p).astype(jnp.int32), (~fine_i).astype(jnp.int32)]
    if axis_name is not None:
      bad = [lax.psum(b, axis_name) for b in bad]
    return bad[0] == 0, (bad[1] == 0) | ~pending

  def write(big):  # the pending snapshot (on the device)
    return list(params), list(big) + list(pack(inner, lay)[n_big:])

  def body(carry):
    _, _, s, si, big = carry
    # redo and pending never hold together: the check reads the restored
    # arrays, so it depends on the loop's work (XLA:TPU hoisted a check of
    # the loop's inputs out of it, onto every step); the snapshot is read
    # from the carry, never its closed-over origin (an array that entered
    # the loop twice was copied)
    big = _select(redo, [to_device(y).astype(x.dtype)
                         for x, y in zip(big, si)], big)
    fine_p, fine_i = flags(
        jnp.where(check, _all_finite(params), True),
        jnp.where(pending, _all_finite([*big, *small]), True))
    commit = _xla.flag_operand(pending & fine_p & fine_i)  # read per leaf
    s, si = _select(commit, write(big), (s, si))
    return fine_p, fine_i, s, si, big

  fine_p, fine_i, s, si, big = maybe(check | redo, body, (
      true, true, list(snap), list(snap_inner), [inner[i] for i in lay.big]))
  out = list(inner)
  for i, x in zip(lay.big, big):
    out[i] = x
  return dict(fine_p=fine_p, fine_i=fine_i, commit=pending & fine_p & fine_i,
              snapshot=s, snapshot_inner=tuple(si), inner=out)


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
  """``new`` if ``pred`` else ``old``, leafwise (cast to ``old`` 's dtype
  and memory), inside the rare loop: a select, on the device (an ``old``
  in host memory comes over and goes back). No loop nested in the loop:
  XLA:TPU then copied 3-D carries to another layout and back every step,
  and failed to compile them in host memory."""
  new_l, tdef = jax.tree.flatten(new)
  on_device = _xla.per_leaf(_select_leaf)  # traced once per leaf shape
  return jax.tree.unflatten(tdef, [
      to_snapshot(jnp.where(pred, to_device(x).astype(y.dtype), to_device(y)),
                  y) if on_host(x) or on_host(y) else on_device(pred, x, y)
      for x, y in zip(new_l, jax.tree.leaves(old))])


def _select_leaf(pred: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.where(pred, x.astype(y.dtype), y)


def restore_small(pred: jax.Array, snap_inner: Sequence[Any], live: Any
                  ) -> Any:
  """The inner state ``live`` (a tree) with its scalars replaced by the
  snapshot's if ``pred`` (selects, which XLA:GPU fuses into one kernel);
  its arrays are left to the next step's :func:`prepare`."""
  leaves, tdef = jax.tree.flatten(live)
  out = list(leaves)
  for i, s in _unpacked(snap_inner, layout(leaves), leaves).items():
    out[i] = jnp.where(pred, s, leaves[i])
  return jax.tree.unflatten(tdef, out)


def restore_updates(pred: jax.Array, frozen: jax.Array, snap: Any,
                    params: Any, updates: Any) -> Any:
  """``where(pred, s - p, u)`` leafwise in ``u`` 's dtype (``-0.0`` if
  ``frozen``) for trees ``snap``, ``params``, ``updates``: a select where
  the snapshot is on the device (it fuses into ``apply_updates``), a loop
  (which materialises ``u``) where it is in host memory."""
  snap, params = jax.tree.leaves(snap), jax.tree.leaves(params)
  u, tdef = jax.tree.flatten(updates)

  def back(s, p, u):
    return jnp.where(frozen, jnp.asarray(-0.0, u.dtype),
                     (to_device(s) - p).astype(u.dtype))
  on_device = _xla.per_leaf(  # traced once per leaf shape
      lambda pred, frozen, s, p, x: jnp.where(pred, back(s, p, x), x))
  out = [x if on_host(s) else on_device(pred, frozen, s, p, x)
         for s, p, x in zip(snap, params, u)]
  host = [i for i, s in enumerate(snap) if on_host(s)]
  got = maybe(pred, lambda _: [back(snap[i], params[i], u[i]) for i in host],
              [u[i] for i in host])
  for i, x in zip(host, got):
    out[i] = x
  return jax.tree.unflatten(tdef, out)
