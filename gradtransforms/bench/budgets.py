"""Steps to compile for the kernel budgets: each catalogue method + Adam,
its reference, and its DRAM-bytes floor (issue 21).

Reference (what a method may cost in kernels, +5%): its optax equivalent;
else, for a clip, ``optax.clip_by_global_norm`` + Adam (Adam plus one read
of the gradients); else, for a figure that is only recorded, Adam + a
recorded global norm (XLA fuses the norm into Adam's own pass); rewind, in
its catalogue configuration around a guard: the guard's (``REFERENCE_OF``).
Bytes floor (+1%): Adam's bytes plus ``READS[name]`` reads of the
gradients, the passes over gradient-sized arrays the method needs beyond
Adam's.

Workloads: ``leaves`` 2-D leaves (per leaf), or ``leaves`` stacked leaves of
shape ``(layers, r, c)`` built with ``layer_axes=0`` where a method takes
it; float32 or bfloat16 (params, gradients and Adam's moments alike).
Everything is a ``ShapeDtypeStruct``: nothing is allocated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradtransforms.bench import compiled
from gradtransforms.catalogue import CATALOGUE

BATCH = 4  # per_example_clip: examples per step (a leading axis on the gradients)

# Kernel reference when a method has no optax equivalent and is not a clip
# measured against one read (the default for the "static" and "adaptive"
# groups): "record" for what only records a figure, "adam" for what wraps
# Adam without reading the gradients, "clip2" for clippy (it reads the
# gradients twice: once for its norms, once to scale after Adam).
REFERENCE: dict[str, str] = {
    "monitor": "record", "detect_spikes": "record",
    "with_moment_reset": "adam", "clippy": "clip2",
}
# Measured against another method's reference: rewind (around a guard,
# catalogue configuration) against the guard's, optax.apply_if_finite.
REFERENCE_OF: dict[str, str] = {"rewind": "guard"}
# Gradient-sized passes beyond Adam's that set the bytes floor. 0: fused into
# Adam's pass (a figure only recorded; optax.clip; a moment reset); 1: one
# read for a norm; adaptive_grad_clip 2: the gradients' and the params'
# norms; spike_clip 2: its own second moment, read and written; clippy 3:
# the norms of gradients and params, then the updates after Adam; guard 3:
# its default check of inner's output computes that output once more before
# the step is taken (never written), reading what Adam reads: the gradients
# and both moments (``check="gradients"``: 1, as apply_if_finite); rewind 4:
# its guard's 3, and the snapshot's, where the update is restored by a
# select (``where(r, s - p, u)``) fused into apply_updates.
READS: dict[str, int] = {
    "clip_by_value": 0, "monitor": 0, "detect_spikes": 0, "with_moment_reset": 0,
    "adaptive_grad_clip": 2, "spike_clip": 2, "clippy": 3, "guard": 3, "rewind": 4,
}


@dataclasses.dataclass(frozen=True)
class Workload:
  """``leaves`` leaves of about ``params`` elements in all; ``layers`` > 0:
  each leaf is ``(layers, r, c)`` and methods get ``layer_axes=0``."""
  leaves: int
  params: int
  layers: int = 0
  dtype: str = "float32"

  @property
  def stacked(self) -> bool:
    return self.layers > 0

  def tree(self) -> dict:
    per = max(self.params // (self.leaves * max(self.layers, 1)), 4)
    cols = max(int(per ** 0.5), 2)
    shape: tuple[int, ...] = (max(per // cols, 2), cols)
    if self.stacked:
      shape = (self.layers, *shape)
    return {f"leaf{i:04d}": jax.ShapeDtypeStruct(shape, jnp.dtype(self.dtype))
            for i in range(self.leaves)}


class Step(NamedTuple):
  """A jit-able step ``(params, state, grads) -> (params, state)`` and its
  example arguments; params and state are donated."""
  fn: Callable
  args: tuple
  donate_argnums: tuple[int, ...] = (0, 1)

  def compile(self, platform: str, **kw) -> compiled.Structure:
    return compiled.compile_step(self.fn, *self.args, platform=platform,
                                 donate_argnums=self.donate_argnums, **kw)


def adam() -> optax.GradientTransformation:
  return optax.adam(1e-3)


def record_norm() -> optax.GradientTransformation:
  """Records the gradients' global norm in its state and passes them on."""
  def update_fn(updates, state, params=None):
    del state, params
    return updates, optax.global_norm(updates)
  return optax.GradientTransformation(lambda _: jnp.zeros(()), update_fn)


def tx_step(tx, w: Workload, batch: bool = False) -> Step:
  """``tx`` + ``apply_updates`` on ``w`` (a batch axis on the gradients
  for a per-example method), as shapes only."""
  params = w.tree()
  grads = params if not batch else jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((BATCH, *s.shape), s.dtype), params)
  state = jax.eval_shape(tx.init, params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return Step(step, (params, state, grads))


def method_step(name: str, w: Workload, config: str = "bench") -> Step:
  """Catalogue method ``name`` (its ``config`` configuration) + Adam;
  ``layer_axes=0`` on a stacked workload where the method takes it."""
  entry = CATALOGUE[name]
  kw = {"layer_axes": 0} if w.stacked and entry.layer_axes else {}
  return tx_step(entry.build(adam(), config=config, **kw), w, entry.batch_axis)


def _per_example_reference() -> optax.GradientTransformation:
  def update_fn(updates, state, params=None):
    del params
    summed, _ = optax.per_example_global_norm_clip(jax.tree.leaves(updates), 1.0)
    tree = jax.tree.unflatten(jax.tree.structure(updates), summed)
    return jax.tree.map(lambda g: g / BATCH, tree), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def reference_kind(name: str) -> str:
  """``"optax"``, ``"clip"``, ``"clip2"``, ``"record"`` or ``"adam"``."""
  name = REFERENCE_OF.get(name, name)
  entry = CATALOGUE[name]
  if name in REFERENCE:
    return REFERENCE[name]
  if entry.optax_equivalent is not None or entry.batch_axis:
    return "optax"
  return "clip" if entry.group in ("static", "adaptive") else "record"


def reference_tx(kind: str, name: str | None = None) -> Any:
  """The optimizer of reference ``kind`` (``"optax"``: ``name`` 's optax
  equivalent placed as the method is)."""
  if kind == "optax":
    entry = CATALOGUE[str(name)]
    if entry.batch_axis:
      return optax.chain(_per_example_reference(), adam())
    return entry.build_optax(adam())
  clip = optax.clip_by_global_norm(1.0)
  return {"adam": lambda: adam(),
          "record": lambda: optax.chain(record_norm(), adam()),
          "clip": lambda: optax.chain(clip, adam()),
          "clip2": lambda: optax.chain(clip, clip, adam())}[kind]()


def reference_label(name: str) -> str:
  name = REFERENCE_OF.get(name, name)
  kind = reference_kind(name)
  if kind == "optax":
    return ("optax.per_example_global_norm_clip" if CATALOGUE[name].batch_axis
            else f"optax equivalent of {name}")
  return {"adam": "adam", "record": "adam + recorded global norm",
          "clip": "optax.clip_by_global_norm + adam",
          "clip2": "two optax.clip_by_global_norm + adam"}[kind]


def reference_key(name: str) -> tuple[str, str | None]:
  """What method ``name`` 's reference step depends on: its kind, and for an
  optax equivalent the method it is placed as. Methods with equal keys
  share one reference (one compile)."""
  kind = reference_kind(name)
  return kind, (REFERENCE_OF.get(name, name) if kind == "optax" else None)


def reference_step(name: str, w: Workload) -> Step:
  """The kernel reference of method ``name`` on ``w``."""
  kind = reference_kind(name)
  return tx_step(reference_tx(kind, REFERENCE_OF.get(name, name)), w,
               CATALOGUE[name].batch_axis)


def adam_step(w: Workload) -> Step:
  return tx_step(adam(), w)


def grad_bytes(w: Workload) -> int:
  return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(w.tree()))


def bytes_floor(name: str, adam_bytes: int, w: Workload,
                reference_bytes: int | None = None) -> int:
  """Adam's bytes + ``READS[name]`` (default 1) reads of the gradients; for
  ``per_example_clip`` the reference's bytes (the batch of gradients is its
  input)."""
  if CATALOGUE[name].batch_axis:
    if reference_bytes is None:
      raise ValueError("per_example_clip's floor is its reference's bytes")
    return reference_bytes
  return adam_bytes + READS.get(name, 1) * grad_bytes(w)
