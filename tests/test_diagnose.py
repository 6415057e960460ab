"""``gt.diagnose``: exploding, vanishing and healthy runs told apart, the
causes it names (and never names), and what it reads from clips.

Small real runs whose regime is known by construction (a 16-layer sigmoid
MLP vanishes, SGD at 0.3 diverges, a 1e-3 global-norm clip starves SGD, a
small ReLU MLP at a sane rate is healthy), then synthetic histories for each
branch with hand-computed figures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradtransforms as gt
from gradtransforms.diagnose import depth_profile

pytest.importorskip("flax")
from gradtransforms.models import DeepMLP  # noqa: E402
from gradtransforms.tasks import deep_regression, train  # noqa: E402

TASK = deep_regression(16)
EXPLOSION_CAUSES = ("initialisation", "learning rate", "bad batches")
VANISHING_CAUSES = ("saturating", "recurrence: the gradient through time")


def _named(d, prefixes):
  return [c for c in d.causes if c.startswith(prefixes)]


def _sigmoid16():
  return DeepMLP(16, 32, "sigmoid", "xavier", in_features=16, rngs=nnx.Rngs(0))


# --- real runs (module fixtures: each trained once) ---------------------------


@pytest.fixture(scope="module")
def sigmoid_run():
  """The issue's first example: 16-layer sigmoid MLP, Xavier, SGD 0.05, 60
  steps; a second, pure observer monitor after SGD records update ratios."""
  tx = optax.chain(optax.sgd(0.05), gt.monitor(update_ratio=True))
  history, _ = train(_sigmoid16(), tx, TASK, 60, 32)
  return history


@pytest.fixture(scope="module")
def clipped_run():
  """The issue's second example: 4-layer ReLU MLP, clip_by_global_norm(1e-3)
  in front of SGD."""
  tx = optax.chain(gt.clip_by_global_norm(1e-3), optax.sgd(0.05))
  history, _ = train(DeepMLP(4, 32, in_features=16, rngs=nnx.Rngs(0)), tx,
                     TASK, 60, 32)
  return history


def _one_monitor(history):
  """The history without the monitor chained after SGD (a pure observer):
  what the issue's single ``gt.monitor(per_leaf=True)`` recorded."""
  after = {k.split("/")[0] for k in history if "/update_ratio/" in k}
  assert len(after) == 1
  return {k: v for k, v in history.items() if k.split("/")[0] not in after}


def test_training_records_the_depth_profile_of_the_true_gradient(sigmoid_run):
  """Step 0's recorded per-layer norms are those of jax.grad on the same
  batch (train's first key), and the update ratio is lr * ||g|| / ||p||."""
  model = _sigmoid16()
  x, y = TASK.sample(jax.random.split(jax.random.PRNGKey(0), 60)[0], 32)
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.grad(lambda p: TASK.loss(nnx.merge(graphdef, p)(x), y))(params)
  g0 = float(jnp.linalg.norm(grads["layers"][0]["kernel"][...]))
  g_out = float(jnp.linalg.norm(grads["out"]["kernel"][...]))
  p0 = float(jnp.linalg.norm(params["layers"][0]["kernel"][...]))
  leaf = [k for k in sigmoid_run if k.endswith("leaf_norm/layers/0/kernel")]
  first = sigmoid_run[sorted(leaf)[0]][0]
  out = sigmoid_run[sorted(k for k in sigmoid_run
                           if k.endswith("leaf_norm/out/kernel"))[0]][0]
  np.testing.assert_allclose(first, g0, rtol=1e-4)
  np.testing.assert_allclose(out, g_out, rtol=1e-4)
  ratio = [k for k in sigmoid_run if k.endswith("update_ratio/layers/0/kernel")]
  np.testing.assert_allclose(sigmoid_run[ratio[0]][0], 0.05 * g0 / p0, rtol=1e-3)
  layers, norms = depth_profile(sigmoid_run)
  assert layers[0] == "layers/0/kernel" and layers[-1] == "out/kernel"
  assert layers[1:16] == [f"layers/{i}/kernel" for i in range(1, 16)]
  assert norms.shape == (60, 17)


def test_issue_sigmoid_mlp_is_vanishing_and_init_is_not_blamed(sigmoid_run):
  d = gt.diagnose(_one_monitor(sigmoid_run), loss=sigmoid_run["loss"])
  assert d.regime == "vanishing", d.report
  assert d.first_nonfinite_step is None and not d.spike_steps
  assert d.depth_ratio < 1e-6  # sigmoid: at most 0.25 per layer, 16 layers
  assert d.layer_factor < 0.5
  assert _named(d, ("saturating activations",)), d.report
  assert not _named(d, EXPLOSION_CAUSES), d.report
  assert "initialisation" not in d.report and "init scale" not in d.report
  assert "VANISHING" in d.report and "ReLU with He init" in d.report
  assert "suggested clip" not in d.report  # a clip is no remedy here
  assert {"ReLU with He init", "batch or layer normalisation",
          "residual connections"} <= set(d.remedies)


def test_update_ratios_far_below_range_in_the_early_layers(sigmoid_run):
  d = gt.diagnose(sigmoid_run, loss=sigmoid_run["loss"])
  assert d.regime == "vanishing"
  assert d.first_update_ratio < 1e-5 <= d.last_update_ratio * 1e-2
  assert any(e.startswith("update/param ratio") for e in d.evidence)
  # The ratios alone (no depth profile in the leaf norms) still say vanishing.
  only = {k: v for k, v in sigmoid_run.items() if "leaf_norm" not in k}
  d2 = gt.diagnose(only)
  assert d2.depth_ratio is None and d2.regime == "vanishing", d2.report


def test_issue_overtight_clip_names_the_effective_learning_rate(clipped_run):
  d = gt.diagnose(clipped_run, loss=clipped_run["loss"])
  (c,) = d.clips
  norm = clipped_run["monitor/norm"]
  expected = float(np.median(np.minimum(1.0, 1e-3 / norm)))  # by hand
  assert c.verdict == "over-tight" and c.active_fraction == 1.0
  np.testing.assert_allclose(c.median_scale, expected, rtol=1e-3)
  np.testing.assert_allclose(c.threshold, 1e-3, rtol=1e-3)
  assert d.regime == "healthy", d.report
  (cause,) = d.causes
  assert cause.startswith("over-tight clipping")
  assert f"effective learning rate is ~{expected:.2g} of the nominal" in cause
  calm = norm[norm < 10 * np.median(norm)]
  p90 = float(np.percentile(calm, 90))
  assert f"gt.clip_by_global_norm({p90:.3g})" in cause
  assert "gt.zclip()" in cause and "gt.autoclip()" in cause
  assert not _named(d, EXPLOSION_CAUSES + VANISHING_CAUSES)


def test_diverging_run_is_exploding_and_not_vanishing():
  history, _ = train(DeepMLP(4, 32, in_features=16, rngs=nnx.Rngs(0)),
                     optax.sgd(0.3, momentum=0.9), TASK, 40, 32)
  assert not np.all(np.isfinite(history["loss"]))  # it really diverged
  d = gt.diagnose(history, loss=history["loss"])
  assert d.regime == "exploding"
  assert d.first_nonfinite_step == int(np.argmax(~np.isfinite(history["loss"])))
  assert _named(d, ("learning rate", "initialisation scale or learning rate"))
  assert not _named(d, VANISHING_CAUSES + ("over-tight",))
  assert "EXPLODING" in d.report


def test_healthy_run_names_nothing_and_an_unreached_clip_does_nothing():
  tx = optax.chain(gt.clip_by_global_norm(100.0), optax.sgd(0.02, momentum=0.9))
  history, _ = train(DeepMLP(4, 32, in_features=16, rngs=nnx.Rngs(0)), tx,
                     TASK, 60, 32)
  assert history["monitor/norm"].max() < 100  # the threshold is never reached
  d = gt.diagnose(history, loss=history["loss"])
  assert d.regime == "healthy" and d.causes == [], d.report
  (c,) = d.clips
  assert c.verdict == "never reached" and c.active_fraction == 0.0
  assert "never reached" in d.report and "does nothing" in d.report
  norm = history["monitor/norm"]
  calm = norm[norm < 10 * np.median(norm)]  # the first step's fit left out
  p90 = float(np.percentile(calm, 90))
  assert f"a threshold near {p90:.3g}" in d.report


# --- synthetic histories, one per branch --------------------------------------

STEADY = np.exp(0.1 * np.random.default_rng(3).normal(size=80))


def _profile_history(factor, layers=16, readout="out/kernel", first=None):
  """``monitor`` norms with layer ``i`` at ``factor ** (layers - i)`` of the
  read-out (input layer first), times a steady noise per step."""
  h = {"monitor/norm": STEADY.copy()}
  for i in range(layers):
    h[f"monitor/leaf_norm/layers/{i}/kernel"] = STEADY * factor ** (layers - i)
  h[f"monitor/leaf_norm/{readout}"] = STEADY.copy()
  return h


def test_synthetic_vanishing_profile_exact_figures():
  d = gt.diagnose(_profile_history(0.2), loss=np.full(80, 0.5))
  assert d.regime == "vanishing"
  np.testing.assert_allclose(d.depth_ratio, 0.2 ** 16, rtol=1e-9)
  np.testing.assert_allclose(d.layer_factor, 0.2, rtol=1e-9)
  assert d.first_layer == "layers/0/kernel" and d.last_layer == "out/kernel"
  assert d.loss_change == 0.0 and "stalled" in d.report
  assert _named(d, ("saturating activations",)) and _named(d, ("depth",))
  assert not _named(d, EXPLOSION_CAUSES)


def test_shallow_vanishing_is_not_blamed_on_activations():
  d = gt.diagnose(_profile_history(0.05, layers=2))  # 3 layers, 400x
  assert d.regime == "vanishing" and _named(d, ("depth",))
  assert not _named(d, ("saturating",))  # too shallow to tell


def test_mild_profile_is_healthy():
  d = gt.diagnose(_profile_history(0.85))  # 0.85**16 = 0.074: ReLU + He-like
  assert d.regime == "healthy" and d.causes == []


@pytest.mark.parametrize("first_layer_too", [False, True])
def test_big_first_norm_is_init_scale_only_where_the_early_layers_carry_it(
    first_layer_too):
  """The issue's case: a first norm 863x the median in a vanishing net is
  the read-out's first fit, not an explosion; in the early layers it is."""
  h = _profile_history(0.3 if not first_layer_too else 1.0)
  h["monitor/norm"][0] *= 863
  h["monitor/leaf_norm/out/kernel"][0] *= 863
  if first_layer_too:
    h["monitor/leaf_norm/layers/0/kernel"][0] *= 863
  d = gt.diagnose(h)
  if first_layer_too:
    assert d.regime == "exploding" and _named(d, ("initialisation scale",))
  else:
    assert d.regime == "vanishing", d.report
    assert not _named(d, EXPLOSION_CAUSES) and "initialisation" not in d.report


def test_big_first_norm_falling_with_a_big_first_loss_is_the_first_fit():
  h = _profile_history(1.0, layers=2)
  for k in h:
    h[k][0] *= 50
  big_first_loss = np.r_[2.0, np.full(79, 0.17)]
  assert gt.diagnose(h).regime == "exploding"  # norms alone: a spike at 0
  d = gt.diagnose(h, loss=big_first_loss)
  assert d.regime == "healthy" and d.causes == [], d.report
  for k in h:  # the first update makes the norm rise tenfold: an explosion
    h[k][1] = 30 * h[k][0]
  d = gt.diagnose(h, loss=big_first_loss)
  assert d.regime == "exploding" and _named(d, ("initialisation scale",))
  assert "rose x30" in d.causes[0]
  for k in h:  # a mere doubling at step 1 after a big first fit: healthy
    h[k][1] = 2 * h[k][0]
  assert gt.diagnose(h, loss=big_first_loss).regime == "healthy"


def test_isolated_spike_is_a_bad_batch():
  norms = STEADY.copy()
  norms[50] *= 100
  d = gt.diagnose({"monitor/norm": norms})
  assert d.regime == "exploding" and d.spike_steps == [50]
  assert _named(d, ("bad batches",)) and "50" in d.causes[0]
  assert not _named(d, ("learning rate", "initialisation"))


def test_recurrent_stall_is_vanishing_through_time_and_progress_is_not():
  h = {"monitor/norm": STEADY.copy(), "monitor/leaf_norm/w_hh": 0.1 * STEADY,
       "monitor/leaf_norm/w_xh": 0.03 * STEADY,
       "monitor/leaf_norm/out/kernel": STEADY.copy()}
  stalled = 0.167 + 0.001 * np.sin(np.arange(80))
  d = gt.diagnose(h, loss=stalled)
  assert d.regime == "vanishing" and d.last_layer == "out/kernel"
  assert _named(d, ("recurrence",)) and "LSTM/GRU" in d.causes[0]
  assert not _named(d, EXPLOSION_CAUSES + ("saturating",))
  learning = np.linspace(0.2, 0.02, 80)
  assert gt.diagnose(h, loss=learning).regime == "healthy"


def test_uniformly_tiny_steps_are_not_vanishing():
  h = _profile_history(0.9, layers=3)
  for k in list(h):
    if "leaf_norm" in k:
      h[k.replace("leaf_norm", "update_ratio").replace("monitor", "monitor@2")
        ] = np.full(80, 1e-7)
  d = gt.diagnose(h)
  assert d.regime == "healthy"
  assert d.first_update_ratio == d.last_update_ratio == pytest.approx(1e-7)
  assert "steps are tiny in every layer" in d.report


def test_clip_findings_fixed_adaptive_and_per_leaf():
  n = len(STEADY)
  # A fixed clip at 0.1 reached on 80% of the steps (norms ~1; 0.05 on the
  # others).
  norms = np.where(np.arange(n) % 5 == 0, 0.05, STEADY)
  scale = np.minimum(1.0, 0.1 / norms)
  d = gt.diagnose({"monitor/norm": norms, "clip_by_global_norm/norm": norms,
                   "clip_by_global_norm/scale": scale})
  (c,) = d.clips
  assert c.verdict == "over-tight" and c.active_fraction == pytest.approx(0.8)
  expected = float(np.median(scale))
  assert c.median_scale == pytest.approx(expected) and not c.adaptive
  assert c.threshold == pytest.approx(0.1)
  assert f"~{expected:.2g} of the nominal" in d.causes[0]
  # The same clip on norms falling 100x: maybe holding back an explosion,
  # so no threshold from those norms.
  falling = np.geomspace(100.0, 1.0, n) * STEADY
  d = gt.diagnose({"monitor/norm": falling, "clip_by_global_norm/norm": falling,
                   "clip_by_global_norm/scale": np.minimum(1, 0.1 / falling)})
  assert d.clips[0].verdict == "over-tight" and d.regime == "healthy"
  assert "holding back an explosion" in d.causes[0]
  assert "gt.clip_by_global_norm(" not in d.causes[0]
  # An adaptive threshold (autoclip) tight on every step: loosen it.
  thr = 0.2 * STEADY[::-1]
  d = gt.diagnose({"autoclip/norm": STEADY, "autoclip/threshold": thr,
                   "autoclip/clipped": np.ones(n)})
  (c,) = d.clips
  np.testing.assert_allclose(c.median_scale,
                             np.median(np.minimum(1, thr / STEADY)))
  assert c.adaptive and c.verdict == "over-tight"
  assert "loosen it" in d.causes[0] and "90th percentile" not in d.causes[0]
  # Per-leaf scales (clippy): the median over leaves at each step.
  leaf = {f"clippy/scale/l{i}": np.full(n, s) for i, s in
          enumerate((0.01, 0.02, 1.0))}
  d = gt.diagnose({"monitor/norm": STEADY, **leaf})
  (c,) = d.clips
  assert c.verdict == "over-tight" and c.median_scale == pytest.approx(0.02)
  # A clip that never acted, and a threshold far above every norm.
  d = gt.diagnose({"monitor/norm": STEADY, "clip_by_leaf_norm/threshold":
                   np.full(n, 50.0), "clip_by_leaf_norm/clipped": np.zeros(n)})
  (c,) = d.clips
  assert c.verdict == "never reached" and c.threshold == 50.0
  assert d.causes == [] and "does nothing" in d.report


# --- the demo's cells and profile ----------------------------------------------


def test_demo_runs_few_cells_on_the_vanishing_and_clip_scenarios():
  methods = pytest.importorskip("gradtransforms.demo.methods")
  cells = methods.pairs()
  for sc, focus in methods.FOCUS.items():
    assert [m for s, m in cells if s == sc] == list(focus)
  assert [m for s, m in cells if s == "mlp16-init1.6"] == list(methods.METHODS)
  assert set(methods.FOCUS) <= set(methods.SCENARIOS)
  assert methods.pairs(["mlp16-sigmoid"], ["none", "zclip"]) == [
      ("mlp16-sigmoid", "none"), ("mlp16-sigmoid", "zclip")]
  with pytest.raises(ValueError, match="nope"):
    methods.pairs(["nope"])
  sc = methods.SCENARIOS["mlp4-lr0.02-clip0.05"]
  assert sc.clip == 0.05 and methods.SCENARIOS["mlp4-lr0.02"].clip is None


def test_demo_profile_medians_and_plot(tmp_path):
  app = pytest.importorskip("gradtransforms.demo.app")
  h = _profile_history(0.5, layers=3)
  h["loss"] = np.full(80, 0.5)
  h["monitor/leaf_norm/layers/0/kernel"][-8:] = 0.0  # goes dead at the end
  layers, early, late = app.profile(h)
  assert layers == ["layers/0/kernel", "layers/1/kernel", "layers/2/kernel",
                    "out/kernel"]
  np.testing.assert_allclose(early, np.median(STEADY[:8]) * 0.5 ** np.arange(
      3, -1, -1))
  assert late[0] == 0.0
  np.testing.assert_allclose(late[1:], np.median(STEADY[-8:]) * 0.5 ** np.arange(
      2, -1, -1))
  bad = {k: v.copy() for k, v in h.items()}
  bad["monitor/leaf_norm/out/kernel"][5:] = np.nan  # diverged after 5 steps
  assert app.profile(bad) is None
  app.plot({("a", "none"): h, ("b", "none"): bad}, tmp_path / "c.png")
  assert (tmp_path / "c.png").stat().st_size > 10_000


def test_stability_table_marks_cells_not_run():
  stability = pytest.importorskip("gradtransforms.bench.stability")
  row = dict(diverged=0, runs=1, final_loss=0.5, spikes=0.0, skipped=0.0)
  md = stability.to_markdown([dict(row, scenario="a", method="none"),
                              dict(row, scenario="a", method="zclip"),
                              dict(row, scenario="b", method="none")], "h")
  assert "| b | 0/1, 0.5 (0 spk) | - |" in md


def test_a_clip_whose_peak_is_not_recorded_is_not_judged():
  """clip_by_value records its pre-clip peak only with record_peak=True;
  without it (NaN) its ``clipped`` is False at every step, which must not
  read as "never reached". Recorded, the same history is judged."""
  n = len(STEADY)
  base = {"monitor/norm": STEADY, "clip_by_value/threshold": np.full(n, 1e-3),
          "clip_by_value/clipped": np.zeros(n, bool)}
  d = gt.diagnose({**base, "clip_by_value/max_abs": np.full(n, np.nan)})
  assert d.clips == [] and "never reached" not in d.report
  d = gt.diagnose({**base, "clip_by_value/max_abs": np.full(n, 5e-4)})
  (c,) = d.clips
  assert c.verdict == "never reached"
  # in gt.metrics of a real state: NaN by default, the peak when recorded
  t = {"a": jnp.asarray([0.5, -2.0])}
  for flag, peak in ((False, np.nan), (True, 2.0)):
    tx = gt.clip_by_value(1.0, record_peak=flag)
    m = gt.metrics(tx.update(t, tx.init(t))[1])
    np.testing.assert_array_equal(m["clip_by_value/max_abs"], peak)


def test_a_spike_is_credited_to_clip_by_value_only_where_its_peak_is_recorded():
  n = len(STEADY)
  norm = STEADY.copy()
  norm[40] *= 100.0
  hit = np.zeros(n, bool)
  hit[40] = True
  base = {"monitor/norm": norm, "clip_by_value/threshold": np.full(n, 1.0),
          "clip_by_value/clipped": hit}
  d = gt.diagnose({**base, "clip_by_value/max_abs": np.where(hit, 50.0, 0.5)})
  assert "clipped by clip_by_value" in d.report and "records no peak" not in d.report
  d = gt.diagnose({**base, "clip_by_value/clipped": np.zeros(n, bool),
                   "clip_by_value/max_abs": np.full(n, np.nan)})
  assert "clipped by" not in d.report
  assert "clip_by_value records no peak" in d.report, d.report
