"""The LM benchmark's pieces that need no training run: the rate-inside
rewind method, fault records, tables and the results JSON round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
import gradtransforms as gt  # noqa: E402
from gradtransforms.bench.lm_stability import report  # noqa: E402
from gradtransforms.bench.lm_stability.experiment import fault_record  # noqa: E402
from gradtransforms.bench.lm_stability.methods import methods, scale_by_rate  # noqa: E402


def test_rate_goes_inside_the_rewind_and_its_snapshot_is_the_applied_params():
  tx = gt.rewind(gt.guard(optax.chain(optax.sgd(1.0), scale_by_rate()),
                          max_consecutive_errors=1), every=2)
  p = {"w": jnp.ones(3)}
  s = tx.init(p)
  step = jax.jit(lambda p, s, g, r: tx.update(g, s, p, value=jnp.float32(1.0), rate=r))
  seen = []
  for t, g in enumerate([1.0, 1.0, 1.0, np.nan]):
    u, s = step(p, s, {"w": jnp.full(3, g)}, jnp.float32(0.5))
    p = optax.apply_updates(p, u)
    seen.append(p)
  np.testing.assert_array_equal(seen[1]["w"], 0.0)  # 1 - 2 * 0.5
  np.testing.assert_array_equal(s.snapshot["w"], seen[1]["w"])
  assert bool(s.rewound) and np.array_equal(seen[3]["w"], seen[1]["w"])


def test_methods_report_their_costs_and_the_fault_table():
  ms = methods(8)
  assert {"gt.rewind+guard", "gt.rewind+guard-r8", "gt.guard", "gt.guard-layer",
          "gt.guard-sigma", "olmo"} <= set(ms)
  steps = 12
  z = np.zeros(steps)
  f = {"loss": np.linspace(3, 2, steps), "acted": z.astype(bool),
       "layer_norms": np.ones((steps, 2)), "skipped": z.astype(bool),
       "lost": np.r_[z[:-1], 7.0], "rewinds": np.r_[z[:-1], 2.0],
       "halt": np.r_[z[:-1], 1.0].astype(bool)}
  clean = dict(f, lost=z, rewinds=z, final=2.0)
  carry = ({"w": jnp.ones(2)}, {"s": jnp.zeros(2)})
  rec = fault_record("gt.rewind+guard", "burst30", f, carry, 2.5, clean, 4, 1, steps)
  assert rec["steps_lost"] == 7 and rec["steps_undone"] == 7 and rec["halted"]
  assert rec["delta_bpb"] == pytest.approx(0.5) and rec["rewinds"] == 2
  table = report.fault_table([rec])
  assert "7 (7 undone, 2 rewinds, halted)" in table and "+0.500" in table


def test_results_json_keeps_the_curves_for_replot():
  res = {"env": {}, "sweep": [], "faults": [], "timing": {},
         "_curves": {("none", 0.01, 0): np.arange(3.0)},
         "_layer_curves": {"none": {"fault": np.ones((3, 2)), "clean": np.zeros((3, 2))}}}
  back = report.from_json(report.to_json(res, [], 1.0))
  np.testing.assert_array_equal(back["_curves"][("none", 0.01, 0)], np.arange(3.0))
  np.testing.assert_array_equal(back["_layer_curves"]["none"]["fault"], np.ones((3, 2)))
