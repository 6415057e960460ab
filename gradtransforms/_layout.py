"""Per-leaf figures as stacked vectors: :class:`PerLeaf` and the leaf layout.

A transform that keeps one figure per parameter leaf stores it as ONE float32
(or int32) vector of shape ``(n_segments,)``, never as a tree of scalars: the
number of arrays in its state does not grow with the number of leaves, and
on GPU/TPU a vector costs one small kernel where a tree of scalars costs one
per leaf. A *segment* is a leaf, or, for a leaf with a layer axis
(``layer_axes``, stacked/scanned layers), one slice of it along that axis.

The segment names (``"blocks/attn/kernel[3]"``) travel with the vector as
static pytree metadata (:class:`PerLeaf`), so ``gt.metrics`` can unstack the
vector by name at read time without the params, and an update tree whose
structure differs from ``init``'s is caught at trace time.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr  # noqa: F401 (re-exported)

LayerAxes = Union[None, Callable[[str, Any], Union[int, None]], Any]


class PerLeaf(NamedTuple):
  """A vector with one entry per segment, and the segments' names (static).

  ``values``: an array of shape ``(len(names),)``. ``names``: a tuple of
  strings, part of the pytree structure (not a leaf), so ``jax.jit``,
  ``donate_argnums``, orbax and ``jax.tree.map`` see one array.

  Checkpoints: a ``NamedTuple``, so ``flax.serialization`` (``to_bytes``,
  ``to_state_dict``, ``flax.training`` checkpoints) stores it as
  ``{"values": ..., "names": {...}}`` without any registration (the core
  never imports flax), and pickle stores it by value. An *empty* vector (no
  segments: an empty tree, a figure that is not kept) has no array leaf at
  all: a zero-size array carries no information, and orbax refuses to save
  one; it comes back from the structure as an empty NumPy vector of its
  dtype.
  """
  values: Any
  names: tuple[str, ...] = ()

  # identity, as a plain object (tuple equality would compare the arrays)
  def __eq__(self, other: object) -> bool:
    return self is other

  def __ne__(self, other: object) -> bool:
    return self is not other

  def __hash__(self) -> int:
    return id(self)

  def replace(self, values: Any) -> "PerLeaf":
    return PerLeaf(values, self.names)

  def sqrt(self) -> "PerLeaf":
    """Norms from sums of squares (RMS from mean squares)."""
    return PerLeaf(jnp.sqrt(self.values), self.names)

  def count_below(self, level: Any = 1) -> jax.Array:
    """How many entries are below ``level`` (scales: leaves clipped)."""
    return jnp.sum(self.values < level, dtype=jnp.int32)

  def __repr__(self) -> str:
    return f"PerLeaf({self.values!r}, names=<{len(self.names)}>)"


def _flatten(p: PerLeaf) -> tuple[tuple[Any, ...], Any]:
  if not p.names:  # no segments: nothing to store (see PerLeaf)
    return (), ((), np.dtype(getattr(p.values, "dtype", np.float32)))
  return (p.values,), tuple(p.names)


def _unflatten(aux: Any, children: Sequence[Any]) -> PerLeaf:
  if not children:
    return PerLeaf(np.zeros((0,), aux[1]), ())
  return PerLeaf(children[0], aux)


jax.tree_util.register_pytree_node(PerLeaf, _flatten, _unflatten)


def _is_variable(x: Any) -> bool:
  return type(x).__module__.startswith("flax") and hasattr(x, "get_value")


def unwrap(tree: Any) -> Any:
  """Replaces Flax NNX variables by the arrays they hold (so params given
  as ``nnx.State`` of variables and gradients of plain arrays name their
  leaves alike)."""
  return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree,
                      is_leaf=_is_variable)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
  """``(name, leaf)`` pairs in ``jax.tree.leaves`` order; names as
  ``"layer1/w"`` (``jax.tree_util.keystr`` with ``/``), ``"."`` for a bare
  array."""
  flat, _ = jax.tree_util.tree_flatten_with_path(unwrap(tree))
  return [(keystr(p, simple=True, separator="/") or ".", x) for p, x in flat]


class Layout(NamedTuple):
  """Static description of a tree's segments: per leaf, its layer axis (or
  None) and its number of segments; and every segment's name."""
  axes: tuple[int | None, ...]
  counts: tuple[int, ...]
  names: tuple[str, ...]

  @property
  def size(self) -> int:
    return len(self.names)


def _axis_of(name: str, leaf: Any, axis: Any) -> int | None:
  if axis is None:
    return None
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f"layer_axes must give an int or None for each leaf, got "
                    f"{axis!r} for {name!r}")
  ndim = jnp.ndim(leaf)
  if not -ndim <= axis < ndim:
    raise ValueError(f"layer_axes: axis {axis} is out of range for leaf "
                     f"{name!r} of shape {jnp.shape(leaf)}")
  return axis % ndim


def _parts(path: tuple) -> tuple[str, ...]:
  """A key path as name components (a string key ``"blocks/mlp"`` is two)."""
  out: list[str] = []
  for k in path:
    out += keystr((k,), simple=True, separator="/").split("/")
  return tuple(out)


def _prefix_axes(tree: Any, layer_axes: Any) -> list[Any]:
  """Per leaf of ``tree``, the int/None of the most specific entry of the
  prefix ``layer_axes`` whose path starts the leaf's path (None where no
  entry does). Paths are compared by name, so a plain dict prefix matches
  an ``nnx.State`` (or any other mapping) of the same keys, keys may be
  left out (None: no layer axis) or written as paths (``"blocks/mlp"``);
  an entry that matches no leaf is an error (a typo)."""
  spec, _ = jax.tree_util.tree_flatten_with_path(
      unwrap(layer_axes), is_leaf=lambda x: x is None)
  entries = [(_parts(p), a) for p, a in spec]
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out: list[Any] = []
  used: list[list[tuple[str, Any]]] = [[] for _ in entries]
  for path, leaf in flat:
    parts, best = _parts(path), None
    for j, (pre, _) in enumerate(entries):
      if parts[:len(pre)] == pre and (
          best is None or len(pre) > len(entries[best][0])):
        best = j
    if best is not None:
      used[best].append(("/".join(parts) or ".", leaf))
    out.append(None if best is None else entries[best][1])
  for (pre, a), leaves in zip(entries, used):
    where = "/".join(pre) or "the whole tree"
    if not leaves:
      raise ValueError(f"layer_axes: the entry {where!r} matches no leaf of "
                       "the params (leaf names as gt.leaf_names gives them)")
    if isinstance(a, int) and not isinstance(a, bool):
      _same_layers(where, a, leaves)
  return out


def _same_layers(where: str, axis: int, leaves: list[tuple[str, Any]]) -> None:
  """Every leaf one layer-axis entry covers has the same number of layers:
  ``layer_axes=0`` over a model whose embedding is ``(256, d)`` and whose
  blocks are ``(4, ...)`` would cut the embedding into 256 "layers"."""
  sizes: dict[int, str] = {}
  for name, x in leaves:
    a = _axis_of(name, x, axis)
    if a is not None:
      sizes.setdefault(jnp.shape(x)[a], name)
  if len(sizes) > 1:
    shown = ", ".join(f"{n} ({k})" for k, n in list(sizes.items())[:3])
    raise ValueError(
        f"layer_axes: the axis {axis} given for {where} has different sizes "
        f"in its leaves ({shown}): they are not one stack of layers. Mark "
        "only the stacked subtree, e.g. layer_axes={'blocks': 0} (other "
        "leaves get no layer axis), or pass a callable (name, leaf) -> "
        "int | None")


def check_layer_axes(layer_axes: Any) -> Any:
  """Construction-time check of a ``layer_axes`` argument (see :func:`layout`)."""
  if layer_axes is None or callable(layer_axes):
    return layer_axes
  for a in jax.tree.leaves(unwrap(layer_axes)):
    if isinstance(a, bool) or not isinstance(a, int):
      raise TypeError("layer_axes must be None, a callable (name, leaf) -> "
                      f"int | None, or a pytree of ints/None; found {a!r}")
  return layer_axes


def layout(tree: Any, layer_axes: LayerAxes = None) -> Layout:
  """The segments of ``tree``: one per leaf, or one per slice along the
  leaf's layer axis where ``layer_axes`` gives one.

  ``layer_axes``: None (no layer axes), a callable ``(name, leaf) -> int |
  None`` with ``name`` as :func:`leaf_paths` writes it, or a prefix of
  ``tree`` holding ints or None, matched by key names (see
  :func:`_prefix_axes`): ``{"blocks": 0}`` marks only the stacked blocks of
  a dict or an ``nnx.State``; a bare int (``0``) marks every leaf and is
  refused unless all leaves have the same size along it (a fully stacked
  tree).
  """
  tree = unwrap(tree)
  pairs = leaf_paths(tree)
  if layer_axes is None:
    specs: Sequence[Any] = [None] * len(pairs)
  elif callable(layer_axes):
    specs = [layer_axes(n, x) for n, x in pairs]
  else:
    specs = _prefix_axes(tree, layer_axes)
  axes, counts, names = [], [], []
  for (name, x), spec in zip(pairs, specs):
    a = _axis_of(name, x, spec)
    axes.append(a)
    if a is None:
      counts.append(1)
      names.append(name)
    else:
      n = jnp.shape(x)[a]
      counts.append(n)
      names += [f"{name}[{i}]" for i in range(n)]
  return Layout(tuple(axes), tuple(counts), tuple(names))


def check_names(layout_: Layout, stored: PerLeaf, what: str) -> None:
  """Raises if the update tree's segments differ from those ``init`` saw."""
  if layout_.names != stored.names:
    diff = sorted(set(layout_.names) ^ set(stored.names))[:4]
    raise ValueError(
        f"{what}: the updates' tree structure differs from the params given "
        f"to init ({len(layout_.names)} vs {len(stored.names)} leaves/slices; "
        f"e.g. {diff or 'a different order'}); re-initialise the optimizer "
        "state for the new structure")


def reduce_axes(x: Any, axis: int | None) -> tuple[int, ...] | None:
  """Axes a per-segment reduction of ``x`` runs over (None: all)."""
  if axis is None:
    return None
  return tuple(i for i in range(jnp.ndim(x)) if i != axis)


def broadcast(v: jax.Array, x: Any, axis: int | None) -> jax.Array:
  """A per-leaf figure (scalar, or ``(L,)`` along ``axis``) shaped to
  broadcast against ``x``."""
  if axis is None:
    return v
  shape = [1] * jnp.ndim(x)
  shape[axis] = -1
  return v.reshape(shape)


def stack(parts: Sequence[jax.Array], dtype: Any = jnp.float32) -> jax.Array:
  """Per-leaf figures (scalars or ``(L,)`` vectors) as one ``(S,)`` vector."""
  if not parts:
    return jnp.zeros((0,), dtype)
  return jnp.concatenate([jnp.reshape(p, (-1,)).astype(dtype) for p in parts])


def starts(layout_: Layout) -> tuple[jax.Array, ...]:
  """Each leaf's first index in a stacked vector, as int32 scalars."""
  offsets = [0]
  for n in layout_.counts[:-1]:
    offsets.append(offsets[-1] + n)
  return tuple(jnp.asarray(i, jnp.int32) for i in offsets)


def split(v: jax.Array, layout_: Layout, starts: Sequence[Any] | None = None
          ) -> list[jax.Array]:
  """Inverse of :func:`stack`: scalars or ``(L,)`` slices of ``v``.

  ``starts``: the leaves' first indices (:func:`starts`) as run-time
  operands (``_xla.operands``): then dynamic slices, so every leaf's loop
  that reads its figure is the same computation, not one per index."""
  out, i = [], 0
  for k, (a, n) in enumerate(zip(layout_.axes, layout_.counts)):
    if starts is None:  # lax: jnp's indexing traces ~10x the Python per leaf
      out.append(jax.lax.index_in_dim(v, i, keepdims=False) if a is None
                 else jax.lax.slice_in_dim(v, i, i + n))
    else:
      part = jax.lax.dynamic_slice_in_dim(  # starts are >= 0: no wrap-around
          v, starts[k], n, allow_negative_indices=False)
      out.append(part.reshape(()) if a is None else part)
    i += n
  return out


def zeros(layout_: Layout, dtype: Any = jnp.float32, fill: Any = 0) -> PerLeaf:
  return PerLeaf(jnp.full((layout_.size,), fill, dtype), layout_.names)
