"""Static clipping family against optax / NumPy references and properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_global_norm, np_leaves, random_tree

import gradtransforms as gt


def run(tx, updates, params=None):
  state = tx.init(params if params is not None else updates)
  return jax.jit(tx.update)(updates, state, params)


@pytest.mark.parametrize("seed,bound", [(0, 1.0), (1, 100.0), (2, 0.3)])
def test_global_norm_matches_optax(seed, bound):
  t = random_tree(seed, scale=3.0)
  ours, state = run(gt.clip_by_global_norm(bound), t)
  ref, _ = run(optax.clip_by_global_norm(bound), t)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=1e-7)
  n = np_global_norm(t)
  np.testing.assert_allclose(state.norm, n, rtol=1e-6)
  np.testing.assert_allclose(state.scale, min(1.0, bound / n), rtol=1e-6)


def test_global_norm_matches_torch_formula(tree):
  # torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (norm + 1e-6)).
  n = np_global_norm(tree)
  ours, _ = run(gt.clip_by_global_norm(0.5), tree)
  for o, r in zip(np_leaves(ours), np_leaves(tree)):
    np.testing.assert_allclose(o, r * min(1, 0.5 / (n + 1e-6)), rtol=1e-5)


def test_global_norm_properties(tree):
  clipped, _ = run(gt.clip_by_global_norm(1.0), tree)
  assert np_global_norm(clipped) <= 1.0 + 1e-6
  # direction kept: every leaf is the same positive multiple of the input.
  ratios = [o / r for o, r in zip(np_leaves(clipped), np_leaves(tree))]
  np.testing.assert_allclose(np.concatenate([x.ravel() for x in ratios]),
                             ratios[0].ravel()[0], rtol=1e-6)
  again, _ = run(gt.clip_by_global_norm(1.0), clipped)
  chex.assert_trees_all_close(again, clipped, rtol=1e-6)  # idempotent
  chex.assert_trees_all_equal_structs(clipped, tree)


def test_leaf_norm_matches_numpy(tree):
  ours, state = run(gt.clip_by_leaf_norm(1.5), tree)
  for o, r in zip(np_leaves(ours), np_leaves(tree)):
    n = np.sqrt(np.sum(r * r))
    np.testing.assert_allclose(o, r * min(1.0, 1.5 / n), rtol=1e-5, atol=1e-7)
    assert np.sqrt(np.sum(o * o)) <= 1.5 * (1 + 1e-6)
  m = gt.metrics(state, per_leaf=True)
  assert set(m) == {f"clip_by_leaf_norm/{f}/{k}" for f in ("norm", "scale")
                    for k in gt.leaf_names(tree)} | {
                        "clip_by_leaf_norm/clipped", "clip_by_leaf_norm/threshold"}
  np.testing.assert_allclose(m["clip_by_leaf_norm/norm/dense/w"],
                             np.linalg.norm(np.asarray(tree["dense"]["w"])),
                             rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 1.0, 10.0])
def test_block_rms_matches_optax(tree, threshold):
  ours, _ = run(gt.clip_by_block_rms(threshold), tree)
  ref, _ = run(optax.clip_by_block_rms(threshold), tree)
  chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("record_peak", [False, True])
def test_clip_by_value_matches_optax(tree, record_peak):
  ours, state = run(gt.clip_by_value(0.7, record_peak=record_peak), tree)
  ref, _ = run(optax.clip(0.7), tree)
  chex.assert_trees_all_equal(ours, ref)
  peak = max(np.abs(x).max() for x in np_leaves(tree))
  if record_peak:
    assert float(state.max_abs) == peak  # a max: exact
    assert bool(state.clipped) == (peak > 0.7)
  else:  # not recorded: NaN, and so never "clipped"
    assert np.isnan(state.max_abs) and not bool(state.clipped)
  assert float(state.threshold) == np.float32(0.7)


def _peak_cases():
  f32 = np.asarray([[0.5, -3.0, 2.0]], np.float32)
  return {
      "float32": ({"a": f32, "b": np.float32(-7.5), "c": np.zeros((2, 0))}, 7.5),
      "float16": ({"a": f32.astype(np.float16)}, 3.0),
      # -2.5e4 in bfloat16 is -24960
      "bfloat16": ({"a": jnp.asarray([[1.5, -2.5e4]], jnp.bfloat16)}, 24960.0),
      "int32": ({"a": np.asarray([4, -9], np.int32)}, 9.0),
      "inf": ({"a": f32, "b": np.asarray([-np.inf, 1.0], np.float32)}, np.inf),
      "nan": ({"a": f32, "b": np.asarray([np.nan, 1.0], np.float32)}, np.nan),
      "empty": ({}, 0.0),
      "zero-size": ({"z": np.zeros((0, 3), np.float32)}, 0.0),
  }


@pytest.mark.parametrize("form", ["host", "rows"])
@pytest.mark.parametrize("case", list(_peak_cases()))
def test_clip_by_value_records_the_pre_clip_peak(case, form, monkeypatch):
  """``max |u|`` before the clip, in both platform forms (CPU/TPU: per
  leaf; GPU: each leaf's rows, then one max), run here on CPU: a NaN entry
  gives NaN, +-Inf gives inf; output as optax.clip's."""
  tree, want = _peak_cases()[case]
  if form == "rows":
    def default_form(*args, default, **_):
      return default(*args)
    monkeypatch.setattr(jax.lax, "platform_dependent", default_form)
  tx = gt.clip_by_value(2.0, record_peak=True)  # a fresh function
  out, state = jax.jit(tx.update)(tree, tx.init(tree))
  chex.assert_trees_all_equal(out, optax.clip(2.0).update(tree, None)[0])
  assert state.max_abs.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(state.max_abs), np.float32(want))
  assert bool(state.clipped) == (want > 2.0)


def test_clip_by_value_costs_what_optax_clip_costs_on_cpu():
  """Not recording the peak (the default), the step with Adam compiles to
  the same XLA:CPU program as ``optax.clip`` + Adam: the clip is fused into
  Adam's loops, no reduction of its own; only its state's two scalars are
  written (a copy each). Recording adds a reduction per leaf."""
  from gradtransforms.bench import budgets
  w = budgets.Workload(6, 6 * 64 * 48)

  def kernels(clip):
    return budgets.tx_step(optax.chain(clip, budgets.adam()), w).compile(
        "cpu").kernels
  ref = kernels(optax.clip(1e-3))
  assert kernels(gt.clip_by_value(1e-3)) == ref + 2
  assert kernels(gt.clip_by_value(1e-3, record_peak=True)) >= ref + 2 + 6


def test_clip_by_value_figures_are_this_steps_own():
  """The bound and the peak in the state are the step's own, whatever state
  it was given: one restored from another bound or from a recording run,
  and an injected bound stepped eagerly (not traced) or under jit."""
  g = {"a": jnp.asarray([3.0, -0.5], jnp.float32)}
  old = gt.clip_by_value(1.0, record_peak=True).update(g, None)[1]
  assert float(old.max_abs) == 3.0 and float(old.threshold) == 1.0
  _, new = gt.clip_by_value(5.0, record_peak=True).update(g, old)
  assert float(new.threshold) == 5.0 and not bool(new.clipped)
  _, new = gt.clip_by_value(1.0).update(g, old)
  assert np.isnan(new.max_abs) and not bool(new.clipped)
  tx = optax.inject_hyperparams(gt.clip_by_value)(max_abs=2.0)
  for update in (tx.update, jax.jit(tx.update)):
    state = tx.init(g)
    state.hyperparams["max_abs"] = jnp.asarray(0.25)
    out, new = update(g, state)
    np.testing.assert_array_equal(out["a"], [0.25, -0.25])
    assert float(new.inner_state.threshold) == 0.25


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_per_example_matches_optax(reduce):
  batch = jax.tree.map(lambda x: jnp.stack([x * (i + 1) for i in range(4)]),
                       random_tree(5))
  ours, state = run(gt.per_example_clip(3.0, reduce=reduce), batch,
                    random_tree(5))
  leaves, treedef = jax.tree.flatten(batch)
  ref_sum, num_clipped = optax.per_example_global_norm_clip(leaves, 3.0)
  ref = jax.tree.unflatten(treedef, ref_sum)
  if reduce == "mean":
    ref = jax.tree.map(lambda x: x / 4, ref)
  chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.clip_fraction, num_clipped / 4)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_per_example_bfloat16_is_the_float32_result_rounded_once(reduce):
  """bfloat16 per-example gradients (3 examples: 1/3 is inexact): the norms,
  weights and batch sum are float32, so the output is the exact result
  (NumPy, float64) rounded once to bfloat16, within its half-ulp; figures
  as the float64 ones."""
  rng = np.random.default_rng(0)
  g = {"a": rng.normal(size=(3, 5, 7)) * [[[1.0]], [[4.0]], [[0.1]]],
       "b": rng.normal(size=(3, 9))}
  g16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g)
  g64 = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32), np.float64),
                     g16)
  out, state = gt.per_example_clip(2.0, reduce=reduce).update(g16, None)
  norms = np.sqrt(sum(np.sum(x.reshape(3, -1) ** 2, axis=1)
                      for x in g64.values()))
  s = np.minimum(1.0, 2.0 / norms)
  for k, x in g64.items():
    ref = np.tensordot(s, x, axes=1) / (3 if reduce == "mean" else 1)
    assert out[k].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[k], np.float64), ref,
                               rtol=2.0 ** -8, atol=1e-30)
  np.testing.assert_allclose(state.clip_fraction, np.mean(norms > 2.0))
  np.testing.assert_allclose(state.max_norm, norms.max(), rtol=1e-6)


def test_per_example_rejects_mismatched_batch():
  tx = gt.per_example_clip(1.0)
  bad = {"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="leading batch axis"):
    tx.update(bad, tx.init(bad))


# --- edge cases and non-finite input ----------------------------------------


def test_zero_update_and_zero_bound(tree):
  zeros = jax.tree.map(jnp.zeros_like, tree)
  for tx in (gt.clip_by_global_norm(1.0), gt.clip_by_leaf_norm(1.0),
             gt.clip_by_block_rms(1.0), gt.clip_by_global_norm(0.0)):
    out, _ = run(tx, zeros)
    chex.assert_trees_all_equal(out, zeros)  # no 0/0
  out, state = run(gt.clip_by_global_norm(0.0), tree)
  assert all(np.all(x == 0) for x in np_leaves(out))
  assert float(state.scale) == 0.0


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_passes_through_unscaled(tree, bad):
  t = dict(tree, scalar=jnp.asarray(bad, jnp.float32))
  for tx, per_leaf in ((gt.clip_by_global_norm(1.0), False),
                       (gt.clip_by_leaf_norm(1.0), True),
                       (gt.clip_by_block_rms(1.0), True)):
    out, state = run(tx, t)
    # Global: the whole update passes unscaled. Per-leaf: finite leaves are
    # clipped as usual. The bad leaf is unchanged (Inf stays Inf, not NaN).
    expect = run(tx, {"dense": t["dense"]})[0]["dense"] if per_leaf else t["dense"]
    chex.assert_trees_all_close(out["dense"], expect, rtol=1e-6)
    np.testing.assert_array_equal(out["scalar"], t["scalar"])
    assert not all(np.all(np.isfinite(np.asarray(v)))
                   for v in gt.metrics(state, per_leaf=True).values())


def test_norm_beyond_float32_range_reads_as_inf_and_passes_unchanged():
  big = {"a": jnp.full((8,), 1e25, jnp.float32), "b": jnp.ones((3,))}
  out, state = run(gt.clip_by_global_norm(1.0), big)
  assert np.isposinf(state.norm) and float(state.scale) == 1.0
  chex.assert_trees_all_equal(out, big)  # no NaN created


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_low_precision_dtypes_kept_and_norm_in_f32(dtype):
  # 300**2 * 64 overflows float16 (max 65504) if squared in float16.
  t = {"w": jnp.full((8, 8), 300.0, dtype), "b": jnp.ones((4,), dtype)}
  for tx in (gt.clip_by_global_norm(1.0), gt.clip_by_leaf_norm(1.0),
             gt.clip_by_block_rms(1.0), gt.clip_by_value(1.0)):
    out, state = run(tx, t)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(
        lambda x: x.dtype, t)
    assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
               for x in jax.tree.leaves(out))
  _, state = run(gt.clip_by_global_norm(1.0), t)
  assert state.norm.dtype == jnp.float32
  np.testing.assert_allclose(state.norm, np.sqrt(64 * 300.0**2 + 4), rtol=1e-3)


# --- composition ---------------------------------------------------------------


def test_chain_with_adam_and_injected_threshold(tree):
  tx = optax.chain(optax.inject_hyperparams(gt.clip_by_global_norm)(max_norm=1.0),
                   optax.sgd(1.0))
  state = tx.init(tree)
  step = jax.jit(tx.update)
  out, state = step(tree, state, tree)
  np.testing.assert_allclose(np_global_norm(out), 1.0, rtol=1e-5)
  state[0].hyperparams["max_norm"] = jnp.asarray(0.25, jnp.float32)  # changed, no recompile
  out, state = step(tree, state, tree)
  np.testing.assert_allclose(np_global_norm(out), 0.25, rtol=1e-5)
  assert step._cache_size() == 1
  m = gt.metrics(state)
  np.testing.assert_allclose(m["clip_by_global_norm/scale"],
                             0.25 / np_global_norm(tree), rtol=1e-5)


# --- bad arguments ---------------------------------------------------------------


@pytest.mark.parametrize("make,arg", [
    (lambda: gt.clip_by_global_norm(-1.0), "max_norm"),
    (lambda: gt.clip_by_leaf_norm(-0.1), "max_norm"),
    (lambda: gt.clip_by_block_rms(-2), "threshold"),
    (lambda: gt.clip_by_value(-1), "max_abs"),
    (lambda: gt.per_example_clip(-1.0), "l2_norm_clip"),
    (lambda: gt.per_example_clip(1.0, reduce="median"), "reduce"),
    (lambda: gt.clip_by_global_norm(float("nan")), "max_norm"),
])
def test_bad_arguments_raise_value_error(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()


def test_non_numeric_threshold_and_int_grads_raise_type_error():
  with pytest.raises(TypeError, match="max_norm"):
    gt.clip_by_global_norm("1.0")
  for flag in ("yes", 1, None):
    with pytest.raises(TypeError, match="record_peak"):
      gt.clip_by_value(1.0, record_peak=flag)
  tx = gt.clip_by_global_norm(1.0)
  ints = {"a": jnp.ones((3,), jnp.int32)}
  with pytest.raises(TypeError, match="updates"):
    tx.update(ints, tx.init(ints))


def test_dashboard_leaves_out_a_peak_that_is_not_recorded():
  t = {"a": jnp.asarray([0.5, -2.0])}
  for flag in (False, True):
    tx = gt.clip_by_value(1.0, record_peak=flag)
    d = gt.dashboard(tx.update(t, tx.init(t))[1])
    assert ("clip_by_value/max_abs" in d) == flag
    assert ("clip_by_value/clipped" in d) == flag
    assert d["clip_by_value/threshold"] == 1.0
  assert d["clip_by_value/max_abs"] == 2.0 and d["clip_by_value/clipped"] == 1.0
  tx = gt.clip_by_value(1.0)
  assert np.isnan(tx.init(t).max_abs)  # NaN from init on: never a fake peak


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 3e-3, np.inf])
def test_clip_scale_is_max_over_norm_where_it_clips_else_one(max_norm, eps):
  """The one clip scale every norm clip uses (``_norms.clip_scale``), bit
  for bit against NumPy: ``max / (norm + eps)`` where the norm is finite and
  above the bound, exactly 1 elsewhere (NaN/Inf norms included); a vector of
  norms against a scalar bound, and each norm alone."""
  from gradtransforms import _norms
  norms = np.array([0.0, 1e-30, 1e-3, 3e-3, np.nextafter(np.float32(3e-3),
                    np.float32(1)), 0.5, 1.0, 2.0, 1e30, np.inf, -np.inf,
                    np.nan], np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    clip = np.isfinite(norms) & (norms > np.float32(max_norm))
    want = np.where(clip, np.float32(max_norm) / (norms + np.float32(eps)),
                    np.float32(1)).astype(np.float32)
  got = np.asarray(jax.jit(lambda n: _norms.clip_scale(n, max_norm, eps))(norms))
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32
  for n, w in zip(norms, want):
    np.testing.assert_array_equal(np.asarray(_norms.clip_scale(n, max_norm, eps)), w)
