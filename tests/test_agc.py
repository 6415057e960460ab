"""adaptive_grad_clip against optax.adaptive_grad_clip and a NumPy restatement."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_tree

import gradtransforms as gt

# Every rank optax handles without axis, and the shapes that squeeze to a
# vector (one unit in optax's convention).
SHAPES = {"r0": (), "r1": (5,), "row": (1, 6), "col": (6, 1), "r2": (4, 5),
          "r3": (3, 4, 5), "r4": (2, 3, 4, 5), "r5": (2, 2, 3, 3, 4),
          "r3_vec": (1, 1, 7), "r2_one": (1, 1)}


def make(shapes, seed):
  rng = np.random.default_rng(seed)
  # grads of varied scale so that some units of a leaf clip and others don't
  g = {k: jnp.asarray(rng.normal(size=s) * rng.uniform(0.01, 3.0, size=s),
                      jnp.float32) for k, s in shapes.items()}
  p = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  return g, p


def np_reduce_axes(shape, axis):
  """optax.unitwise_norm's convention, restated from its docstring."""
  nd = len(shape)
  if axis is not None:
    return tuple(a % nd for a in (axis if isinstance(axis, tuple) else (axis,)))
  if len([d for d in shape if d != 1]) <= 1:
    return tuple(range(nd))
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[nd]


def np_agc(g, p, clipping, eps=1e-3, axis=None):
  """Returns (clipped leaf, fraction of clipped units) in float64."""
  g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
  ax = np_reduce_axes(g.shape, axis)
  gn = np.sqrt(np.sum(g * g, axis=ax, keepdims=True))
  pn = np.sqrt(np.sum(p * p, axis=ax, keepdims=True))
  m = clipping * np.maximum(pn, eps)
  out = np.where(gn < m, g, g * m / np.maximum(gn, 1e-6))
  return out, float(np.mean(gn > m)) if gn.size else 0.0


def run(tx, g, p):
  return jax.jit(tx.update)(g, tx.init(p), p)


@pytest.mark.parametrize("clipping", [0.05, 0.5])
def test_matches_optax_on_every_rank(clipping):
  g, p = make(SHAPES, 0)
  ours, state = run(gt.adaptive_grad_clip(clipping), g, p)
  ref, _ = run(optax.adaptive_grad_clip(clipping), g, p)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=0)
  m = gt.metrics(state, per_leaf=True)
  total = 0
  for k in SHAPES:
    want, frac = np_agc(g[k], p[k], clipping)
    np.testing.assert_allclose(ours[k], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m[f"adaptive_grad_clip/clip_fraction/{k}"],
                               frac, rtol=1e-6)
    g64, p64 = np.asarray(g[k], np.float64), np.asarray(p[k], np.float64)
    ax = np_reduce_axes(g64.shape, None)
    total += int(np.sum(np.sqrt(np.sum(g64 ** 2, axis=ax)) > clipping *
                        np.maximum(np.sqrt(np.sum(p64 ** 2, axis=ax)), 1e-3)))
  assert 0 < total < sum(int(np.prod(np.shape(x))) for x in g.values())
  assert int(state.clipped_units) == total
  assert bool(gt.metrics(state)["adaptive_grad_clip/clipped"])


def test_row_vectors_are_one_unit_not_per_element():
  # (1, n): one unit of norm 5 clipped to 0.1 * 1 as a whole (optax), not
  # each element to 0.1 * |p_j|.
  g = {"w": jnp.asarray([[3.0, 4.0]])}
  p = {"w": jnp.asarray([[0.8, 0.6]])}
  out, state = run(gt.adaptive_grad_clip(0.1), g, p)
  np.testing.assert_allclose(out["w"], [[0.06, 0.08]], rtol=1e-6)
  assert int(state.clipped_units) == 1


@pytest.mark.parametrize("axis,shapes", [
    (0, {k: s for k, s in SHAPES.items() if s}),
    (-1, {k: s for k, s in SHAPES.items() if s}),
    ((0, 1), {k: s for k, s in SHAPES.items() if len(s) >= 2}),
    ((2, 0), {"r3": (3, 4, 5), "r6": (2, 1, 3, 2, 2, 3)}),
])
def test_axis_matches_optax(axis, shapes):
  g, p = make(shapes, 1)
  ours, state = run(gt.adaptive_grad_clip(0.2, axis=axis), g, p)
  ref, _ = run(optax.adaptive_grad_clip(0.2, axis=axis), g, p)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=0)
  for i, k in enumerate(gt.leaf_names(g)):
    want, frac = np_agc(g[k], p[k], 0.2, axis=axis)
    np.testing.assert_allclose(ours[k], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.clip_fraction.values[i], frac, rtol=1e-6)


def test_rank6_needs_axis_and_bad_axis_is_named():
  g, p = make({"r6": (2, 1, 3, 2, 2, 3)}, 2)
  with pytest.raises(ValueError, match="axis"):
    run(gt.adaptive_grad_clip(0.1), g, p)
  with pytest.raises(ValueError, match="axis=3 is out of range.*'r6'"):
    run(gt.adaptive_grad_clip(0.1, axis=3), *make({"r6": (2, 3)}, 2))
  with pytest.raises(ValueError, match="repeats"):
    run(gt.adaptive_grad_clip(0.1, axis=(0, -2)), *make({"r6": (2, 3)}, 2))
  for bad in (1.0, "0", True, (0, None), {0: 1}):
    with pytest.raises(TypeError, match="axis"):
      gt.adaptive_grad_clip(0.1, axis=bad)


def test_state_is_one_vector_whatever_the_leaf_count():
  tx = gt.adaptive_grad_clip(0.1)
  small = tx.init({"a": jnp.ones((3,))})
  big = tx.init(random_tree(0))
  assert len(jax.tree.leaves(small)) == len(jax.tree.leaves(big)) == 2
  assert big.clip_fraction.values.shape == (len(gt.leaf_names(random_tree(0))),)
  assert big.clip_fraction.values.dtype == jnp.float32
  assert big.clip_fraction.names == tuple(gt.leaf_names(random_tree(0)))
  # metrics without per_leaf still reports a tree-level figure
  _, state = tx.update(random_tree(1, 5.0), big, random_tree(0))
  m = gt.metrics(state)
  assert set(m) == {"adaptive_grad_clip/clipped_units", "adaptive_grad_clip/clipped"}
  assert int(m["adaptive_grad_clip/clipped_units"]) > 0


def test_tree_of_another_structure_is_refused():
  tx = gt.adaptive_grad_clip(0.1)
  t = random_tree(0)
  state = tx.init(t)
  other = {"x": jnp.ones((3,))}
  with pytest.raises(ValueError, match="tree structure differs"):
    tx.update(other, state, other)


def test_needs_params(tree):
  tx = gt.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(tree, tx.init(tree))


def test_nonfinite_unit_passes_and_others_are_clipped_as_optax():
  g, p = make({"w": (4, 5)}, 3)
  bad = {"w": g["w"].at[1, 2].set(jnp.inf).at[0, 3].set(jnp.nan)}
  out, state = run(gt.adaptive_grad_clip(0.05), bad, p)
  ref, _ = run(optax.adaptive_grad_clip(0.05), g, p)
  finite_cols = [0, 1, 4]
  np.testing.assert_allclose(np.asarray(out["w"])[:, finite_cols],
                             np.asarray(ref["w"])[:, finite_cols], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["w"])[:, [2, 3]],
                                np.asarray(bad["w"])[:, [2, 3]])


def test_infinite_clipping_never_clips(tree):
  out, state = run(gt.adaptive_grad_clip(jnp.inf), tree, jax.tree.map(
      lambda x: x * 1e-6, tree))
  chex.assert_trees_all_equal(out, tree)
  assert int(state.clipped_units) == 0


def test_units_decided_at_once_match_numpy():
  """Every unit of every leaf is decided on the joined sums (``_decide``):
  scales and per-leaf counts against a NumPy restatement (optax: scale
  ``m / max(||g||, 1e-6)`` where ``||g|| >= m``, ``m = clipping *
  max(||W||, eps)``; counted where ``||g|| > m``; a non-finite ``||g||`` or
  a NaN ``m`` keeps 1) on units at the bound and its next floats, zero,
  NaN and Inf norms, a NaN parameter norm, tiny norms under the 1e-6
  divide floor and a zero-size leaf, for eps 1e-3 and 0, and any anchor
  (the step counter read on CPU, a corrupt negative one included)."""
  from gradtransforms import agc
  m = np.float32(0.5 * 2.0)  # clipping 0.5, ||W|| 2
  g_norms = [np.array([m, np.nextafter(m, np.float32(9)),
                       np.nextafter(m, np.float32(0)), 0, 5], np.float32),
             np.zeros((0,), np.float32),
             np.array([np.nan, np.inf, 3e-7, 9], np.float32),
             np.array([7], np.float32)]
  p_norms = [np.full(a.shape, 2, np.float32) for a in g_norms]
  p_norms[2][3] = np.nan  # a NaN parameter norm: never clipped
  p_norms[3][0] = 0  # floored at eps
  gs = [np.square(a) for a in g_norms]
  ps = [np.square(a) for a in p_norms]
  units = np.cumsum([a.size for a in g_norms])[:-1]
  for eps, anchor in ((1e-3, 0), (0.0, -2**31)):
    scales, counts = jax.jit(
        lambda g, p, a: agc._decide(g, p, 0.5, eps, a))(gs, ps, jnp.int32(anchor))
    gn = np.sqrt(np.concatenate(gs))
    mn = np.float32(0.5) * np.maximum(np.sqrt(np.concatenate(ps)), np.float32(eps))
    with np.errstate(invalid="ignore", divide="ignore"):
      act = np.isfinite(gn) & (gn >= mn)
      want = np.where(act, mn / np.maximum(gn, np.float32(1e-6)), np.float32(1))
      hits = np.isfinite(gn) & (gn > mn)
    np.testing.assert_array_equal(np.concatenate(scales), want)
    assert [s.shape for s in scales] == [a.shape for a in g_norms]
    np.testing.assert_array_equal(counts, [h.sum() for h in np.split(hits, units)])
    # TPU's leaf-by-leaf form: the same bits
    chex.assert_trees_all_equal(
        jax.jit(lambda g, p: agc._per_leaf(g, p, 0.5, eps))(gs, ps),
        (scales, counts))
  assert want[1] < 1 and want[2] == 1  # the next float above m clips, below not
  out = agc._decide([], [], 0.5, 1e-3, jnp.int32(0))
  assert out[0] == [] and out[1].shape == (0,)
