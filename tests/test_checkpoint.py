"""Every state checkpoints: orbax, flax msgpack and pickle, bit for bit, and
a restored run continues bit-identically (every catalogue entry, so new
entries are covered automatically)."""

import dataclasses
import pickle

import flax.serialization as fser
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import gradtransforms as gt
from gradtransforms.catalogue import CATALOGUE, Entry

# Extra cases the catalogue's test configurations do not reach: monitor
# without per-leaf figures (empty vectors), and with update ratios.
EXTRA = {
    "monitor_plain": dataclasses.replace(
        CATALOGUE["monitor"], name="monitor_plain",
        test=lambda **kw: gt.monitor(**kw)),
    "monitor_ratio": dataclasses.replace(
        CATALOGUE["monitor"], name="monitor_ratio", placement="after",
        test=lambda **kw: gt.monitor(update_ratio=True, **kw)),
}
CASES: dict[str, Entry] = {**CATALOGUE, **EXTRA}
BEFORE, AFTER = 3, 3  # steps before the checkpoint, steps after
SPIKE = 4  # a gradient spike after the restore: detectors must react alike


def _params(empty: bool):
  if empty:
    return {}
  # a bfloat16 leaf: Adam's moments (and the param) are bfloat16 state
  return {"w": jnp.asarray(np.linspace(-1, 1, 12).reshape(3, 4), jnp.float32),
          "b": jnp.asarray([0.5, -0.25, 0.0, 1.0], jnp.bfloat16)}


def _grads(entry: Entry, params, t: int):
  rng = np.random.default_rng(t)
  scale = 50.0 if t == SPIKE else 1.0

  def one(x):
    shape = ((2,) if entry.batch_axis else ()) + x.shape
    return jnp.asarray(rng.normal(size=shape) * scale, x.dtype)
  return jax.tree.map(one, params)


class Run:
  """One case: its optimizer, jitted step, and the uninterrupted run."""

  def __init__(self, entry: Entry, empty: bool):
    self.entry = entry
    self.tx = entry.build(optax.adam(1e-2))
    self.params0 = _params(empty)
    self.grads = [_grads(entry, self.params0, t) for t in range(BEFORE + AFTER)]

    def step(params, state, g):
      u, state = self.tx.update(g, state, params, value=jnp.sum(
          jnp.asarray([jnp.sum(x.astype(jnp.float32)) for x in
                       jax.tree.leaves(g)] + [1.0])))
      return optax.apply_updates(params, u), state

    self.step = jax.jit(step)
    params, state = self.params0, self.tx.init(self.params0)
    for t in range(BEFORE):
      params, state = self.step(params, state, self.grads[t])
    self.saved = {"params": params, "state": state}
    self.final = self.continue_from(params, state)

  def continue_from(self, params, state):
    for t in range(BEFORE, BEFORE + AFTER):
      params, state = self.step(params, state, self.grads[t])
    return {"params": params, "state": state}

  def template(self):
    return {"params": self.params0, "state": self.tx.init(self.params0)}


_RUNS: dict = {}


def run_of(name: str, empty: bool = False) -> Run:
  if (name, empty) not in _RUNS:
    _RUNS[name, empty] = Run(CASES[name], empty)
  return _RUNS[name, empty]


def assert_bitwise(a, b):
  """Same tree structure (PerLeaf names included), dtypes, shapes, bytes."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.dtype, x.shape) == (y.dtype, y.shape)
    assert x.tobytes() == y.tobytes()


def _orbax(tmp_path, tree, template):
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ck:
    ck.save(path, tree)
    ck.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return ck.restore(path, abstract)


def _msgpack(tmp_path, tree, template):
  del tmp_path
  fser.to_state_dict(tree)  # what flax.training checkpoints call
  return fser.from_bytes(template, fser.to_bytes(tree))


def _pickle(tmp_path, tree, template):
  del tmp_path, template
  return pickle.loads(pickle.dumps(tree))


FORMATS = {"orbax": _orbax, "msgpack": _msgpack, "pickle": _pickle}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_state_round_trips_and_the_run_continues_bit_identically(
    name, fmt, tmp_path):
  run = run_of(name)
  restored = FORMATS[fmt](tmp_path, run.saved, run.template())
  assert_bitwise(restored, run.saved)
  after = run.continue_from(restored["params"], restored["state"])
  assert_bitwise(after, run.final)
  if name not in ("with_moment_reset",):  # figures, read back alike
    m, m_ref = (gt.metrics(s["state"], per_leaf=True) for s in (after, run.final))
    assert sorted(m) == sorted(m_ref)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_tree_state_round_trips(name, fmt, tmp_path):
  run = run_of(name, empty=True)
  restored = FORMATS[fmt](tmp_path, run.saved, run.template())
  assert_bitwise(restored, run.saved)
  assert_bitwise(run.continue_from(restored["params"], restored["state"]),
                 run.final)


def test_no_state_holds_a_zero_size_array():
  """orbax cannot save zero-size arrays: empty figure vectors are not leaves."""
  for name in sorted(CASES):
    for empty in (False, True):
      state = run_of(name, empty).saved["state"]
      sizes = [np.size(x) for x in jax.tree.leaves(state)]
      assert 0 not in sizes, (name, empty)


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_without_jit_on_a_restored_numpy_state(name):
  """After flax's from_bytes every leaf is a NumPy array; an eager update
  must still work and give the jitted run's numbers (to float rounding of
  eager vs fused code: compared loosely)."""
  run = run_of(name)
  restored = fser.from_bytes(run.template(), fser.to_bytes(run.saved))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
  params, state = restored["params"], restored["state"]
  g = run.grads[BEFORE]
  u, new_state = run.tx.update(g, state, params, value=jnp.float32(1.0))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
             for x in jax.tree.leaves(u))


def test_nnx_optimizer_state_checkpoints(tmp_path):
  """nnx.Optimizer's state (guard around adam, a per-leaf monitor and
  adagc chained) through orbax and flax msgpack, then one more step each."""
  from flax import nnx

  def make():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    tx = optax.chain(gt.monitor(per_leaf=True), gt.adagc(warmup_steps=1),
                     gt.guard(optax.adam(1e-2), warmup_steps=1))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train(model, opt, x):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean(m(x).astype(jnp.float32) ** 2))(model)
    opt.update(model, grads, value=loss)

  def snap(m, o):  # host copies of the model's and the optimizer's state
    return jax.tree.map(np.asarray, {"model": nnx.state(m), "opt": nnx.state(o)})

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.bfloat16)
  model, opt = make()
  for _ in range(3):
    train(model, opt, x)
  saved = snap(model, opt)

  m2, o2 = make()
  with ocp.StandardCheckpointer() as ck:
    ck.save(tmp_path / "nnx", saved)
    ck.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, snap(m2, o2))
    got = ck.restore(tmp_path / "nnx", abstract)
  nnx.update(m2, got["model"])
  nnx.update(o2, got["opt"])
  m3, o3 = make()
  for obj, key in ((m3, "model"), (o3, "opt")):  # the nnx msgpack recipe
    target = nnx.state(obj)
    blob = fser.to_bytes(nnx.to_pure_dict(saved[key]))
    nnx.replace_by_pure_dict(target, fser.from_bytes(nnx.to_pure_dict(target),
                                                     blob))
    nnx.update(obj, target)
  assert_bitwise(snap(m2, o2), saved)
  assert_bitwise(snap(m3, o3), saved)
  for m, o in ((model, opt), (m2, o2), (m3, o3)):
    train(m, o, x)
  assert_bitwise(snap(m2, o2), snap(model, opt))
  assert_bitwise(snap(m3, o3), snap(model, opt))
  assert "monitor/leaf_norm/kernel" in gt.metrics(o3, per_leaf=True)


def test_msgpack_checkpoint_of_another_tree_is_caught():
  """Leaf names travel in the msgpack checkpoint: restoring one made for
  other params onto this optimizer fails at the next update, clearly."""
  tx = gt.clip_by_leaf_norm(1.0)
  other = {"x": jnp.ones(3), "y": jnp.ones(2)}
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  restored = fser.from_bytes(tx.init(params), fser.to_bytes(tx.init(other)))
  assert restored.sumsq.names == ("x", "y")
  with pytest.raises(ValueError, match="re-initialise"):
    tx.update(params, restored)
  with pytest.raises(ValueError):  # another number of leaves
    fser.from_bytes(tx.init({"a": jnp.ones(3)}), fser.to_bytes(tx.init(other)))
