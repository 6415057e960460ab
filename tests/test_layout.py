"""Stacked per-leaf state, layer axes, reading figures, structure checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gradtransforms as gt
from gradtransforms import _xla
from gradtransforms.catalogue import CATALOGUE

L = 4


def stacked(seed, spike_layer=None, scale=1.0):
  """Blocks of L layers stacked on axis 0, plus an unstacked head."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(L, 4, 3)) * scale
  b = rng.normal(size=(L, 3)) * scale
  if spike_layer is not None:
    w[spike_layer] *= 100.0
  return {"blocks": {"b": jnp.asarray(b, jnp.float32),
                     "w": jnp.asarray(w, jnp.float32)},
          "head": jnp.asarray(rng.normal(size=(3, 2)) * scale, jnp.float32)}


def unstack(t):
  return {"blocks": {k: [v[i] for i in range(L)] for k, v in t["blocks"].items()},
          "head": t["head"]}


def restack(t):
  return {"blocks": {k: jnp.stack(v) for k, v in t["blocks"].items()},
          "head": t["head"]}


AXES = {"blocks": 0, "head": None}
SEQ = [stacked(10 + i, spike_layer=2 if i == 7 else None) for i in range(9)]

PER_LAYER = {
    "clip_by_leaf_norm": lambda **kw: gt.clip_by_leaf_norm(2.0, **kw),
    "clip_by_block_rms": lambda **kw: gt.clip_by_block_rms(0.8, **kw),
    "adagc": lambda **kw: gt.adagc(warmup_steps=3, **kw),
    "clippy": lambda **kw: gt.clippy(0.1, 1e-2, **kw),
    "monitor": lambda **kw: gt.monitor(per_leaf=True, **kw),
    "detect_spikes": lambda **kw: gt.detect_spikes(warmup_steps=3, **kw),
}


def _run(tx, seq, params, put=lambda t: t):
  state, step, outs = tx.init(put(params)), jax.jit(tx.update), []
  for g in seq:
    u, state = step(put(g), state, put(params))
    outs.append(u)
  return outs, state


def _per_leaf(state):
  """Per-leaf figures with unstacked names: "blocks/w[3]" -> "blocks/w/3"."""
  m = gt.metrics(state, per_leaf=True)
  return {k.replace("[", "/").rstrip("]"): float(v) for k, v in m.items()}


@pytest.mark.parametrize("name", sorted(PER_LAYER))
def test_layer_axes_equal_the_unstacked_layers(name):
  make = PER_LAYER[name]
  params = stacked(0)
  outs, state = _run(make(layer_axes=AXES), SEQ, params)
  ref_outs, ref_state = _run(make(), [unstack(g) for g in SEQ], unstack(params))
  for a, b in zip(outs, ref_outs):
    chex.assert_trees_all_close(a, restack(b), rtol=1e-5, atol=1e-7)
  got, want = _per_leaf(state), _per_leaf(ref_state)
  assert set(got) == set(want) and len(got) > 2
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_layer_axes_as_a_callable_and_named_slices():
  tx = gt.detect_spikes(warmup_steps=3,
                        layer_axes=lambda name, x: 0 if name.startswith("blocks") else None)
  _, state = _run(tx, SEQ[:8], stacked(0))
  assert gt.culprits(state)["detect_spikes/culprit"] == "blocks/w[2]"
  assert gt.leaf_names(stacked(0), AXES)[:2] == ["blocks/b[0]", "blocks/b[1]"]


@pytest.mark.parametrize("bad,err", [({"blocks": 3, "head": None}, ValueError),
                                     ({"blocks": "0", "head": None}, TypeError),
                                     ({"nope": 0}, ValueError)])
def test_bad_layer_axes_are_named(bad, err):
  with pytest.raises(err, match="layer_axes"):
    gt.clip_by_leaf_norm(1.0, layer_axes=bad).init(stacked(0))


@pytest.mark.parametrize("spec", [P(), P("d")])
@pytest.mark.parametrize("name", ["clip_by_block_rms", "adagc", "detect_spikes"])
def test_layer_axes_under_named_sharding(name, spec):
  if len(jax.devices()) < L:
    pytest.skip("needs host devices (conftest)")
  mesh = Mesh(np.asarray(jax.devices()[:L]), ("d",))
  # the layer axis sharded over the devices, or everything replicated
  shard = lambda t: jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.shape[0] == L
                                                else P())), t)
  make = PER_LAYER[name]
  outs, state = _run(make(layer_axes=AXES), SEQ, stacked(0), shard)
  ref_outs, ref_state = _run(make(layer_axes=AXES), SEQ, stacked(0))
  for a, b in zip(outs, ref_outs):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(gt.metrics(state, per_leaf=True),
                              gt.metrics(ref_state, per_leaf=True), rtol=1e-5)


# --- reading figures -------------------------------------------------------------


def test_metrics_is_compact_unless_per_leaf():
  params = {f"l{i}": jnp.ones((2, 2)) for i in range(20)}
  tx = gt.guard(optax.adam(1e-3))
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  compact = gt.metrics(state)
  assert len(compact) < 30 and not any("/l1" in k for k in compact)
  full = gt.metrics(state, per_leaf=True)
  assert full["detect_spikes/nonfinite_since/l7"] == -1
  with pytest.raises(TypeError, match="per_leaf"):
    gt.metrics(state, per_leaf="False")
  with pytest.raises(ValueError, match="no gradtransforms state"):
    gt.metrics(optax.adam(1e-3).init(params))


def test_culprits_check_params_against_the_state():
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  tx = gt.detect_spikes()
  state = tx.init(params)
  assert gt.culprits(state, params)["detect_spikes/culprit"] is None
  with pytest.raises(ValueError, match="leaves"):
    gt.culprits(state, {"a": jnp.ones(3)})


@pytest.mark.parametrize("make", [
    lambda: gt.clip_by_leaf_norm(1.0), lambda: gt.clip_by_block_rms(1.0),
    lambda: gt.adagc(), lambda: gt.clippy(), lambda: gt.monitor(per_leaf=True),
    lambda: gt.detect_spikes(), lambda: gt.guard(optax.sgd(0.1))])
def test_an_update_tree_of_another_structure_is_refused(make):
  tx = optax.with_extra_args_support(make())
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="structure"):
    tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, state, params)


@pytest.mark.parametrize("empty", [{}, [], (), {"z": jnp.zeros((0, 3))}])
@pytest.mark.parametrize("make", [
    lambda: gt.clip_by_leaf_norm(1.0), lambda: gt.clip_by_block_rms(1.0),
    lambda: gt.adagc(), lambda: gt.clippy(), lambda: gt.monitor(per_leaf=True),
    lambda: gt.detect_spikes(), lambda: gt.guard(optax.sgd(0.1)),
    lambda: gt.clip_by_value(1.0)])
def test_empty_trees_and_zero_size_leaves(make, empty):
  tx = optax.with_extra_args_support(make())
  state = tx.init(empty)
  out, state = jax.jit(tx.update)(empty, state, empty)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, empty)
  gt.metrics(state, per_leaf=True)


# --- detectors and guard -------------------------------------------------------------


def test_culprit_is_never_a_zero_leaf():
  """A zero (or empty) leaf has log-norm -inf: it must not be blamed."""
  params = {"a": jnp.ones(3), "dead": jnp.zeros(3), "empty": jnp.zeros((0,))}
  tx = gt.detect_spikes(warmup_steps=3)
  state, step = tx.init(params), jax.jit(tx.update)
  for i in range(6):
    g = {"a": jnp.ones(3) * (1.0 + 0.01 * i), "dead": jnp.zeros(3),
         "empty": jnp.zeros((0,))}
    _, state = step(g, state)
  _, state = step(dict(g, a=g["a"] * 1e4), state)
  assert bool(state.norm_spike)
  assert gt.culprits(state)["detect_spikes/culprit"] == "a"
  _, state = step(dict(g, a=g["a"] * jnp.nan), state)
  names = gt.culprits(state)
  assert names["detect_spikes/first_nonfinite_leaf"] == "a"
  assert names["detect_spikes/culprit"] == "a"


def test_z_scores_read_zero_during_warmup():
  tx = gt.detect_spikes(warmup_steps=5)
  state, step = tx.init({"a": jnp.ones(3)}), jax.jit(tx.update)
  zs = []
  for i in range(7):
    _, state = step({"a": jnp.full(3, 1.0 + i)}, state)
    zs.append(float(state.norm_zscore))
  assert zs[:5] == [0.0] * 5 and zs[5] != 0.0


@pytest.mark.parametrize("make", [gt.detect_spikes, lambda: gt.guard(optax.adam(0.1))])
def test_detectors_without_value_compile_once(make):
  tx = make()
  params = {"a": jnp.ones(3)}

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  state = tx.init(params)
  for i in range(3):
    params, state = step(params, state, {"a": jnp.full(3, 1.0 + i)})
  assert step._cache_size() == 1


def test_guard_loss_spike_needs_a_scalar_value():
  tx = gt.guard(optax.sgd(0.1), on="loss_spike")
  p = {"a": jnp.ones(2)}
  s = tx.init(p)
  with pytest.raises(ValueError, match="value=loss"):
    tx.update(p, s, p)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(p, s, p, value=jnp.ones(3))


@pytest.mark.parametrize("kw,err,arg", [
    (dict(inner=None), TypeError, "inner"),
    (dict(inner=optax.adam), TypeError, "optax.adam"),
    (dict(on=5), TypeError, "on"),
    (dict(on="nan"), ValueError, "on"),
    (dict(max_consecutive_errors=0), ValueError, "max_consecutive_errors"),
    (dict(reset_inner_state="yes"), TypeError, "reset_inner_state"),
    (dict(decay=1.0), ValueError, "decay")])
def test_guard_bad_arguments_are_named(kw, err, arg):
  kw = dict(dict(inner=optax.sgd(0.1)), **kw)
  with pytest.raises(err, match=arg):
    gt.guard(**kw)


def test_guard_check_updates_catches_a_non_finite_inner_output():
  """adam(eps=0) turns a zero gradient into 0/0 = NaN: only the output shows it."""
  params = {"a": jnp.ones(3)}
  zero = {"a": jnp.zeros(3)}
  for check, finite in ((True, True), (False, False)):
    tx = gt.guard(optax.adam(0.1, eps=0.0), check_updates=check)
    state = tx.init(params)
    u, state = tx.update(zero, state, params)
    p = optax.apply_updates(params, u)
    assert bool(jnp.all(jnp.isfinite(p["a"]))) == finite
    assert bool(state.bad) == check


def test_counters_saturate_instead_of_wrapping():
  tx = gt.guard(optax.sgd(0.1))
  p = {"a": jnp.ones(2)}
  big = jnp.asarray(2**31 - 1, jnp.int32)
  s = tx.init(p)
  s = s._replace(step=big, detector=s.detector._replace(step=big))
  _, s = tx.update(p, s, p)
  assert int(s.step) == 2**31 - 1 and int(s.detector.step) == 2**31 - 1


def test_adagc_zero_leaf_at_start_is_not_locked():
  """A leaf whose gradient is zero through warm-up trains afterwards."""
  tx = gt.adagc(warmup_steps=3)
  p = {"a": jnp.ones(3), "lora_a": jnp.ones(3)}
  state, step = tx.init(p), jax.jit(tx.update)
  for i in range(6):
    _, state = step({"a": jnp.ones(3), "lora_a": jnp.zeros(3)}, state)
  for i in range(3):
    u, state = step({"a": jnp.ones(3), "lora_a": jnp.full(3, 0.5)}, state)
    np.testing.assert_allclose(u["lora_a"], 0.5)  # first values set gamma
  u, _ = step({"a": jnp.ones(3), "lora_a": jnp.full(3, 50.0)}, state)
  assert 0 < float(jnp.linalg.norm(u["lora_a"])) < 1.05 * np.sqrt(3) * 0.5 + 1e-4


# --- platform-specific scheduling -----------------------------------------------


def test_rollback_plain_skips_with_minus_zero_and_keeps_the_old_state():
  u = {"a": jnp.asarray([[1.5, -2.0]]), "b": jnp.asarray([-0.0, jnp.nan, 1.0])}
  old = (optax.ScaleByAdamState(jnp.int32(3), u, u),)
  new = jax.tree.map(lambda x: x + 1, old)
  for skip in (True, False):
    got_u, got_s = jax.jit(_xla.rollback_plain)(jnp.asarray(skip), u, old, new)
    for x, want in zip(jax.tree.leaves(got_u), jax.tree.leaves(u)):
      want = np.full(want.shape, -0.0, np.float32) if skip else np.asarray(want)
      np.testing.assert_array_equal(np.asarray(x).view(np.uint32), want.view(np.uint32))
    for x, y in zip(jax.tree.leaves(got_s), jax.tree.leaves(old if skip else new)):
      np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                    np.asarray(y).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("make", [gt.clip_by_leaf_norm, gt.clip_by_block_rms,
                                  lambda b, **kw: gt.clippy(b * 0.1, **kw)])
def test_segment_scale_forms_are_bit_identical(make, monkeypatch):
  """GPU/TPU slice each stacked leaf's scales from one vector, CPU computes
  them inline (_norms.segment_scales): the same bits, run here on CPU."""
  g, w = stacked(3, spike_layer=2), stacked(4)
  tx = make(0.7, layer_axes=AXES)
  want = jax.jit(tx.update)(g, tx.init(w), w)
  calls = []

  def default_form(*args, cpu=None, default=None, **others):
    del others  # the GPU sums (_norms.leaf_scales' cuda branch): not here
    if cpu is not None:
      calls.append(cpu)
    return default(*args)
  monkeypatch.setattr(jax.lax, "platform_dependent", default_form)
  tx = make(0.7, layer_axes=AXES)  # a fresh function: traced anew
  got = jax.jit(tx.update)(g, tx.init(w), w)
  assert calls
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("make", [gt.clip_by_value, gt.clip_by_global_norm,
                                  gt.clip_by_leaf_norm, gt.clip_by_block_rms,
                                  lambda b: gt.adagc(max_norm=b, warmup_steps=2)])
def test_infinite_bound_never_clips_and_nan_or_list_is_refused(make):
  t = {"a": jnp.asarray([3e5, -2.0]), "b": jnp.ones((2, 2)) * 1e4}
  tx = make(float("inf"))
  out, _ = jax.jit(tx.update)(t, tx.init(t))
  chex.assert_trees_all_equal(out, t)
  with pytest.raises(ValueError):
    make(float("nan"))
  with pytest.raises(TypeError):
    make([1.0])


def test_clippy_under_inject_hyperparams_matches_the_plain_transform():
  u = {"a": jnp.asarray([0.5, -0.02, 0.1]), "b": jnp.ones((2, 2)) * 0.3}
  w = {"a": jnp.asarray([1.0, 0.0, -2.0]), "b": jnp.ones((2, 2))}
  inj = optax.inject_hyperparams(gt.clippy)(relative_factor=0.1,
                                            absolute_factor=0.01)
  got, _ = jax.jit(inj.update)(u, inj.init(w), w)
  want, _ = gt.clippy(0.1, 0.01).update(u, gt.clippy(0.1, 0.01).init(w), w)
  chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_diagnose_refuses_empty_or_mismatched_input():
  with pytest.raises(ValueError, match="empty"):
    gt.diagnose([])
  hist = [{"monitor/norm": 1.0 + i} for i in range(5)]
  with pytest.raises(ValueError, match="loss"):
    gt.diagnose(hist, loss=[1.0, 2.0])
  with pytest.raises(ValueError, match="global-norm"):
    gt.diagnose([{"something/else": 1.0}])


def test_diagnose_names_the_layer_slice_that_went_non_finite_first():
  tx = gt.monitor(per_leaf=True, layer_axes=AXES)
  state, step, history = tx.init(stacked(0)), jax.jit(tx.update), []
  for i, g in enumerate(SEQ):
    if i >= 5:  # layer 3 of the stacked blocks blows up at step 5
      g = {**g, "blocks": {**g["blocks"], "w": g["blocks"]["w"].at[3].set(jnp.inf)}}
    _, state = step(g, state)
    history.append(gt.metrics(state, per_leaf=True))
  d = gt.diagnose(history)
  assert d.first_nonfinite_step == 5
  assert d.first_nonfinite_layers == ["blocks/w[3]"]


def test_injected_hyperparameters_are_in_the_metrics():
  sched = optax.linear_schedule(2.0, 1.0, 4)
  tx = optax.chain(optax.inject_hyperparams(gt.clip_by_global_norm)(max_norm=sched),
                   optax.sgd(0.1))
  p = {"a": jnp.ones(3)}
  s = tx.init(p)
  for _ in range(2):
    _, s = jax.jit(tx.update)(p, s, p)
  m = gt.metrics(s)
  np.testing.assert_allclose(m["clip_by_global_norm/max_norm"], sched(1))
  np.testing.assert_allclose(m["clip_by_global_norm/norm"], np.sqrt(3.0), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(k for k, e in CATALOGUE.items()
                                        if e.layer_axes))
def test_per_layer_figures_add_no_parameter_sized_temporaries(name):
  """Per-layer sums of squares must not make XLA write the squared
  gradient to a buffer (it did once a scalar total was summed from them)."""
  params = {f"w{i}": jnp.ones((L, 64, 48)) for i in range(3)}
  tx = CATALOGUE[name].build(optax.adam(1e-3), layer_axes=0)

  def step(p, s, g):
    u, s = tx.update(g, s, p, value=jnp.float32(1.0))
    return optax.apply_updates(p, u), s
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile()
  extra = compiled.memory_analysis().temp_size_in_bytes / sum(
      x.nbytes for x in jax.tree.leaves(params))
  allowed = {"guard": 0.09, "clippy": 2.0}.get(name, 0.0)  # as test_api
  assert extra <= allowed + 0.05, extra
