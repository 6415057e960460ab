"""Monitoring, spike detection, guards, attribution and diagnosis."""

import chex
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_global_norm, np_leaves, random_tree

import gradtransforms as gt

STEADY = list(np.exp(0.1 * np.random.default_rng(1).normal(size=300)))


def grads_with_norms(norms, seed=0):
  base = random_tree(seed)
  unit = np_global_norm(base)
  return [jax.tree.map(lambda x: x * jnp.float32(n / unit), base) for n in norms]


def run(tx, seq, params=None, losses=None):
  state = tx.init(params if params is not None else seq[0])
  step = jax.jit(tx.update)
  outs, states = [], []
  for i, g in enumerate(seq):
    kw = {} if losses is None else {"value": jnp.float32(losses[i])}
    u, state = step(g, state, params, **kw)
    outs.append(u)
    states.append(state)
  return outs, states


# --- monitor --------------------------------------------------------------------


def test_monitor_records_norms_and_passes_updates_unchanged():
  seq = grads_with_norms([1.0, 2.0, 4.0])
  seq.append(jax.tree.map(lambda x: x.at[...].set(jnp.nan) if x.ndim == 1 else x,
                          seq[0]))
  outs, states = run(gt.monitor(per_leaf=True), seq)
  for o, g in zip(outs, seq):
    chex.assert_trees_all_equal(o, g)
  m = gt.metrics(states[2], per_leaf=True)
  np.testing.assert_allclose(m["monitor/norm"], 4.0, rtol=1e-5)
  np.testing.assert_allclose(m["monitor/leaf_norm/dense/w"],
                             np.linalg.norm(np.asarray(seq[2]["dense"]["w"])),
                             rtol=1e-5)
  # log-norm statistics: exact running mean of log(1), log(2), log(4) early on
  np.testing.assert_allclose(m["monitor/log_norm_mean"], np.log(2.0), rtol=1e-5)
  last = gt.metrics(states[3])
  assert int(last["monitor/nonfinite_leaves"]) == 2  # dense/b and conv/1
  assert int(last["monitor/nonfinite_count"]) == 1
  assert last["monitor/log_norm_mean"] == m["monitor/log_norm_mean"]  # not poisoned


# --- detect_spikes -----------------------------------------------------------------


def test_no_false_alarms_on_steady_sequence():
  _, states = run(gt.detect_spikes(), grads_with_norms(STEADY),
                  losses=[2.0 + 0.05 * np.sin(i) for i in range(300)])
  m = gt.metrics(states[-1])
  assert int(m["detect_spikes/norm_spike_count"]) == 0
  assert int(m["detect_spikes/loss_spike_count"]) == 0
  assert int(m["detect_spikes/nonfinite_count"]) == 0


def test_planted_norm_and_loss_spikes_are_flagged_at_their_steps():
  norms = list(STEADY[:80])
  norms[50] *= 30.0
  losses = [2.0 + 0.05 * np.sin(i) for i in range(80)]
  losses[65] = 9.0
  _, states = run(gt.detect_spikes(), grads_with_norms(norms), losses=losses)
  norm_flags = [i for i, s in enumerate(states) if bool(s.norm_spike)]
  loss_flags = [i for i, s in enumerate(states) if bool(s.loss_spike)]
  assert norm_flags == [50] and loss_flags == [65]


def test_nonfinite_step_never_enters_statistics():
  seq = grads_with_norms(STEADY[:40])
  seq[30] = jax.tree.map(lambda x: x * jnp.inf, seq[30])
  seq[31] = jax.tree.map(lambda x: x * jnp.nan, seq[31])
  _, states = run(gt.detect_spikes(), seq)
  chex.assert_trees_all_equal(states[31].norm_stats, states[29].norm_stats)
  assert [bool(s.nonfinite) for s in states[29:33]] == [False, True, True, False]
  assert int(states[-1].first_nonfinite_step) == 30
  assert np.isfinite(float(states[-1].norm_stats.mean))


def test_attribution_names_the_leaf_that_blew_up():
  seq = grads_with_norms(STEADY[:60])
  w = seq[45]["conv"][0]
  seq[45]["conv"][0] = w * 200.0  # one layer's gradient explodes
  seq[55]["emb"] = (seq[55]["emb"][0].at[0, 0].set(jnp.inf),)
  params = random_tree(0)
  _, states = run(gt.detect_spikes(), seq, params)
  named = gt.culprits(states[50], params)
  assert named["detect_spikes/culprit"] == "conv/0"
  assert named["detect_spikes/culprit_step"] == 45
  named = gt.culprits(states[-1], params)
  assert named["detect_spikes/first_nonfinite_leaf"] == "emb/0"
  assert named["detect_spikes/first_nonfinite_step"] == 55
  m = gt.metrics(states[-1], per_leaf=True)
  assert int(m["detect_spikes/nonfinite_since/emb/0"]) == 55
  assert int(m["detect_spikes/nonfinite_since/dense/w"]) == -1


def test_on_event_hook_fires_only_on_events():
  seen = []
  seq = grads_with_norms(STEADY[:40])
  seq[35] = jax.tree.map(lambda x: x * jnp.nan, seq[35])
  run(gt.detect_spikes(on_event=seen.append), seq)
  jax.effects_barrier()
  # one indexing convention: the 0-based index of the step, everywhere
  assert len(seen) == 1 and bool(seen[0]["nonfinite"]) and int(seen[0]["step"]) == 35
  assert int(seen[0]["first_nonfinite_step"]) == 35
  assert seen[0]["first_nonfinite_leaf"] in gt.leaf_names(seq[0])  # a name


# --- guard ------------------------------------------------------------------------


def test_guard_skip_keeps_params_and_inner_state_bit_identical():
  params = random_tree(3)
  params["scalar"] = jnp.asarray(-0.0, jnp.float32)
  tx = gt.guard(optax.adam(1e-2))
  state = tx.init(params)
  step = jax.jit(tx.update)
  good = random_tree(4)
  u, state = step(good, state, params)
  params = optax.apply_updates(params, u)
  before_p, before_s = params, state.inner_state
  bad = dict(good, dense={"w": good["dense"]["w"].at[1, 1].set(jnp.nan),
                          "b": good["dense"]["b"]})
  u, state = step(bad, state, params)
  after = optax.apply_updates(params, u)
  chex.assert_trees_all_equal(after, before_p)
  assert np.signbit(after["scalar"])  # -0.0 kept
  chex.assert_trees_all_equal(state.inner_state, before_s)
  assert bool(state.bad) and int(state.skipped) == 1


def test_guard_never_applies_nan_unlike_apply_if_finite_and_halts():
  params = random_tree(3)
  nan = jax.tree.map(lambda x: x * jnp.nan, random_tree(4))
  ours = gt.guard(optax.sgd(0.1), max_consecutive_errors=3)
  ref = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)
  s_ours, s_ref = ours.init(params), ref.init(params)
  p_ours, p_ref = params, params
  # jitted (one compile each; eager updates: tests/test_checkpoint.py)
  step_ours, step_ref = jax.jit(ours.update), jax.jit(ref.update)
  for _ in range(5):
    u, s_ours = step_ours(nan, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = step_ref(nan, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  assert all(np.all(np.isnan(x)) for x in np_leaves(p_ref))  # optax gives up
  chex.assert_trees_all_equal(p_ours, params)
  m = gt.metrics(s_ours)
  assert bool(m["guard/halt"]) and int(m["guard/halts"]) == 3
  assert int(m["guard/consecutive"]) == 5 and int(m["guard/skipped"]) == 5


def test_guard_reset_inner_state_on_halt():
  params = random_tree(3)
  tx = gt.guard(optax.adam(1e-2), max_consecutive_errors=2, reset_inner_state=True)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    _, state = step(random_tree(4), state, params)
  assert int(state.inner_state[0].count) == 3
  nan = jax.tree.map(lambda x: x * jnp.nan, params)
  for _ in range(2):
    _, state = step(nan, state, params)
  chex.assert_trees_all_equal(state.inner_state, optax.adam(1e-2).init(params))
  assert int(state.resets) == 1 and int(state.consecutive) == 0


def test_guard_actions_on_a_spike():
  norms = list(STEADY[:40])
  norms[30] = 100.0
  seq = grads_with_norms(norms)
  params = random_tree(0)
  # zero: inner sees zeros; its count still advances.
  outs, states = run(gt.guard(optax.sgd(1.0, momentum=0.9), on="spike",
                              action="zero"), seq, params)
  assert bool(states[30].bad)
  mom_before = states[29].inner_state[0].trace
  chex.assert_trees_all_close(states[30].inner_state[0].trace,
                              jax.tree.map(lambda t: 0.9 * t, mom_before), rtol=1e-6)
  # rescale: the spike reaches inner scaled to the typical norm.
  outs, states = run(gt.guard(optax.sgd(1.0), on="spike", action="rescale"),
                     seq, params)
  typical = np.exp(float(states[29].detector.norm_stats.mean))
  np.testing.assert_allclose(np_global_norm(outs[30]), typical, rtol=1e-4)
  np.testing.assert_allclose(np_global_norm(outs[29]), norms[29], rtol=1e-4)


def test_guard_loss_spike_trigger():
  seq = grads_with_norms(STEADY[:40])
  losses = [1.0 + 0.01 * np.cos(i) for i in range(40)]
  losses[33] = 50.0
  _, states = run(gt.guard(optax.sgd(0.1), on="loss_spike"), seq,
                  random_tree(0), losses)
  assert [i for i, s in enumerate(states) if bool(s.bad)] == [33]


# --- composition ---------------------------------------------------------------------


def test_composes_with_multisteps_inject_and_nnx_optimizer():
  params = random_tree(0)
  # a guard inside MultiSteps needs MultiSteps to drop non-finite micro-batches
  # (test_guard_and_gradient_accumulation_both_orders)
  tx = optax.MultiSteps(optax.chain(gt.monitor(),
                                    gt.guard(optax.adam(1e-3))), every_k_schedule=2,
                        should_skip_update_fn=optax.skip_not_finite)
  state = tx.init(params)
  for _ in range(4):
    _, state = jax.jit(tx.update)(random_tree(1), state, params)
  m = gt.metrics(state)
  assert int(m["monitor/step"]) == 2 and int(m["guard/step"]) == 2

  inj = optax.inject_hyperparams(gt.monitor)(decay=0.5)
  s = inj.init(params)
  _, s = jax.jit(inj.update)(random_tree(1), s, params)
  assert "monitor/norm" in gt.metrics(s)

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(gt.clip_by_global_norm(1.0),
                                         gt.guard(optax.adam(1e-3))), wrt=nnx.Param)
  x = jnp.ones((4, 3))

  @nnx.jit
  def train(model, opt, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads, value=loss)
    return loss

  train(model, opt, x)
  m = gt.metrics(opt)
  assert int(m["guard/step"]) == 1 and np.isfinite(float(m["detect_spikes/loss"]))
  assert "clip_by_global_norm/norm" in m


def test_state_is_checkpointable():
  params = random_tree(0)
  tx = gt.guard(optax.adam(1e-3), on=("spike",))
  state = tx.init(params)
  _, state = tx.update(random_tree(1), state, params)
  leaves, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  a, _ = tx.update(random_tree(2), state, params)
  b, _ = tx.update(random_tree(2), restored, params)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("make,arg", [
    (lambda: gt.guard(optax.sgd(1.0), on="loss"), "on"),
    (lambda: gt.guard(optax.sgd(1.0), action="clip"), "action"),
    (lambda: gt.guard(optax.sgd(1.0), max_consecutive_errors=0), "max_consecutive_errors"),
    (lambda: gt.detect_spikes(z_thresh=-1.0), "z_thresh"),
    (lambda: gt.detect_spikes(decay=1.5), "decay"),
    (lambda: gt.monitor(decay=-0.5), "decay"),
])
def test_detection_bad_arguments(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()


def test_on_event_must_be_callable():
  with pytest.raises(TypeError, match="on_event"):
    gt.detect_spikes(on_event="print")


# --- diagnose -------------------------------------------------------------------------


def test_diagnose_names_first_nonfinite_layer_growth_and_depth():
  history = []
  for t in range(40):
    g = 0.5 * 1.3 ** t
    row = {"monitor/norm": g if t < 35 else np.inf,
           "monitor/leaf_norm/layers/0/w": 20 * g,
           "monitor/leaf_norm/layers/2/w": 2 * g,
           "monitor/leaf_norm/layers/10/w": g if t < 35 else np.inf}
    history.append(row)
  d = gt.diagnose(history)
  assert d.first_nonfinite_step == 35
  assert d.first_nonfinite_layers == ["layers/10/w"]
  np.testing.assert_allclose(d.growth_per_step, np.log(1.3), rtol=1e-6)
  assert d.first_layer == "layers/0/w" and d.last_layer == "layers/10/w"
  np.testing.assert_allclose(d.depth_ratio, 20.0)
  assert any(c.startswith("learning rate") for c in d.causes)
  assert any(c.startswith("depth") for c in d.causes)
  assert "step 35" in d.report and "layers/10/w" in d.report
  assert d.suggested_clip is not None


def test_diagnose_steady_run_and_init_scale():
  steady = {"monitor/norm": STEADY[:100]}
  d = gt.diagnose(steady)
  assert d.causes == [] and "no explosion pattern" in d.report
  np.testing.assert_allclose(d.suggested_clip, np.percentile(STEADY[:100], 90))
  big_start = {"monitor/norm": [1e4] + STEADY[:50]}
  assert any(c.startswith("initialisation") for c in gt.diagnose(big_start).causes)
  with pytest.raises(ValueError, match="norm"):
    gt.diagnose([{"loss": 1.0}])


# --- guard: output check, forms, accumulation, rules --------------------------------


def _bits(tree):
  return [np.asarray(x).reshape(-1).view(np.uint8) for x in jax.tree.leaves(tree)]


def _bit_equal(a, b):
  for x, y in zip(_bits(a), _bits(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", ["float16_adam", "eps0_zero_grad", "overflow"])
def test_guard_default_catches_a_non_finite_output_from_finite_gradients(case):
  """The three ways an optimizer makes Inf/NaN from a finite gradient: the
  default guard skips the step bit-exactly; check="gradients" lets it through."""
  if case == "float16_adam":  # nu = 1e-11 underflows to 0 and eps=1e-8 too
    p, g, inner = ({"a": jnp.ones(3, jnp.float16)},
                   {"a": jnp.full(3, 1e-4, jnp.float16)}, lambda: optax.adam(1e-3))
  elif case == "eps0_zero_grad":  # 0 / 0
    p, g, inner = {"a": jnp.ones(3)}, {"a": jnp.zeros(3)}, lambda: optax.adam(0.1, eps=0.0)
  else:
    p, g, inner = {"a": jnp.ones(3)}, {"a": jnp.full(3, 1e10)}, lambda: optax.scale(1e30)
  for check, caught in (("updates", True), ("gradients", False)):
    tx = gt.guard(inner(), check=check)
    s0 = tx.init(p)
    u, s = jax.jit(tx.update)(g, s0, p)
    new = optax.apply_updates(p, u)
    assert bool(jnp.all(jnp.isfinite(new["a"]))) == caught, check
    assert bool(s.bad) == caught and bool(s.output_bad) == caught
    if caught:
      _bit_equal(new, p)
      _bit_equal(s.inner_state, s0.inner_state)
      assert int(s.skipped) == 1 and np.isfinite(float(gt.metrics(s)["guard/norm"]))


def test_guard_check_argument_and_its_deprecated_alias():
  with pytest.raises(ValueError, match="check"):
    gt.guard(optax.sgd(0.1), check="params")
  with pytest.raises(ValueError, match="contradicts"):
    gt.guard(optax.sgd(0.1), check="updates", check_updates=False)
  with pytest.warns(DeprecationWarning, match="check_updates"):
    gt.guard(optax.sgd(0.1), check_updates=True)
  with pytest.raises(TypeError, match="check_updates"):
    gt.guard(optax.sgd(0.1), check_updates="yes")


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("pre_skip", [True, False])
@pytest.mark.parametrize("grad", [0.0, 0.5])  # 0.0: eps=0 makes the output NaN
def test_guarded_step_in_place_and_where_forms_are_bit_identical(check, pre_skip, grad):
  from gradtransforms import _output_check
  inner = optax.adam(0.1, eps=0.0)
  p = {"a": jnp.asarray([1.0, -0.0, 2.0]), "b": jnp.ones((2, 2))}
  g = jax.tree.map(lambda x: jnp.full_like(x, grad), p)
  old = inner.init(p)
  old = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, old)

  def run(gr, st, pa):
    return inner.update(gr, st, pa)
  outs = [jax.jit(lambda s, g, o, p, f=f: f(run, s, g, o, p, check))(
      jnp.asarray(pre_skip), g, old, p)
          for f in (_output_check.guarded_in_place, _output_check.guarded_where)]
  outs.append(jax.jit(lambda s, g, o, p: _output_check.guarded_step(s, run, g, o, p, check))(
      jnp.asarray(pre_skip), g, old, p))
  _bit_equal(outs[0], outs[1])
  _bit_equal(outs[0], outs[2])


def test_guard_and_gradient_accumulation_both_orders():
  """guard(MultiSteps(...)) drops the NaN micro-batch only; MultiSteps(guard)
  would freeze the run, so it raises unless MultiSteps skips non-finite
  micro-batches itself."""
  p = {"a": jnp.ones(3)}
  good = [{"a": jnp.full(3, 0.1 * (i + 1))} for i in range(8)]
  nan = {"a": jnp.asarray([0.1, jnp.nan, 0.1])}
  seq = good[:2] + [nan] + good[2:]

  def train(tx, grads):
    s, params = tx.init(p), p
    step = jax.jit(tx.update)
    for g in grads:
      u, s = step(g, s, params)
      params = optax.apply_updates(params, u)
    return params, s

  tx = gt.guard(optax.MultiSteps(optax.adam(1e-2), 4).gradient_transformation())
  ours, s = train(tx, seq)
  ref, _ = train(optax.MultiSteps(optax.adam(1e-2), 4).gradient_transformation(), good)
  _bit_equal(ours, ref)
  m = gt.metrics(s)
  assert int(m["guard/skipped"]) == 1 and int(m["guard/step"]) == 9  # micro-batches
  assert int(s.detector.first_nonfinite_step) == 2

  with pytest.raises(ValueError, match="MultiSteps"):
    train(optax.MultiSteps(gt.guard(optax.adam(1e-2)), 4), seq)
  inside = optax.MultiSteps(gt.guard(optax.adam(1e-2)), 4,
                            should_skip_update_fn=optax.skip_not_finite)
  theirs, _ = train(inside, seq)
  assert bool(jnp.all(jnp.isfinite(theirs["a"])))
  _bit_equal(theirs, ref)


def _small_layer_fault(step_at=40, n=60):
  """A big leaf dominating the global norm and a small one that jumps x1000
  at ``step_at``: the global norm barely moves."""
  rng = np.random.default_rng(0)
  seq = []
  for i in range(n):
    big = 1.0 + 0.02 * rng.normal()
    small = (1e-5 + 1e-7 * rng.normal()) * (1000.0 if i == step_at else 1.0)
    seq.append({"big": jnp.full((100,), big / 10.0), "small": jnp.full((4,), small / 2.0)})
  return seq


def test_layer_spike_rule_catches_what_the_global_norm_hides():
  seq = _small_layer_fault()
  _, states = run(gt.detect_spikes(layer_z_thresh=6.0), seq)
  assert [i for i, s in enumerate(states) if bool(s.layer_spike)] == [40]
  assert not any(bool(s.norm_spike) for s in states)
  assert gt.culprits(states[40])["detect_spikes/culprit"] == "small"
  assert float(states[40].layer_zscore) > 6.0 and int(states[-1].layer_spike_count) == 1
  # off by default: the fields stay at zero
  _, plain = run(gt.detect_spikes(), seq)
  assert int(plain[-1].layer_spike_count) == 0 and float(plain[40].layer_zscore) == 0.0
  _, g = run(gt.guard(optax.sgd(0.1), on="layer_spike"), seq, params=seq[0])
  assert [i for i, s in enumerate(g) if bool(s.bad)] == [40]


def test_norm_sigma_rule_on_the_raw_norm():
  norms = list(1.0 + 0.01 * np.random.default_rng(2).normal(size=50))
  norms[35] = 1.5  # +50 sigma of the raw norm
  _, states = run(gt.detect_spikes(norm_sigma=6.0), grads_with_norms(norms))
  assert [i for i, s in enumerate(states) if bool(s.sigma_spike)] == [35]
  np.testing.assert_allclose(float(states[35].sigma_zscore), 50, rtol=0.5)
  _, g = run(gt.guard(optax.sgd(0.1), on=("norm_sigma",)), grads_with_norms(norms),
             params=grads_with_norms(norms)[0])
  assert [i for i, s in enumerate(g) if bool(s.bad)] == [35]


@pytest.mark.parametrize("make,arg", [
    (lambda: gt.detect_spikes(layer_z_thresh=-1.0), "layer_z_thresh"),
    (lambda: gt.detect_spikes(norm_sigma=0.0), "norm_sigma"),
    (lambda: gt.detect_spikes(norm_sigma=float("nan")), "norm_sigma"),
    (lambda: gt.guard(optax.sgd(0.1), on="layer_spike", layer_z_thresh=0.0), "layer_z_thresh"),
    (lambda: gt.guard(optax.sgd(0.1), norm_sigma=-2.0), "norm_sigma"),
    (lambda: gt.guard(optax.sgd(0.1), on="sigma"), "on")])
def test_rule_arguments_are_validated(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()


def test_guard_records_the_skipped_steps_own_norm():
  norms = list(STEADY[:40]) + [1000.0]
  seq = grads_with_norms(norms)
  tx = gt.guard(optax.chain(gt.clip_by_global_norm(1e9), optax.sgd(0.1)), on="spike")
  _, states = run(tx, seq, params=seq[0])
  m = gt.metrics(states[-1])
  assert bool(m["guard/bad"]) and not bool(m["guard/output_bad"])
  np.testing.assert_allclose(float(m["guard/norm"]), 1000.0, rtol=1e-5)
  # the inner clip's figure is the last applied step's
  np.testing.assert_allclose(float(m["clip_by_global_norm/norm"]), norms[-2], rtol=1e-5)


def test_max_first_is_max_and_first_argmax():
  """The detector's one reduction for the culprit, the first non-finite
  segment and "anything blamable": NumPy's max and (first) argmax."""
  from gradtransforms._spikes import _max_first
  rng = np.random.default_rng(0)
  cases = [np.asarray([-np.inf] * 5), np.asarray([np.inf, 1.0, np.inf]),
           np.asarray([2.0, -1.0, 2.0, 2.0]), np.asarray([-np.inf, 0.5, np.inf]),
           np.asarray([3.0]), rng.integers(-3, 3, 37).astype(np.float32)]
  for x in cases:
    top, at = jax.jit(_max_first)(jnp.asarray(x, jnp.float32))
    assert float(top) == np.max(x) and int(at) == int(np.argmax(x)), x
    assert at.dtype == jnp.int32


def test_first_nonfinite_leaf_when_only_the_total_overflows():
  """Each leaf's sum of squares finite (2e38), their total beyond float32:
  the step is non-finite with no non-finite leaf; the first non-finite
  leaf reads 0 (as the argmax of an all-False mask did), and a later real
  NaN in leaf 1 does not overwrite the first record."""
  big = {"a": jnp.asarray([1.4e19], jnp.float32), "b": jnp.asarray([1.4e19], jnp.float32)}
  tx = gt.detect_spikes(warmup_steps=2)
  state = tx.init(big)
  _, state = jax.jit(tx.update)(big, state)
  assert bool(state.nonfinite) and int(state.first_nonfinite_step) == 0
  assert int(state.first_nonfinite_leaf) == 0
  nan = {"a": jnp.ones(1), "b": jnp.asarray([jnp.nan])}
  _, state = jax.jit(tx.update)(nan, state)
  assert int(state.first_nonfinite_step) == 0 and int(state.first_nonfinite_leaf) == 0
  tx2 = gt.detect_spikes(warmup_steps=2)
  _, s2 = jax.jit(tx2.update)(nan, tx2.init(nan))
  assert int(s2.first_nonfinite_leaf) == 1 and int(s2.culprit) == 1
