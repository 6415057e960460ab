"""The GPU form of the per-leaf sums of squares (``gradtransforms._sums``),
run here on the CPU: row partials finished by shape group give each leaf's
sum (per layer slice), in leaf order, and their total, as NumPy does in
float64; a non-finite entry makes its leaf's sum and the total non-finite.
Every transform that reads them (and clippy, whose per-leaf peaks are
finished the same way) gives the default form's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtransforms as gt
from gradtransforms import _norms, _sums


@pytest.mark.parametrize("shape, axis, view", [
    ((255, 254), None, (255, 254)),
    ((6,), None, (1, 6)),
    ((), None, (1, 1)),
    ((3, 4, 2), None, (1, 24)),
    ((50, 1), None, (1, 50)),
    ((2, 3, 128), None, (6, 128)),
    ((4, 255, 254), 0, (4, 255, 254)),
    ((4, 3, 5), 0, (4, 1, 15)),
    ((4, 300), 0, (4, 1, 300)),
    ((3, 4, 254), 1, None),
    ((0, 3), None, None),
])
def test_row_view(shape, axis, view):
  """The fewest trailing dimensions reaching ROW_MIN (128) elements make a
  row; a non-leading layer axis or an empty leaf has no view."""
  assert _sums.row_view(shape, axis) == view


def _tree(dtype, bad=None):
  rng = np.random.default_rng(1)
  shapes = [((5, 130), None), ((3, 4, 2), 0), ((7,), None), ((5, 130), None),
            ((2, 3, 4), 1), ((0, 4), None), ((3, 4, 2), 0), ((), None),
            ((6, 2), None), ((7,), None)]
  leaves = [jnp.asarray(rng.normal(size=s) * 3, dtype) for s, _ in shapes]
  if bad is not None:
    leaves[3] = leaves[3].at[2, 7].set(bad)
  return leaves, [a for _, a in shapes]


def _want(leaves, axes):
  out = []
  for x, a in zip(leaves, axes):
    x64 = np.asarray(x, np.float64) ** 2
    out.append(np.reshape(x64.sum() if a is None else
                          np.moveaxis(x64, a, 0).reshape(x.shape[a], -1).sum(1),
                          -1))
  return np.concatenate(out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_grouped_sums_match_numpy(dtype):
  """Leaves of one shape interleaved with others (their sums come back in
  leaf order), per-layer leaves, a non-leading layer axis and an empty
  leaf (summed apart), a scalar, 16-bit leaves (squares in float32)."""
  leaves, axes = _tree(dtype)
  got = jax.jit(lambda xs: _sums.grouped(xs, axes, _norms.sumsq))(leaves)
  want = _want(leaves, axes)
  assert got.stacked.dtype == jnp.float32 and got.stacked.shape == want.shape
  np.testing.assert_allclose(np.asarray(got.stacked), want, rtol=2e-6)
  np.testing.assert_allclose(float(got.total), want.sum(), rtol=2e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_grouped_sums_keep_a_nonfinite_leaf_apart(bad):
  leaves, axes = _tree(jnp.float32, bad)
  got = jax.jit(lambda xs: _sums.grouped(xs, axes, _norms.sumsq))(leaves)
  want = _want(leaves, axes)
  finite = np.isfinite(np.asarray(got.stacked))
  assert finite.tolist() == np.isfinite(want).tolist()
  assert finite.sum() == want.size - 1 and not np.isfinite(float(got.total))
  np.testing.assert_allclose(np.asarray(got.stacked)[finite], want[finite],
                             rtol=2e-6)
  if bad != bad:
    assert np.isnan(float(got.total))


def test_finish_splits_its_total_at_first():
  """``first``: the sums and total of the first rows; the others (of the
  same shapes, finished in the same reductions) only in ``rest_total``."""
  rng = np.random.default_rng(2)
  rows = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in [(4,), (3, 5), (4,), (4,), (3, 5)]]
  sums, total, rest = jax.jit(lambda r: _sums.finish(r, first=3))(rows)
  per = [np.asarray(r, np.float64).sum(-1).reshape(-1) for r in rows]
  np.testing.assert_allclose(np.asarray(sums), np.concatenate(per[:3]),
                             rtol=2e-6)
  np.testing.assert_allclose(float(total), np.concatenate(per[:3]).sum(),
                             rtol=2e-6)
  np.testing.assert_allclose(float(rest), np.concatenate(per[3:]).sum(),
                             rtol=2e-6)


def test_grouped_sums_of_an_empty_tree():
  got = _sums.grouped([], [], _norms.sumsq)
  assert got.stacked.shape == (0,) and float(got.total) == 0


TRANSFORMS = {
    "monitor": lambda ax: gt.monitor(per_leaf=True, layer_axes=ax),
    "detect_spikes": lambda ax: gt.detect_spikes(warmup_steps=1, layer_axes=ax),
    "clip_by_global_norm": lambda ax: gt.clip_by_global_norm(4.0),
    "clip_by_leaf_norm": lambda ax: gt.clip_by_leaf_norm(2.0, layer_axes=ax),
    "clip_by_block_rms": lambda ax: gt.clip_by_block_rms(0.5, layer_axes=ax),
    "adagc": lambda ax: gt.adagc(warmup_steps=1, layer_axes=ax),
    "clippy": lambda ax: gt.clippy(0.5, layer_axes=ax),  # peaks, not sums
}
# no layer axes; their old scalars are read once on GPU (_read_once)
READ_ONCE = {
    "zclip": lambda ax: gt.zclip(warmup_steps=1),
    "autoclip": lambda ax: gt.autoclip(50.0, history=8),
    "spike_clip": lambda ax: gt.spike_clip(threshold=4.0),
    "spam": lambda ax: gt.spam(1e-2, warmup_steps=1, interval=2),
    "with_moment_reset": lambda ax: gt.with_moment_reset(optax.adam(0.1), 2),
}
TRANSFORMS.update(READ_ONCE)


@pytest.mark.parametrize("name,stacked", [
    (n, st) for n in sorted(TRANSFORMS)
    for st in ((False,) if n in READ_ONCE else (False, True))])
def test_gpu_form_of_each_sum_reader_matches_the_default(name, stacked,
                                                         force_platform):
  """Updates and every state leaf of the GPU form (sums finished by shape
  group, old scalars read once) equal the default form's to float32
  rounding, over three steps (the second with a NaN entry in one leaf, the
  third a spike), on leaves of interleaved shapes, per layer where the
  transform takes layer axes."""
  rng = np.random.default_rng(3)
  shapes = {"a": (5, 130), "b": (3, 4, 2), "c": (7,), "d": (5, 130),
            "e": (3, 6, 40), "f": ()}
  p = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  ax = {"b": 0, "e": 0} if stacked else None
  seq = [jax.tree.map(lambda x: x * 0.1, p),
         {**p, "d": p["d"].at[1, 2].set(jnp.nan)},
         jax.tree.map(lambda x: x * 30.0, p)]

  def run():
    tx = TRANSFORMS[name](ax)
    s, outs = tx.init(p), []
    step = jax.jit(tx.update)
    for g in seq:
      u, s = step(g, s, p)
      outs.append((u, s))
    return outs
  ref = run()
  force_platform("cuda")
  for a, b in zip(ref, run(), strict=True):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-6,
                                 atol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_spike_clip_row_excess_is_numpy_in_the_leaf_dtype(dtype, force_platform):
  """spike_clip's GPU form of ``max(|g| - b)`` (each leaf's row maxima, then
  one max) equals NumPy's in the leaves' own dtype, NaN kept, for leaves of
  rank 1-3 and an empty one (a float32 reduction of 16-bit ``|g| - b`` let
  XLA skip their rounding)."""
  import importlib
  from gradtransforms import _xla
  sc = importlib.import_module("gradtransforms.spike_clip")  # the module
  rng = np.random.default_rng(4)
  shapes = [(1000,), (2, 3, 50), (0,), (7, 130)]
  gs = [jnp.asarray(rng.normal(size=s) * 3, dtype) for s in shapes]
  bs = [jnp.asarray(np.abs(rng.normal(size=s)), dtype) for s in shapes]
  force_platform("cuda")
  f = jax.jit(lambda g, b: sc._excess(g, b, _xla.per_leaf(sc._leaf_excess)))
  for g in (gs, [gs[0].at[3].set(jnp.nan)] + gs[1:]):
    want = max(np.max(np.abs(np.asarray(x)) - np.asarray(y)).astype(np.float32)
               for x, y in zip(g, bs) if x.size)
    np.testing.assert_array_equal(np.asarray(f(g, bs)), np.float32(want))
