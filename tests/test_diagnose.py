

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
