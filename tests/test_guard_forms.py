"""The GPU/TPU forms, run here on the CPU. The guard's: the fused output
check (``_output_check.sums_with_output_check``) and the select form of the
step give the same decisions, updates and inner state as the CPU form, bit
for bit. The recorded norms' TPU form (bfloat16 squares): within bfloat16
rounding of NumPy's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtransforms as gt
from gradtransforms import _layout, _output_check, _read_once

FORMS = {"rows": _output_check._sums_and_finite_rows,
         "plain": _output_check._sums_and_finite_plain}


def _tree(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(5, 7)), dtype),
          "s": jnp.asarray(rng.normal(size=(3, 4, 2)), dtype),
          "t": jnp.asarray(rng.normal(size=(3, 4, 2)), dtype),
          "u": jnp.asarray(rng.normal(size=(2, 5, 3)), dtype),
          "v": jnp.asarray(rng.normal(size=(6,)), dtype),
          "e": jnp.zeros((0, 3), dtype), "c": jnp.asarray(2.0, dtype)}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bad", [None, jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("where", ["s", "u", "w"])
def test_fused_sums_and_output_check_match_numpy(form, dtype, bad, where):
  """Three stacked leaves (two of one shape, whose finiteness rows are
  added elementwise) and plain ones; the bad entry in either kind."""
  g = _tree(dtype)
  probe = jax.tree.map(lambda x: 3 * x, g)
  if bad is not None:
    probe[where] = probe[where].at[(1,) * probe[where].ndim].set(bad)
  lay = _layout.layout(g, lambda name, x: 0 if name in ("['s']", "['t']", "['u']")
                       else None)
  leaves = jax.tree.leaves(g)
  sums, ok = jax.jit(lambda l, p: FORMS[form](l, lay.axes, p, None))(
      leaves, jax.tree.leaves(probe))
  wants = []
  for x, a in zip(leaves, lay.axes):
    x64 = np.asarray(x, np.float64)
    wants.append(np.reshape((x64 ** 2).reshape(x.shape[0], -1).sum(1) if a == 0
                            else (x64 ** 2).sum(), -1))
  assert sums.stacked.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(sums.stacked), np.concatenate(wants),
                             rtol=2e-6)
  np.testing.assert_allclose(float(sums.total), np.concatenate(wants).sum(),
                             rtol=2e-6)
  assert bool(ok) == (bad is None)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_fused_output_check_on_an_empty_tree(form):
  sums, ok = FORMS[form]([], (), [], None)
  assert sums.stacked.shape == (0,)
  assert float(sums.total) == 0 and bool(ok)


CASES = {  # (params, gradient sequence, inner)
    "float16_adam": ({"a": jnp.ones(3, jnp.float16)},
                     [{"a": jnp.full(3, 1e-4, jnp.float16)}], lambda: optax.adam(1e-3)),
    "eps0": ({"a": jnp.ones(3), "b": jnp.ones((2, 3))},
             [{"a": jnp.zeros(3), "b": jnp.zeros((2, 3))},
              {"a": jnp.full(3, 0.5), "b": jnp.full((2, 3), 0.1)}],
             lambda: optax.adam(0.1, eps=0.0)),
    "nan_grad": ({"a": jnp.ones(3), "b": jnp.ones((2, 3))},
                 [{"a": jnp.full(3, 0.5), "b": jnp.full((2, 3), 0.1)},
                  {"a": jnp.asarray([0.1, jnp.nan, 0.1]), "b": jnp.ones((2, 3))},
                  {"a": jnp.full(3, 0.2), "b": jnp.full((2, 3), -0.1)}],
                 lambda: optax.adam(0.1)),
}


def _train(tx, params, grads):
  s, p, flags = tx.init(params), params, []
  step = jax.jit(tx.update)
  for g in grads:
    u, s = step(g, s, p)
    p = optax.apply_updates(p, u)
    flags.append((bool(s.bad), bool(s.output_bad)))
  return p, s, flags


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_form_of_the_default_guard_equals_the_cpu_form(case, force_platform):
  params, grads, inner = CASES[case]
  ref = _train(gt.guard(inner()), params, grads)
  force_platform("cuda")
  got = _train(gt.guard(inner()), params, grads)
  for a, b in ((ref[0], got[0]), (ref[1].inner_state, got[1].inner_state)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert ref[2] == got[2]
  want = {"float16_adam": [(True, True)], "eps0": [(True, True), (False, False)],
          "nan_grad": [(False, False), (True, False), (False, False)]}[case]
  assert got[2] == want
  np.testing.assert_allclose(float(got[1].norm), float(ref[1].norm), rtol=1e-6)


@pytest.mark.parametrize("name", ["monitor", "detect_spikes", "guard_spike",
                                  "rewind"])
def test_gpu_form_of_the_scalar_reads_is_bit_identical(name, force_platform):
  """``_read_once.read_once`` (GPU: the old scalars read as one stacked vector)
  changes no figure: states after good, NaN and spiking steps are equal to
  the CPU form's bit for bit."""
  make = {"monitor": lambda: optax.chain(gt.monitor(per_leaf=True), optax.sgd(0.1)),
          "detect_spikes": lambda: optax.chain(gt.detect_spikes(warmup_steps=2),
                                               optax.sgd(0.1)),
          "guard_spike": lambda: gt.guard(  # the fused output check has its own test
              optax.adam(0.1), on="spike", check="gradients", warmup_steps=2,
              max_consecutive_errors=2),
          "rewind": lambda: gt.rewind(gt.guard(  # windows close, it rewinds
              optax.adam(0.1), on="spike", check="gradients", warmup_steps=2,
              max_consecutive_errors=1), every=2)}[name]
  p = {"a": jnp.ones(3), "b": jnp.ones((2, 3))}
  seq = [jax.tree.map(lambda x, k=k: x * (0.1 + 0.05 * k), p) for k in range(4)]
  seq.insert(2, {"a": jnp.asarray([0.1, jnp.nan, 0.1]), "b": jnp.ones((2, 3))})
  seq.append(jax.tree.map(lambda x: x * 1e4, p))

  def states():
    tx, out = make(), []
    s = tx.init(p)
    step = jax.jit(tx.update)
    for g in seq:
      _, s = step(g, s, p)
      out.append(s)
    return out
  ref = states()
  force_platform("cuda")
  for a, b in zip(ref, states(), strict=True):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("words", [False, True])
def test_gpu_scalar_read_keeps_every_dtype_bit_for_bit(words, force_platform):
  """``_read_once.read_once``'s GPU form packs scalars of one width into one
  unsigned vector (their bits): float32 NaN payloads, -0.0, Inf, int32
  extremes, bools, float16/bfloat16 and int8 come back as they were, with
  their dtypes; arrays and a lone scalar of its width pass as they are, and
  ``restore`` gives back the original leaf where a scalar is passed on.
  ``bools_as_words``: the bools travel in the 4-byte vector."""
  force_platform("cuda")
  nan = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]
  state = {"f": jnp.float32(nan), "z": jnp.float32(-0.0),
           "inf": jnp.float32(-jnp.inf), "i": jnp.int32(-2**31),
           "u": jnp.int32(2**31 - 1), "b": jnp.bool_(True),
           "c": jnp.bool_(False), "h": jnp.float16(-0.0),
           "bf": jnp.asarray(3.5, jnp.bfloat16), "q": jnp.int8(-7),
           "v": jnp.arange(3.0)}

  def f(s):
    read, restore = _read_once.read_once(s, bools_as_words=words)
    return read, restore({**read, "u": read["u"]})
  text = jax.jit(f).lower(state).as_text()
  # 5 four-byte scalars, and the 2 bools with them or with the int8
  assert ("tensor<7xui32>" in text) == words
  assert ("tensor<3xui8>" in text) != words
  for out in jax.jit(f)(state):
    assert jax.tree.structure(out) == jax.tree.structure(state)
    for k, x in state.items():
      y = out[k]
      assert y.dtype == x.dtype and y.shape == x.shape, k
      assert np.asarray(y).tobytes() == np.asarray(x).tobytes(), k


@pytest.mark.parametrize("gpu", [False, True])
def test_scalar_read_keeps_keys_and_complex_scalars(gpu, force_platform):
  """PRNG keys (an extended dtype) and complex scalars have no unsigned
  word: two or more of each are stacked as they are (an inner optimizer
  may keep a key in its state: ``guard`` reads it once)."""
  if gpu:
    force_platform("cuda")
  state = {"k1": jax.random.key(0), "k2": jax.random.key(1),
           "c1": jnp.complex64(1 + 2j), "c2": jnp.complex64(-3j),
           "f": jnp.float32(1.5), "g": jnp.float32(2.5)}
  read = jax.jit(lambda s: _read_once.read_once(s)[0])(state)
  for k in ("k1", "k2"):
    assert jax.dtypes.issubdtype(read[k].dtype, jax.dtypes.prng_key), k
    np.testing.assert_array_equal(jax.random.key_data(read[k]),
                                  jax.random.key_data(state[k]))
  for k in ("c1", "c2", "f", "g"):
    assert read[k].dtype == state[k].dtype, k
    np.testing.assert_array_equal(np.asarray(read[k]), np.asarray(state[k]))


@pytest.mark.parametrize("action", ["skip", "zero", "rescale"])
@pytest.mark.parametrize("check", ["updates", "gradients"])
def test_cpu_in_place_step_equals_the_gpu_select_form(action, check, force_platform):
  """The CPU form (the output checked in a ``lax.cond``, the step taken in
  place: ``_in_place.step``, the reset to a fresh inner state selected
  there too) against the GPU form (selects after ``inner``): params, every
  state leaf and the flags bit for bit, through a spike, two NaN steps in a
  row (``max_consecutive_errors=2`` resets Adam) and an Adam whose output is
  NaN from a finite zero gradient (``eps=0``)."""
  p = {"a": jnp.ones(3), "b": jnp.ones((2, 3)), "e": jnp.zeros((0,))}
  seq = [jax.tree.map(lambda x, k=k: x * (0.1 + 0.05 * k), p) for k in range(4)]
  nan = {"a": jnp.asarray([0.1, jnp.nan, 0.1]), "b": jnp.ones((2, 3)),
         "e": jnp.zeros((0,))}
  seq += [jax.tree.map(lambda x: x * 1e4, p), nan, nan,
          jax.tree.map(jnp.zeros_like, p), seq[1]]

  def make():
    return gt.guard(optax.adam(0.1, eps=0.0), on="spike", action=action,
                    check=check, warmup_steps=2, max_consecutive_errors=2,
                    reset_inner_state=True)

  def run():
    tx, out = make(), []
    s, params = tx.init(p), p
    step = jax.jit(tx.update)
    for g in seq:
      u, s = step(g, s, params)
      params = optax.apply_updates(params, u)
      out.append((params, s))
    return out
  ref = run()
  assert int(ref[-1][1].resets) >= 1 and int(ref[-1][1].skipped) >= 2
  force_platform("cuda")
  for (p_a, s_a), (p_b, s_b) in zip(ref, run(), strict=True):
    exact = (p_a, s_a._replace(detector=None)), (p_b, s_b._replace(detector=None))
    for x, y in zip(*map(jax.tree.leaves, exact), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the GPU form's fused sums of squares add in another order
    for x, y in zip(*map(jax.tree.leaves, (s_a.detector, s_b.detector)), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5)


def _norm_grads(dtype, bad):
  g = {k: v for k, v in _tree(dtype).items() if k != "c"}
  g["big"] = jnp.asarray(np.random.default_rng(1).normal(size=(40, 300)) * 50,
                         dtype)
  if bad is not None:
    g["w"] = g["w"].at[2, 3].set(bad)
  return g


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_recorded_norms_tpu_form_within_bfloat16_rounding(force_platform, dtype):
  """monitor's per-leaf (and per-layer) norms and detect_spikes' global
  norm under the TPU form: bfloat16 leaves within 2**-7 of NumPy's float64
  norms (squares and sum each rounded to bfloat16); float16 and float32
  leaves exactly the default form (squared in float32). A non-finite entry
  (NaN, Inf: the same compiled steps) still makes its leaf's norm, and the
  global norm, non-finite."""
  cases = [(bad, _norm_grads(dtype, bad)) for bad in (None, jnp.nan, jnp.inf)]
  tx = gt.monitor(per_leaf=True, layer_axes={"s": 0})
  step = jax.jit(tx.update)
  defaults = [step(g, tx.init(g))[1] for _, g in cases]
  force_platform("tpu")  # new transforms: jit caches the traces above
  tx = gt.monitor(per_leaf=True, layer_axes={"s": 0})
  step = jax.jit(tx.update)
  det = gt.detect_spikes()
  det_step = jax.jit(det.update)
  for (bad, g), default in zip(cases, defaults):
    tpu = step(g, tx.init(g))[1]
    det_norm = gt.metrics(det_step(g, det.init(g))[1])
    want = {k: np.sqrt((np.asarray(x, np.float64) ** 2).reshape(
        x.shape[0], -1).sum(1)) if k == "s" else
        np.sqrt((np.asarray(x, np.float64) ** 2).sum()) for k, x in g.items()}
    got = tpu.leaf_norm
    flat = np.concatenate([np.atleast_1d(want[k]) for k in sorted(g)])
    if dtype == jnp.bfloat16:
      np.testing.assert_allclose(np.asarray(got.values), flat, rtol=2 ** -7)
      assert not np.array_equal(np.asarray(got.values),  # the TPU form ran
                                np.asarray(default.leaf_norm.values))
    else:
      np.testing.assert_array_equal(np.asarray(got.values),
                                    np.asarray(default.leaf_norm.values))
    total = np.sqrt(np.sum(flat ** 2))
    np.testing.assert_allclose(float(tpu.norm), total, rtol=2 ** -7)
    key = [k for k in det_norm if k.endswith("norm")][0]
    np.testing.assert_allclose(float(det_norm[key]), total, rtol=2 ** -7)
    assert np.isfinite(float(tpu.norm)) == (bad is None), bad


def _weak_scale():
  """An inner transformation whose state holds weakly typed scalars (as
  optax's line searches keep), one of them multiplying the update."""
  init = lambda p: {"scale": jnp.asarray(0.5), "n": jnp.asarray(0.0)}

  def update(u, s, p=None):
    return jax.tree.map(lambda x: x * s["scale"], u), {**s, "n": s["n"] + 1}
  return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("wrap", ["guard", "with_moment_reset"])
def test_read_once_keeps_weak_scalars_weak(wrap, gpu, force_platform):
  """A weakly typed scalar of an inner state is not read once: it stays
  weak (a bfloat16 update times it stays bfloat16) and the jitted step
  compiles once, on both forms (packed, the platform switch made it strong
  on every platform: float32 updates and a second compile)."""
  if gpu:
    force_platform("cuda")
  inner = optax.chain(_weak_scale(), optax.adam(1e-2))
  tx = (gt.guard(inner) if wrap == "guard"
        else gt.with_moment_reset(inner, 2))
  p = {"w": jnp.ones(3, jnp.bfloat16)}
  s = tx.init(p)
  step = jax.jit(tx.update)
  u, s2 = step(p, s, p)
  _, s3 = step(p, s2, p)
  assert u["w"].dtype == jnp.bfloat16
  for new in (s2, s3):
    weak = [x.weak_type for x in jax.tree.leaves(new) if jnp.ndim(x) == 0
            and x.dtype == jnp.float32 and x.weak_type]
    assert len(weak) == 2
  assert step._cache_size() == 1
