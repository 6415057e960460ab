"""gt.rewind: triggers, the no-loop rule, exactness, cost, checkpoints, sharding."""

import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_tree

import gradtransforms as gt

PARAMS = {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) / 7,
          "b": jnp.ones(3, jnp.float32)}


def ones_like(p, v=1.0):
  return jax.tree.map(lambda x: jnp.full_like(x, v), p)


def run(tx, grads, losses, params=PARAMS):
  """Runs a jitted step per (grad fill value, loss); returns the params and
  the metrics after every step, and the final state."""
  state = tx.init(params)

  @jax.jit
  def step(p, s, g, loss):
    u, s = tx.update(g, s, p, value=loss)
    return optax.apply_updates(p, u), s

  ps, ms = [], []
  for g, loss in zip(grads, losses):
    params, state = step(params, state, ones_like(params, g), jnp.float32(loss))
    ps.append(params)
    ms.append({k: float(v) for k, v in gt.metrics(state).items()})
  return ps, ms, state


def bits_equal(a, b):
  return all(np.asarray(x).dtype == np.asarray(y).dtype and
             np.asarray(x).tobytes() == np.asarray(y).tobytes()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_guard_halt_rewinds_to_snapshot_bit_exactly():
  tx = gt.rewind(gt.guard(optax.sgd(0.1), max_consecutive_errors=3), every=4)
  g = [1.0] * 10 + [np.nan] * 3 + [1.0] * 3
  ps, ms, _ = run(tx, g, [1.0] * len(g))
  # window 0..3 clean -> snapshot after step 3 (k = 4), again after 7 (k = 8)
  assert ms[3]["rewind/snapshot_step"] == 4 and ms[7]["rewind/snapshot_step"] == 8
  # steps 10, 11, 12 NaN: the guard halts at step 12, rewind goes back to k=8
  assert [m["rewind/rewound"] for m in ms[10:14]] == [0, 0, 1, 0]
  assert ms[12]["rewind/rewound_to"] == 8 and ms[12]["rewind/lost"] == 12 - 8 + 1
  assert ms[12]["guard/halt"] == 0  # the guard's state came back from the snapshot
  # params as step 8 received them: b moved by -0.4 from 0.2 (exact:
  # Sterbenz), w[1, 2] from -0.086 to -0.486 (not exact: one rounding)
  assert bits_equal(ps[12]["b"], ps[7]["b"])
  np.testing.assert_allclose(ps[12]["w"], ps[7]["w"], rtol=0, atol=3e-8)


def test_nonfinite_loss_without_guard_never_lands():
  tx = gt.rewind(optax.sgd(0.1), every=2)
  g = [1.0] * 5 + [np.nan] + [1.0]
  loss = [1.0] * 5 + [np.nan] + [1.0]
  ps, ms, _ = run(tx, g, loss)
  assert ms[5]["rewind/rewound"] == 1 and ms[5]["rewind/rewound_to"] == 4
  assert bits_equal(ps[5], ps[3]) and all(np.isfinite(x).all() for x in jax.tree.leaves(ps))


def test_nonfinite_params_caught_at_the_window_end_and_never_copied():
  tx = gt.rewind(optax.sgd(1.0), every=3)
  state = tx.init(PARAMS)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  p = PARAMS
  for t in range(5):
    if t == 3:
      p0 = p
    u, state = step(p, state, ones_like(p, 0.5))
    p = optax.apply_updates(p, u)
    if t == 3:  # corrupt the params behind the optimizer's back
      p = {**p, "b": p["b"].at[0].set(jnp.inf)}
  m = gt.metrics(state)
  # step 5 (t=4) is not a window end; t=5 is: rewind there
  u, state = step(p, state, ones_like(p, 0.5))
  p = optax.apply_updates(p, u)
  m2 = gt.metrics(state)
  assert m2["rewind/rewound"] == 1 and m["rewind/rewinds"] == 0
  assert m2["rewind/halt"] == 1  # an update cannot repair an Inf param
  assert np.isfinite(p["w"]).all() and np.isfinite(p["b"][1:]).all()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.snapshot))
  assert bits_equal(state.snapshot, p0)


def test_loss_trigger_patience_margin_and_level():
  tx = gt.rewind(optax.sgd(0.01), every=4, patience=3, margin=0.5)
  loss = [2.0, 1.0, 1.0, 2.0] + [1.0] * 4 + [1.6, 1.6, 1.4, 1.6, 1.6, 1.6, 1.0]
  _, ms, _ = run(tx, [1.0] * len(loss), loss)
  # the first window's mean is the level; the second window (8 steps in) too
  assert ms[3]["rewind/level"] == pytest.approx(1.5)
  assert ms[7]["rewind/level"] == pytest.approx(1.0)
  # 1.6 > 1.0 + 0.5 at steps 8, 9 (1.4 breaks the run), 11, 12, 13 -> rewind at 13
  assert [m["rewind/above"] for m in ms[8:13]] == [1, 2, 0, 1, 2]
  assert ms[13]["rewind/rewound"] == 1 and ms[12]["rewind/rewound"] == 0
  assert ms[13]["rewind/rewound_to"] == 8


def test_no_loop_then_sticky_halt_freezes_at_the_snapshot():
  tx = gt.rewind(optax.sgd(0.1), every=2, max_rewinds=2)
  g = [1.0] * 4 + [np.nan, 1.0, np.nan, np.nan, 1.0, 1.0]
  ps, ms, _ = run(tx, g, [1.0 if np.isfinite(x) else np.nan for x in g])
  assert [m["rewind/rewound"] for m in ms] == [0, 0, 0, 0, 1, 0, 1, 1, 0, 0]
  assert [m["rewind/tries"] for m in ms[4:8]] == [1, 1, 2, 3]
  assert [m["rewind/halt"] for m in ms[6:]] == [0, 1, 1, 1]
  for p in ps[7:]:  # the third rewind to one snapshot halts: frozen there
    assert bits_equal(p, ps[3])


def test_refresh_needs_a_clean_window():
  tx = gt.rewind(gt.guard(optax.sgd(0.1), max_consecutive_errors=5), every=3)
  g = [1.0, np.nan, 1.0, 1.0, 1.0, 1.0]
  _, ms, _ = run(tx, g, [1.0] * 6)
  assert ms[2]["rewind/snapshot_step"] == 0  # the guard skipped step 1
  assert ms[5]["rewind/snapshot_step"] == 6


def test_apply_updates_rounding_claim():
  """``p + fl(s - p)``: bit-exact where ``s - p`` is exact (Sterbenz), else
  within one rounding of the difference."""
  rng = np.random.default_rng(0)
  for dtype in (np.float32, np.float16, jnp.bfloat16):
    s = rng.normal(size=20000).astype(np.float32)
    p = np.concatenate([s[:10000] * rng.uniform(0.5, 2.0, 10000),
                        rng.normal(size=10000) * 1e3]).astype(np.float32)
    s, p = jnp.asarray(s, dtype), jnp.asarray(p, dtype)
    u = (s - p).astype(dtype)
    got = optax.apply_updates(p, u)
    f64 = lambda x: np.asarray(x, np.float64)
    exact = f64(s) - f64(p) == f64(u)
    assert np.array_equal(f64(got)[exact], f64(s)[exact])
    assert exact[:10000].all()  # Sterbenz: s/2 <= p <= 2s
    ulp = np.asarray(jnp.finfo(dtype).eps, np.float64) * np.maximum(
        2.0 ** np.floor(np.log2(np.abs(f64(s) - f64(p)) + 1e-300)), 0)
    assert (np.abs(f64(got) - f64(s)) <= ulp + 1e-30).all()


def test_rewind_exact_after_real_adam_training():
  tx = gt.rewind(gt.guard(optax.adam(1e-2), max_consecutive_errors=2), every=50)
  params = random_tree(0)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p, value=jnp.float32(1.0)))
  snap = None
  for t in range(60):
    g = random_tree(t + 1) if t < 58 else jax.tree.map(lambda x: x * jnp.nan,
                                                      params)
    u, state = step(params, state, g)
    params = optax.apply_updates(params, u)
    if t == 49:
      snap = params
  assert int(gt.metrics(state)["rewind/rewound"]) == 1
  assert bits_equal(params, snap)


def _entry(hlo):
  return hlo[hlo.index("\nENTRY"):]


def test_plain_steps_copy_nothing_parameter_sized_cpu():
  """Compiled step on XLA:CPU: nothing parameter-sized is copied (neither
  the snapshot, nor the inner state read before it is updated in place,
  nor the donated params), and the rare work is one loop. (The inner is
  plain Adam: a guard adds its own CPU conditionals.)"""
  p = {f"w{i}": jnp.ones((64, 48 + i)) for i in range(3)}
  tx = gt.rewind(optax.adam(1e-3), every=10)
  s = tx.init(p)

  def step(p, s, g):
    u, s = tx.update(g, s, p, value=jnp.float32(1.0))
    return optax.apply_updates(p, u), s
  entry = _entry(jax.jit(step, donate_argnums=(0, 1)).lower(p, s, p)
                 .compile().as_text())
  assert not re.findall(r"= f32\[64,\d+\]\S* copy\(", entry)
  assert " conditional(" not in entry and entry.count(" while(") == 1


@pytest.mark.parametrize("layers", [0, 2])
@pytest.mark.parametrize("platform", ["h100", "tpu-v5e"])
def test_plain_step_costs_the_guards_plus_one_snapshot_read(platform, layers):
  """Deviceless compile, ``rewind(guard(adam), every=100)`` against
  ``guard(adam)``, 4 leaves of 255 x 254 (or 2 of 2 layers: XLA:TPU
  once copied 3-D loop carries to another layout and back every step): at
  most one kernel more (the loop) and one per dtype of the packed scalars
  (the TPU unpacks each in a kernel), and one read of the params more (the
  update's select on the snapshot). The snapshot's inner arrays are read
  by no kernel outside the loop, each params' snapshot by one (the
  update's)."""
  from gradtransforms.bench import budgets, compiled
  if compiled.unavailable(platform):
    pytest.skip(compiled.unavailable(platform))
  n, per = (2, 91 * 90) if layers else (4, 255 * 254)
  w = budgets.Workload(n, n * max(layers, 1) * per, layers=layers)
  guard = budgets.tx_step(gt.guard(budgets.adam()), w).compile(platform)
  got = budgets.tx_step(gt.rewind(gt.guard(budgets.adam()), every=100), w
                      ).compile(platform, keep_hlo=True)
  assert got.by_op.get("while") == 1
  # + the loop, + one per dtype of the packed scalars (the TPU unpacks each
  # in a kernel); on GPU the same (measured 4; 12 before the old scalars
  # were packed by width, _read_once.read_once, and the sums finished by shape
  # group, _sums: the guard's scalars passed through rewind's loop and
  # selects had cost kernels of their own)
  extra = 1 + 3
  assert got.kernels <= guard.kernels + extra, (got.by_op, guard.by_op)
  assert got.bytes <= 1.01 * (guard.bytes + budgets.grad_bytes(w))
  comps, entry = compiled._computations(got.hlo)
  users: dict = {}
  parts: dict = {}  # a tuple's (or a loop's: its carry's) elements
  origin: dict = {}  # a value passed through tuples and loops: its source
  for line in comps[entry]:
    name, _, op, operands = compiled._parse(line)
    if op == "tuple":
      parts[name] = [origin.get(o, o) for o in operands]
    elif op == "while":
      parts[name] = parts[operands[0]]
    elif op == "get-tuple-element" and operands[0] in parts:
      i = int(re.search(r"index=(\d+)", line).group(1))
      origin[name] = parts[operands[0]][i]
    elif op != "bitcast":
      for o in operands:
        users[origin.get(o, o)] = users.get(origin.get(o, o), 0) + 1
  snap = [n for n in users if n.startswith("state_snapshot__")]
  big = [ln.split(" = ")[0].strip().lstrip("%") for ln in comps[entry]
         if re.search(r"%state_snapshot_inner_\d+_\S* = f32\[[\d,]{7,}\]", ln)]
  assert len(snap) == n and all(users[k] == 1 for k in snap), users
  assert len(big) == 2 * n and not any(users.get(k) for k in big), big


def test_snapshot_is_written_by_the_next_update():
  """A clean window's end (step 1, every=2) moves ``snapshot_step`` to 2 at
  once; the buffers are written at step 2, from the params it receives."""
  tx = gt.rewind(gt.guard(optax.sgd(0.1)), every=2)
  state = tx.init(PARAMS)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p, value=jnp.float32(1.0)))
  p, seen = PARAMS, []
  for _ in range(3):
    u, state = step(p, state, ones_like(p))
    p = optax.apply_updates(p, u)
    seen.append((p, state))
  (p1, s1), (_, s2) = seen[0], seen[1]
  assert (int(s1.snapshot_step), int(s1.written)) == (0, 0)
  assert (int(s2.snapshot_step), int(s2.written)) == (2, 0)
  assert bits_equal(s2.snapshot, PARAMS)
  p2, s3 = seen[1][0], seen[2][1]
  assert (int(s3.snapshot_step), int(s3.written)) == (2, 2)
  assert bits_equal(s3.snapshot, p2) and not bits_equal(p1, p2)


def _steps(step, p, state, n):
  """``n`` jitted steps ``step(p, s, g)`` on gradients of ones."""
  for _ in range(n):
    u, state = step(p, state, ones_like(p))
    p = optax.apply_updates(p, u)
  return p, state


def test_non_finite_params_are_never_written_into_the_snapshot():
  """Params that turn Inf between a window's end and the next update: the
  write is refused, the step rewinds to the previous snapshot and halts."""
  tx = gt.rewind(optax.sgd(0.1), every=2)
  state = tx.init(PARAMS)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p, value=jnp.float32(1.0)))
  p, state = _steps(step, PARAMS, state, 2)  # a clean window: not written yet
  p = {**p, "w": p["w"].at[0, 0].set(jnp.inf)}
  u, state = step(p, state, ones_like(p))
  m = {k: float(v) for k, v in gt.metrics(state).items()}
  assert m["rewind/rewound"] == 1 and m["rewind/halt"] == 1
  assert m["rewind/rewound_to"] == 0 and m["rewind/snapshot_step"] == 0
  assert int(state.written) == 0 and bits_equal(state.snapshot, PARAMS)


def test_inner_arrays_come_back_at_the_next_update():
  """After a rewind (step 3, to the snapshot of step 2) the inner state's
  scalars are the snapshot's at once and its arrays are replaced by the
  next update before the inner optimizer runs: step 4 is Adam's update
  from the state Adam had when step 2 began (an independent replay)."""
  adam = optax.adam(0.1)
  tx = gt.rewind(adam, every=2)
  g = [1.0, 0.5, 2.0, 3.0, 0.25]
  loss = [1.0, 1.0, 1.0, np.nan, 1.0]
  state = tx.init(PARAMS)
  step = jax.jit(lambda p, s, g, l: tx.update(g, s, p, value=l))
  p, us = PARAMS, []
  for gi, li in zip(g, loss):
    u, state = step(p, state, ones_like(p, gi), jnp.float32(li))
    us.append(u)
    p = optax.apply_updates(p, u)
    if gi == 3.0:  # the rewind step: count back at once, mu not yet
      assert int(state.inner_state[0].count) == 2
      assert not bits_equal(state.inner_state[0].mu["b"],
                            state.snapshot_inner[0])
      p3 = p
  ref, s = PARAMS, adam.init(PARAMS)
  for gi in g[:2]:
    u, s = adam.update(ones_like(ref, gi), s, ref)
    ref = optax.apply_updates(ref, u)
  want_u, want_s = adam.update(ones_like(ref, g[4]), s, p3)
  assert bits_equal(us[4], want_u) and bits_equal(state.inner_state, want_s)


def test_offload_argument_is_a_bool_and_a_no_op_on_cpu():
  for bad in (1, "yes", None):
    with pytest.raises(TypeError, match="offload"):
      gt.rewind(optax.sgd(0.1), offload=bad)
  tx = gt.rewind(gt.guard(optax.sgd(0.1), max_consecutive_errors=3), every=4,
                 offload=True)
  assert all(x.sharding.memory_kind == "device" for x in
             jax.tree.leaves((tx.init(PARAMS).snapshot,
                              tx.init(PARAMS).snapshot_inner)))


def test_offloaded_snapshot_runs_as_the_device_one(monkeypatch):
  """The host-memory path (its loops moving the snapshot to and from
  ``pinned_host``), run on XLA:CPU by letting init place the snapshot
  there as it does on GPU/TPU: the numbers without offload, through a
  write, a rewind and the next step's restore of Adam's moments (to one
  rounding: with offload the update is materialised, not fused into
  ``apply_updates``, and XLA:CPU rounds ``p + u`` differently), and the
  rewind lands on the snapshot (step 5 back to the params of step 3)."""
  from gradtransforms import _snapshot
  g = [1.0, 0.5, 2.0, 1.0, 3.0, 1.0, 0.25, 1.0]
  loss = [1.0] * 5 + [np.nan] + [1.0] * 2
  make = lambda off: gt.rewind(optax.adam(0.1), every=2, offload=off)
  want, _, _ = run(make(False), g, loss)
  monkeypatch.setattr(_snapshot, "_platform", lambda leaves: "gpu")
  monkeypatch.setattr(_snapshot, "OFFLOAD_MIN", 2)
  got, ms, state = run(make(True), g, loss)
  assert ms[5]["rewind/rewound"] == 1 and ms[5]["rewind/rewound_to"] == 4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-7)
  for a, b in zip(jax.tree.leaves(got[5]), jax.tree.leaves(got[3])):
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-8)
  kinds = {x.sharding.memory_kind for x in
           jax.tree.leaves((state.snapshot, state.snapshot_inner[:4]))}
  assert kinds == {"pinned_host"}


def _host_spec(x):
  """A ShapeDtypeStruct in host memory for a deviceless compile: the
  topology's devices list no memories, so a SingleDeviceSharding drops
  ``memory_kind``; an abstract mesh's NamedSharding keeps it."""
  from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec
  mesh = AbstractMesh((1,), ("x",))
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      mesh, PartitionSpec(), memory_kind="pinned_host"))


@pytest.mark.parametrize("platform", ["h100", "tpu-v5e"])
def test_offloaded_snapshot_stays_in_host_memory_on_plain_steps(platform):
  """Deviceless compile: the snapshot's large arrays are parameters and
  results in host memory (``S(5)`` in the entry layout), and outside the
  loop bodies nothing reads, writes or moves them (only the loop carries
  them); the loop bodies do move them (the rare steps)."""
  from gradtransforms import _snapshot
  from gradtransforms.bench import budgets, compiled
  if compiled.unavailable(platform):
    pytest.skip(compiled.unavailable(platform))
  dev = jax.sharding.SingleDeviceSharding(compiled.device(platform))
  params = budgets.Workload(2, 2 * 255 * 254).tree()
  tx = gt.rewind(optax.adam(1e-3), every=10, offload=True)
  shapes = jax.eval_shape(tx.init, params)  # traced on the CPU: no offload
  arrays = sum(x.size >= _snapshot.BIG  # snapshot_inner: these come first
               for x in jax.tree.leaves(shapes.inner_state))
  big = lambda x: x.size >= _snapshot.OFFLOAD_MIN  # as init places them
  on = lambda x, host: _host_spec(x) if host else jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=dev)
  state = jax.tree.map(lambda x: on(x, False), shapes)._replace(
      snapshot=jax.tree.map(lambda x: on(x, big(x)), params),
      snapshot_inner=tuple(on(x, i < arrays and big(x))
                           for i, x in enumerate(shapes.snapshot_inner)))
  ps = jax.tree.map(lambda x: on(x, False), params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(ps, state, ps).compile(
      ).as_text()
  layout = hlo[hlo.index("entry_computation_layout"):].split("\n")[0]
  assert layout.count("S(5)") == 2 * (2 + arrays)  # in and out
  comps, entry = compiled._computations(hlo)
  host, moved = set(), []
  for line in comps[entry]:
    name, t, op, operands = compiled._parse(line)
    touches = "S(5)" in t or any(o in host for o in operands)
    if "S(5)" in t:
      host.add(name)
    if touches and op not in {"parameter", "tuple", "get-tuple-element",
                              "while", "bitcast"}:
      moved.append(line.strip()[:120])
  assert not moved, moved
  assert re.search(r"S\(5\)\}?, [^\n]*copy-start\(", hlo)  # in a loop body


def test_checkpoint_round_trips():
  from flax import serialization
  tx = gt.rewind(gt.guard(optax.adam(1e-2)), every=2)
  _, _, state = run(tx, [1.0] * 3, [1.0] * 3)
  back = pickle.loads(pickle.dumps(jax.device_get(state)))
  assert bits_equal(jax.tree.leaves(back), jax.tree.leaves(state))
  back = serialization.from_bytes(tx.init(PARAMS), serialization.to_bytes(state))
  assert bits_equal(jax.tree.leaves(back), jax.tree.leaves(state))
  tx2 = gt.rewind(optax.adam(1e-2), every=2)
  _, _, s2 = run(tx2, [1.0] * 3, [1.0] * 3)
  back = serialization.from_bytes(tx2.init(PARAMS), serialization.to_bytes(s2))
  assert bits_equal(jax.tree.leaves(back), jax.tree.leaves(s2))
  back = pickle.loads(pickle.dumps(jax.device_get(state)))
  assert bits_equal(jax.tree.leaves(back), jax.tree.leaves(state))
  ocp = pytest.importorskip("orbax.checkpoint")
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(d + "/s", state)
    ckpt.wait_until_finished()
    back = ckpt.restore(d + "/s", tx.init(PARAMS))
  assert bits_equal(jax.tree.leaves(back), jax.tree.leaves(state))
  assert type(back) is type(state)


def test_nnx_optimizer_and_inject_hyperparams():
  from flax import nnx
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, gt.rewind(gt.guard(optax.adam(1e-2)), every=2,
                                       patience=2), wrt=nnx.Param)
  x = jnp.ones((4, 3))

  @nnx.jit
  def train(model, opt, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads, value=loss)
    return loss
  for _ in range(3):
    train(model, opt, x)
  m = gt.metrics(opt)
  assert m["rewind/step"] == 3 and m["rewind/snapshot_step"] == 2
  inj = optax.inject_hyperparams(
      lambda learning_rate: gt.rewind(optax.sgd(learning_rate), every=2))(
          learning_rate=0.1)
  _, ms, _ = run(inj, [1.0, 1.0, np.nan], [1.0, 1.0, np.nan])
  assert ms[2]["rewind/rewound"] == 1


def test_sharded_devices_rewind_together():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("d",))
  params = {"w": jnp.arange(16.0).reshape(8, 2)}
  tx = gt.rewind(optax.sgd(0.1), every=2, axis_name="d")
  state = tx.init(params)

  def step(p, s, g, loss):
    u, s = tx.update(g, s, p, value=loss[0])
    return optax.apply_updates(p, u), s
  sspec = jax.tree.map(lambda x: P("d") if x.shape == (8, 2) else P(), state)
  f = jax.jit(jax.shard_map(step, mesh=mesh,
                            in_specs=(P("d"), sspec, P("d"), P("d")),
                            out_specs=(P("d"), sspec)))
  spec = NamedSharding(mesh, P("d"))
  state = jax.device_put(state, jax.tree.map(lambda q: NamedSharding(mesh, q),
                                             sspec))
  p = jax.device_put(params, spec)
  losses = [jnp.ones(8)] * 3 + [jnp.ones(8).at[5].set(jnp.nan)]
  shots = []
  for loss in losses:  # device 5 alone sees a NaN loss at step 3
    p, state = f(p, state, jax.device_put(ones_like(params), spec),
                 jax.device_put(loss, spec))
    shots.append(p)
  assert bool(state.rewound)
  np.testing.assert_array_equal(shots[-1]["w"], shots[1]["w"])


def test_bad_arguments_and_missing_inputs():
  with pytest.raises(TypeError, match="inner"):
    gt.rewind(optax.adam)
  with pytest.raises(ValueError, match="every"):
    gt.rewind(optax.sgd(0.1), every=0)
  with pytest.raises(ValueError, match="patience"):
    gt.rewind(optax.sgd(0.1), patience=0)
  with pytest.raises(ValueError, match="margin"):
    gt.rewind(optax.sgd(0.1), margin=-1.0)
  with pytest.raises(ValueError, match="max_rewinds"):
    gt.rewind(optax.sgd(0.1), max_rewinds=0)
  with pytest.raises(TypeError, match="every"):
    gt.rewind(optax.sgd(0.1), every=2.5)
  tx = gt.rewind(optax.sgd(0.1), patience=2)
  s = tx.init(PARAMS)
  with pytest.raises(ValueError, match="params"):
    tx.update(PARAMS, s)
  with pytest.raises(ValueError, match="value=loss"):
    tx.update(PARAMS, s, PARAMS)


def test_empty_tree_and_bf16_params():
  tx = gt.rewind(optax.sgd(0.1), every=1)
  s = tx.init({})
  u, s = jax.jit(lambda s: tx.update({}, s, {}, value=jnp.float32(jnp.nan)))(s)
  assert u == {} and bool(s.rewound)
  p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  ps, ms, _ = run(tx, [1.0, 1.0, np.nan], [1.0, 1.0, np.nan], params=p)
  assert ms[2]["rewind/rewound"] == 1 and bits_equal(
      jax.tree.map(lambda x: x.astype(jnp.float32), ps[2]),
      jax.tree.map(lambda x: x.astype(jnp.float32), ps[1]))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ps[2]))


@pytest.mark.parametrize("leaf,bad", [("a", jnp.nan), ("w", jnp.inf),
                                      ("b", -jnp.inf)])
def test_non_finite_inner_state_is_never_written_into_the_snapshot(leaf, bad):
  """The pending write also checks the inner state's arrays (``a`` and
  ``w`` share a shape, ``b`` has its own): one bad entry in any of them
  and the snapshot keeps its previous contents; without it, it is written."""
  params = {"a": jnp.full((2, 3), 0.5), "w": PARAMS["w"], "b": PARAMS["b"]}
  tx = gt.rewind(optax.trace(0.9), every=2)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p, value=jnp.float32(1.0)))
  p, state = _steps(step, params, state, 2)  # a clean window: not written yet
  first = state.snapshot_inner
  trace = dict(state.inner_state.trace)
  trace[leaf] = trace[leaf].at[(0,) * trace[leaf].ndim].set(bad)
  state = state._replace(inner_state=state.inner_state._replace(trace=trace))
  _, state = step(p, state, ones_like(p))
  assert int(state.written) == 0
  assert bits_equal(state.snapshot, params) and bits_equal(state.snapshot_inner,
                                                           first)
  _, clean = _steps(step, params, tx.init(params), 3)  # no bad entry: written
  assert int(clean.written) == 2
