"""Issue 23, the researcher's loop: ``diagnose`` on a guarded run, the
dashboard call, ``layer_axes`` prefixes with Flax.

One real guarded run (a 2-block stacked TransformerLM under
``nnx.Optimizer``, a NaN injected into one layer slice at step 40, a x1000
gradient into the same slice at step 60, both skipped by the guard) serves
the diagnose and dashboard tests; synthetic histories cover the other cases
of the issue.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtransforms as gt
from gradtransforms.diagnose import depth_profile

nnx = pytest.importorskip("flax.nnx")
from gradtransforms.models import TransformerLM  # noqa: E402

NAN_AT, BIG_AT, STEPS = 40, 60, 75
FAULTY = "blocks/mlp_in/kernel[1]"
REMEDIES = ("lower the learning rate", "He/Xavier", "warm-up", "suggested clip",
            "would bound", "likely cause", "EXPLODING")


def _model():
  return TransformerLM(d_model=16, num_layers=2, num_heads=2, max_len=16,
                       rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def guarded_run():
  """Per step: gt.metrics(per_leaf=True), gt.dashboard(), the loss and the
  true global norm of the (faulty) gradient."""
  model = _model()
  tx = gt.guard(optax.chain(gt.clip_by_global_norm(1.0), optax.adamw(3e-3)),
                on=("spike", "loss_spike"), layer_axes={"blocks": 0})
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  data = np.random.default_rng(0).integers(0, 256, size=(STEPS, 8, 17))

  @nnx.jit
  def step(model, opt, tok, fault):
    def loss_fn(m):
      logits = m(tok[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, tok[:, 1:]).mean()
    loss, g = nnx.value_and_grad(loss_fn)(model)
    k = g["blocks"]["mlp_in"]["kernel"]
    v = k[...]
    k[...] = v.at[1].set(jnp.where(fault == 1, jnp.nan,
                                   jnp.where(fault == 2, v[1] * 1000, v[1])))
    opt.update(model, g, value=loss)
    return loss, optax.tree.norm(g)

  hist, dash, losses, norms = [], [], [], []
  for t in range(STEPS):
    fault = 1 if t == NAN_AT else 2 if t == BIG_AT else 0
    loss, n = step(model, opt, jnp.asarray(data[t]), fault)
    losses.append(float(loss))
    norms.append(float(n))
    hist.append(jax.device_get(gt.metrics(opt, per_leaf=True)))
    dash.append(gt.dashboard(opt))
  return dict(opt=opt, hist=hist, dash=dash, losses=losses, norms=norms,
              last_leaf=gt.dashboard(opt, per_leaf=True))


# --- diagnose on a guarded run (defect 2) -----------------------------------


def test_guarded_run_faults_are_contained_and_named(guarded_run):
  d = gt.diagnose(guarded_run["hist"], guarded_run["losses"])
  assert d.contained and d.regime == "healthy", d.report
  assert [(f.step, f.kind, f.action, f.layer) for f in d.faults] == [
      (NAN_AT, "non-finite", "skipped", FAULTY),
      (BIG_AT, "norm spike", "skipped", FAULTY)]
  assert d.first_nonfinite_step == NAN_AT
  assert d.first_nonfinite_layers == [FAULTY]  # from the detector's record
  assert "contained" in d.report and FAULTY in d.report
  # no remedy for a problem the run did not have
  assert not d.causes and not d.remedies
  for word in REMEDIES:
    assert word not in d.report, (word, d.report)


def test_uncontained_faults_stay_an_explosion():
  """A guard that skips every step from 30 on (NaN forever) contains
  nothing: the run exploded, and the faults are listed as skipped."""
  norm = np.r_[np.full(30, 1.0), np.full(20, np.nan)]
  bad = np.r_[np.zeros(30), np.ones(20)]
  d = gt.diagnose({"detect_spikes/norm": norm, "guard/bad": bad})
  assert d.regime == "exploding" and not d.contained
  assert d.faults[0].step == 30 and d.faults[0].action == "skipped"
  assert "fault at step 30" in d.report


def test_clipped_spike_is_contained_and_an_unclipped_one_is_not():
  norms = 1.0 + 0.01 * np.sin(np.arange(80))
  norms[50] *= 100
  scale = np.minimum(1.0, 5.0 / norms)
  clipped = gt.diagnose({"clip_by_global_norm/norm": norms,
                         "clip_by_global_norm/scale": scale})
  assert clipped.contained and clipped.regime == "healthy"
  assert [(f.step, f.action, f.by) for f in clipped.faults] == [
      (50, "clipped", "clip_by_global_norm")]
  assert not clipped.causes
  bare = gt.diagnose({"monitor/norm": norms})
  assert bare.regime == "exploding" and not bare.contained
  assert bare.faults[0].action == "none"


def test_a_fault_not_followed_by_health_is_not_contained():
  norm = np.r_[np.full(30, 1.0), 1e3, np.full(10, 50.0)]  # stays high after
  bad = np.r_[np.zeros(30), 1.0, np.zeros(10)]
  d = gt.diagnose({"detect_spikes/norm": norm, "guard/bad": bad})
  assert not d.contained


def _stacked_history(layers=12, steps=30):
  """Per-leaf norms of a stacked model: the key bias is zero by
  construction; per block the norm shrinks x0.5 per layer (block 0 the
  largest); an unstacked head."""
  h = {"monitor/norm": np.ones(steps)}
  for i in range(layers):
    for leaf, base in (("attn/key/bias", 0.0), ("attn/out/kernel", 1.0),
                       ("mlp/kernel", 2.0)):
      h[f"monitor/leaf_norm/blocks/{leaf}[{i}]"] = np.full(steps, base * 0.5 ** i)
  h["monitor/leaf_norm/head/kernel"] = np.full(steps, 1e-4)
  return h


def test_depth_order_by_layer_index_and_zero_leaves_left_out():
  h = _stacked_history()
  layers, norms = depth_profile(h)
  assert layers[0] == "blocks/attn/out/kernel[0]"
  assert layers[-1] == "head/kernel"
  assert not any("bias" in n for n in layers)  # zero by construction
  idx = [int(n.rsplit("[", 1)[1][:-1]) for n in layers[:-1]]
  assert idx == sorted(idx)  # [2] before [10], every leaf of a layer together
  assert layers.index("blocks/mlp/kernel[2]") < layers.index(
      "blocks/attn/out/kernel[10]")
  np.testing.assert_allclose(norms[:, 0], h["monitor/leaf_norm/" + layers[0]])
  d = gt.diagnose(h)
  assert d.first_layer == "blocks/attn/out/kernel[0]"
  assert d.last_layer == "head/kernel"
  assert set(d.zero_leaves) == {f"blocks/attn/key/bias[{i}]" for i in range(12)}
  assert "zero by construction" in d.report
  assert not d.dead_layers


def test_scheduled_clip_threshold_is_read_per_step():
  """clip_by_global_norm under inject_hyperparams with max_norm 5 -> 0.64:
  the threshold in force each step comes from gt.metrics'
  ``clip_by_global_norm/max_norm``."""
  sched = optax.linear_schedule(5.0, 0.64, 39)
  tx = optax.chain(optax.inject_hyperparams(gt.clip_by_global_norm)(
      max_norm=sched), optax.sgd(1e-3))
  p = {"w": jnp.ones((4,))}
  s, hist = tx.init(p), []
  update = jax.jit(tx.update)
  for t in range(40):
    g = {"w": jnp.full((4,), 1.0 + 0.01 * t)}  # norm ~2: clipped late only
    _, s = update(g, s, p)
    hist.append(jax.device_get(gt.metrics(s)))
  d = gt.diagnose(hist)
  (c,) = d.clips
  assert c.threshold_path is not None
  np.testing.assert_allclose(c.threshold_path, (5.0, 0.64), rtol=1e-5)
  assert "threshold 5 -> 0.64" in d.report
  assert c.verdict != "never reached"


def test_metrics_keep_segment_order_for_per_leaf_entries():
  """Per-leaf entries of one figure come in the state's segment order (the
  order culprit indices count in): [2] before [10]."""
  p = {"blocks": {"w": jnp.ones((12, 3))}, "a": jnp.ones(2)}
  tx = gt.detect_spikes(layer_axes={"blocks": 0})
  m = gt.metrics(tx.init(p), per_leaf=True)
  leaves = [k.split("/", 2)[2] for k in m
            if k.startswith("detect_spikes/nonfinite_since/")]
  assert leaves == gt.leaf_names(p, {"blocks": 0})
  assert leaves.index("blocks/w[2]") < leaves.index("blocks/w[10]")
  scalars = [k for k in m if k.count("/") == 1]
  assert scalars == sorted(scalars)


# --- the dashboard call (defect 3) ------------------------------------------


def test_dashboard_floats_named_under_the_guard(guarded_run):
  for row in guarded_run["dash"]:
    assert all(type(v) is float for v in row.values())
    assert not any(k.startswith("detect_spikes/") for k in row)
    assert not [k for k, v in row.items() if "culprit" in k and v < 0]
  before, at_nan = guarded_run["dash"][NAN_AT - 1], guarded_run["dash"][NAN_AT]
  assert not any("culprit" in k or "first_nonfinite" in k for k in before)
  assert at_nan[f"guard/culprit/{FAULTY}"] == NAN_AT
  assert at_nan[f"guard/first_nonfinite/{FAULTY}"] == NAN_AT
  assert guarded_run["dash"][BIG_AT][f"guard/culprit/{FAULTY}"] == BIG_AT


def test_dashboard_figures_describe_their_own_step(guarded_run):
  dash, norms = guarded_run["dash"], guarded_run["norms"]
  spike = dash[BIG_AT]
  np.testing.assert_allclose(spike["guard/norm"], norms[BIG_AT], rtol=1e-4)
  assert spike["guard/bad"] == 1.0 and spike["guard/norm_spike"] == 1.0
  # the clip's state was rolled back: its figures would be stale; left out
  assert not any(k.startswith("clip_by_global_norm/") for k in spike)
  metrics = guarded_run["hist"][BIG_AT]
  assert float(metrics["clip_by_global_norm/norm"]) < norms[BIG_AT] / 10  # stale
  good = dash[BIG_AT + 1]
  assert good["clip_by_global_norm/scale"] == 1.0
  # no duplicate: the clip first in the guard's chain sees the guard's norm
  assert "clip_by_global_norm/norm" not in good
  np.testing.assert_allclose(good["guard/norm"], norms[BIG_AT + 1], rtol=1e-4)


def test_dashboard_per_leaf_has_no_sentinels(guarded_run):
  row = guarded_run["last_leaf"]
  since = {k: v for k, v in row.items() if "/nonfinite_since/" in k}
  assert since == {f"guard/nonfinite_since/{FAULTY}": float(NAN_AT)}
  typical = [k for k in row if k.startswith("guard/typical_leaf_norm/")]
  assert f"guard/typical_leaf_norm/{FAULTY}" in typical
  assert all(row[k] > 0 for k in typical)
  assert not any("leaf_log_mean" in k or "leaf_observed" in k for k in row)


def test_dashboard_plain_states_and_bad_arguments():
  p = {"w": jnp.ones((3,)), "b": jnp.zeros(2)}
  tx = optax.chain(gt.detect_spikes(), optax.scale(2.0),
                   gt.clip_by_global_norm(1.0))
  s = tx.init(p)
  _, s = tx.update(p, s)
  row = gt.dashboard(s)
  # a user's own detector keeps its name; a clip not first in a guard keeps
  # its norm (here no guard at all)
  assert "detect_spikes/norm" in row and "clip_by_global_norm/norm" in row
  np.testing.assert_allclose(row["clip_by_global_norm/norm"],
                             2 * row["detect_spikes/norm"], rtol=1e-6)
  assert not any("culprit" in k for k in row)
  g = gt.guard(optax.chain(optax.scale(2.0), gt.clip_by_global_norm(1.0)))
  gs = g.init(p)
  _, gs = g.update(p, gs)
  row = gt.dashboard(gs)
  assert "clip_by_global_norm/norm" in row  # not first: another gradient
  inj = optax.inject_hyperparams(gt.clip_by_global_norm)(max_norm=0.5)
  si = inj.init(p)
  assert gt.dashboard(si)["clip_by_global_norm/max_norm"] == 0.5
  with pytest.raises(ValueError, match="no gradtransforms state"):
    gt.dashboard(optax.adam(1e-3).init(p))
  with pytest.raises(TypeError, match="per_leaf"):
    gt.dashboard(s, per_leaf=1)


# --- layer_axes with Flax (defect 4) ----------------------------------------


def _segments(layer_axes):
  model = _model()
  tx = gt.detect_spikes(layer_axes=layer_axes)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return opt.opt_state.leaf_log_mean.names


def test_dict_prefix_marks_the_stacked_blocks_under_nnx_optimizer():
  names = _segments({"blocks": 0})
  assert "blocks/mlp_in/kernel[1]" in names and "embed/embedding" in names
  assert not any(n.startswith("embed/embedding[") for n in names)
  by_callable = _segments(lambda name, x: 0 if name.startswith("blocks/")
                          else None)
  assert names == by_callable
  assert _segments(nnx.State({"blocks": 0})) == names  # an nnx.State prefix
  only_mlp = _segments({"blocks/mlp_in": 0})  # a path as the key
  assert "blocks/mlp_in/bias[0]" in only_mlp and "blocks/attn/key/kernel" in only_mlp
  # most specific entry wins
  mixed = _segments({"blocks": 0, "blocks/ln1": None})
  assert "blocks/ln1/scale" in mixed and "blocks/ln2/scale[0]" in mixed


def test_layer_axes_refuses_what_would_silently_cut_an_embedding():
  with pytest.raises(ValueError, match="embed/embedding"):
    _segments(0)  # (256, d) embedding and (2, ...) blocks: not one stack
  with pytest.raises(ValueError, match="blockz"):
    _segments({"blockz": 0})  # a typo matches no leaf
  with pytest.raises(TypeError, match="layer_axes"):
    gt.detect_spikes(layer_axes={"blocks": 0.5})
  # a fully stacked tree: a bare int still marks every leaf
  p = {"w": jnp.ones((3, 4, 2)), "b": jnp.ones((3, 2))}
  assert gt.leaf_names(p, 0) == [f"b[{i}]" for i in range(3)] + [
      f"w[{i}]" for i in range(3)]


def test_diagnose_reads_dashboard_rows_alike(guarded_run):
  """One logging loop: the rows logged to a dashboard are what diagnose
  reads, with the same conclusions as from gt.metrics rows."""
  d = gt.diagnose(guarded_run["dash"], guarded_run["losses"])
  m = gt.diagnose(guarded_run["hist"], guarded_run["losses"])
  assert d.contained and d.regime == "healthy", d.report
  assert [(f.step, f.kind, f.action, f.layer) for f in d.faults] == [
      (f.step, f.kind, f.action, f.layer) for f in m.faults]
  assert not d.causes and not d.remedies


def test_steps_are_the_optimizers_when_the_history_starts_late(guarded_run):
  """Rows logged from step 30 on: the report names steps as the guard and
  gt.culprits count them, not row positions."""
  d = gt.diagnose(guarded_run["dash"][30:], guarded_run["losses"][30:])
  assert [f.step for f in d.faults] == [NAN_AT, BIG_AT]
  assert d.first_nonfinite_step == NAN_AT
  assert f"fault at step {NAN_AT}:" in d.report and "steps 30 to" in d.report


def test_a_rewound_fault_is_contained(monkeypatch):
  """The hook for gt.rewind: a state registered with the role "rewind"
  (the rewind branch registers it) marks its steps as acted on."""
  from typing import NamedTuple

  from gradtransforms import _registry

  class FakeRewindState(NamedTuple):
    rewound: object

  monkeypatch.setitem(_registry.ROLES, "rewind", "took the params back")
  info = _registry.Info("fake_rewind", ("rewound",), {"rewind": "rewound"})
  monkeypatch.setitem(_registry._REGISTRY, FakeRewindState, info)
  norm = 1.0 + 0.01 * np.sin(np.arange(60))
  loss = np.ones(60)
  loss[30] = 50.0  # a loss spike the rewind took back (its row: the snapshot's)
  rewound = np.zeros(60)
  rewound[30] = 1
  d = gt.diagnose({"monitor/norm": norm, "fake_rewind/rewound": rewound}, loss)
  assert d.contained and d.regime == "healthy"
  assert [(f.step, f.kind, f.action, f.by) for f in d.faults] == [
      (30, "rewind", "rewound", "fake_rewind")]
  assert "rewound by fake_rewind" in d.report


def _rewind_run(burst):
  """gt.rewind(gt.guard(adam, max_consecutive_errors=3), every=10) on a
  quadratic; NaN gradients of one leaf on the steps of ``burst``."""
  p = {"w": jnp.ones((4,)), "v": jnp.ones((3,))}
  tx = gt.rewind(gt.guard(optax.adam(1e-2), max_consecutive_errors=3),
                 every=10, max_rewinds=2)
  s = tx.init(p)

  @jax.jit
  def step(p, s, bad):
    loss, g = jax.value_and_grad(
        lambda q: jnp.sum((q["w"] - 2) ** 2) + jnp.sum(q["v"] ** 2))(p)
    g = {"w": jnp.where(bad, jnp.nan, g["w"]), "v": g["v"]}
    u, s = tx.update(g, s, p, value=loss)
    return optax.apply_updates(p, u), s, loss

  hist, dash, losses = [], [], []
  for t in range(60):
    p, s, loss = step(p, s, t in burst)
    hist.append(jax.device_get(gt.metrics(s, per_leaf=True)))
    dash.append(gt.dashboard(s))
    losses.append(float(loss))
  return hist, dash, losses


def test_diagnose_reports_rewinds_of_a_real_run():
  hist, dash, losses = _rewind_run(set(range(30, 34)))
  d = gt.diagnose(hist, losses)
  assert d.contained and d.regime == "healthy" and d.halted_by is None
  rew = [f for f in d.faults if f.action == "rewound"]
  assert [(f.step, f.by, f.back_to, f.undone) for f in rew] == [
      (32, "rewind", 30, 3)]
  assert "1 rewind(s), at step(s) 32" in d.report
  assert not d.causes and not d.remedies
  # the dashboard leaves out the figures the rewind rolled back
  assert dash[32]["rewind/rewound"] == 1.0
  assert not any(k.startswith("guard/") for k in dash[32])
  assert "guard/norm" in dash[33]


def test_a_rewind_that_halts_points_at_the_data_not_at_clipping():
  hist, _, losses = _rewind_run(set(range(30, 60)))
  d = gt.diagnose(hist, losses)
  assert d.halted_by == "rewind" and not d.contained
  assert "stopped the run" in d.report and d.suggested_clip is None
  assert "suggested clip" not in d.report
