"""gt.spam: SPAM as one optimizer, against the chain it replaces and a NumPy
restatement of the paper's algorithm."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtransforms as gt

SHAPES = {"a": (5, 4), "b": (7,)}


def grads(n, seed=0, spike_at=(3, 6)):
  """``n`` gradient trees, every entry non-zero, with large spikes at the
  steps ``spike_at`` in a few entries."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(n):
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    if t in spike_at:
      g["a"][0, :2] *= 300.0
      g["b"][3] *= -500.0
    out.append(jax.tree.map(jnp.asarray, g))
  return out


def run(tx, seq, params=None):
  params = params or jax.tree.map(jnp.zeros_like, seq[0])
  state, update = tx.init(params), jax.jit(tx.update)
  outs, states = [], []
  for g in seq:
    u, state = update(g, state, params)
    outs.append(u)
    states.append(state)
  return outs, states


def np_spam(seq, lr, b1, b2, eps, theta, interval, warmup, wd=0.0, w=None):
  """The algorithm as the docstring states it, in float64."""
  m = {k: np.zeros(s) for k, s in SHAPES.items()}
  v = {k: np.zeros(s) for k, s in SHAPES.items()}
  c = resets = 0
  outs = []
  for step, g in enumerate(seq):
    if step > 0 and step % interval == 0:
      m = {k: np.zeros(s) for k, s in SHAPES.items()}
      v = {k: np.zeros(s) for k, s in SHAPES.items()}
      c, resets = 0, resets + 1
    phi = 1.0
    if resets and c < warmup:
      phi = 1 - 0.99 * (1 + math.cos(math.pi * c / (warmup + 1))) / 2
    u = {}
    for k in SHAPES:
      gk = np.asarray(g[k], np.float64)
      if c > 0:
        lim = np.sqrt(theta * v[k] / (1 - b2 ** c))
        gk = np.where(v[k] > 0, np.clip(gk, -lim, lim), gk)
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk ** 2
      adam = (m[k] / (1 - b1 ** (c + 1))) / (
          np.sqrt(v[k] / (1 - b2 ** (c + 1))) + eps)
      u[k] = -lr * (phi * adam + (wd * np.asarray(w[k]) if wd else 0.0))
    c += 1
    outs.append(u)
  return outs


def test_equals_spike_clip_then_adam_with_moment_reset_until_the_reset():
  """Where the definitions coincide (before the first reset, every entry
  non-zero at step 0), the numbers are the chain's; spikes are clipped."""
  seq = grads(8)
  kw = dict(b1=0.9, b2=0.99, eps=1e-8)
  ours, states = run(gt.spam(1e-2, **kw, threshold=4.0, interval=8,
                             warmup_steps=0), seq)
  chain = optax.chain(gt.spike_clip(threshold=4.0, decay=0.99),
                      gt.with_moment_reset(optax.adam(1e-2, **kw), 8))
  ref, ref_states = run(chain, seq)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-9)
  for s, r in zip(states, ref_states):
    assert bool(s.clipped) == bool(r[0].clipped)
    np.testing.assert_allclose(s.max_excess, r[0].max_excess, rtol=1e-4)
    for x, y in zip(jax.tree.leaves(s.adam.nu),
                    jax.tree.leaves(r[1].inner_state[0].nu)):
      np.testing.assert_allclose(x, y, rtol=2e-5)
  assert bool(states[3].clipped) and bool(states[6].clipped)


def test_differs_from_the_chain_after_a_reset_where_documented():
  """After a reset the chain clips against its own, unreset, history: the
  first step after the reset is clipped by the chain, not by SPAM."""
  seq = grads(6, spike_at=(4,))
  kw = dict(b1=0.9, b2=0.99, eps=1e-8)
  ours, states = run(gt.spam(1e-2, **kw, threshold=4.0, interval=4,
                             warmup_steps=0), seq)
  chain = optax.chain(gt.spike_clip(threshold=4.0, decay=0.99),
                      gt.with_moment_reset(optax.adam(1e-2, **kw), 4))
  ref, ref_states = run(chain, seq)
  assert bool(ref_states[4][0].clipped) and not bool(states[4].clipped)
  assert int(states[4].resets) == 1 and int(states[4].adam.count) == 1


@pytest.mark.parametrize("warmup", [0, 3])
def test_matches_numpy_restatement_across_resets(warmup):
  seq = grads(12, spike_at=(3, 6, 10))
  w = {k: jnp.full(s, 0.5, jnp.float32) for k, s in SHAPES.items()}
  args = dict(b1=0.8, b2=0.95, eps=1e-6)
  tx = gt.spam(3e-3, **args, threshold=6.0, interval=5, warmup_steps=warmup,
               weight_decay=0.1)
  ours, states = run(tx, seq, params=w)
  ref = np_spam(seq, 3e-3, 0.8, 0.95, 1e-6, 6.0, 5, warmup, wd=0.1, w=w)
  for a, b in zip(ours, ref):
    for k in SHAPES:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-10)
  assert int(states[-1].resets) == 2 and int(states[-1].step) == 12
  assert gt.metrics(states[-1])["spam/resets"] == 2


def test_infinite_threshold_is_adam_with_moment_reset():
  seq = grads(7)
  ours, _ = run(gt.spam(1e-2, threshold=jnp.inf, interval=3, warmup_steps=0),
                seq)
  ref, _ = run(gt.with_moment_reset(optax.adam(1e-2), 3), seq)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)


def test_schedule_is_read_at_the_step_count():
  seq = grads(4)
  sched = optax.linear_schedule(1e-2, 1e-3, 4)
  ours, _ = run(gt.spam(sched, threshold=jnp.inf), seq)
  ref, _ = run(optax.adam(sched), seq)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)


def test_one_copy_of_the_second_moment():
  """Adam's moments and three scalars: no second v, however many leaves."""
  params = {f"l{i}": jnp.ones((3, 2)) for i in range(10)}
  state = gt.spam(1e-3).init(params)
  sized = [x for x in jax.tree.leaves(state) if x.shape == (3, 2)]
  assert len(sized) == 2 * len(params)
  assert len(jax.tree.leaves(state)) == 2 * len(params) + 4
  assert optax.tree_utils.tree_get(state, "nu") is state.adam.nu


def test_zero_gradients_at_the_start_do_not_lock_an_entry():
  tx = gt.spam(1e-2, threshold=4.0, warmup_steps=0)
  p = {"w": jnp.zeros(3)}
  s = tx.init(p)
  for _ in range(3):  # entry 0 never seen
    _, s = tx.update({"w": jnp.asarray([0.0, 1.0, 1.0])}, s)
  u, s = tx.update({"w": jnp.asarray([50.0, 50.0, 1.0])}, s)
  v = np.asarray(s.adam.nu["w"])
  assert v[0] > 0  # its first gradient passed unclipped into v
  np.testing.assert_allclose(v[0], 0.001 * 2500.0, rtol=1e-5)
  assert v[1] < 0.01 * 2500  # entry 1 was clipped
  assert bool(s.clipped)


def test_nonfinite_entries_never_enter_the_moments():
  tx = gt.spam(1e-2, threshold=4.0)
  p = {"w": jnp.zeros(3)}
  s = tx.init(p)
  _, s = tx.update({"w": jnp.asarray([1.0, 1.0, 1.0])}, s)
  before = jax.tree.map(np.asarray, s.adam)
  u, s = tx.update({"w": jnp.asarray([np.nan, np.inf, 2.0])}, s)
  assert np.isnan(u["w"][0]) and np.isfinite(u["w"][1:]).all()
  assert np.isfinite(np.asarray(s.adam.mu["w"])).all()
  assert np.isfinite(np.asarray(s.adam.nu["w"])).all()
  assert s.adam.mu["w"][0] == before.mu["w"][0]
  assert np.isnan(s.max_excess)
  # Inf with no history: the moments untouched, the entry does not move
  s0 = tx.init(p)
  u, s0 = tx.update({"w": jnp.asarray([np.inf, 1.0, 1.0])}, s0)
  assert float(u["w"][0]) == 0.0 and float(s0.adam.nu["w"][0]) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_entry_at_a_reset_keeps_the_reset_moments(bad):
  """A reset zeroes the moments also where the entry is non-finite (the
  kept moments are the reset ones, 0, never the stale ones before it); the
  finite entries restart as Adam's first step."""
  tx = gt.spam(1e-2, threshold=4.0, interval=2, warmup_steps=0)
  p = {"w": jnp.zeros(3)}
  s = tx.init(p)
  for _ in range(2):
    _, s = tx.update({"w": jnp.asarray([1.0, 2.0, 3.0])}, s)
  assert float(s.adam.mu["w"][0]) > 0
  u, s = tx.update({"w": jnp.asarray([bad, 2.0, 3.0])}, s)  # step 2: reset
  assert int(s.resets) == 1
  assert float(s.adam.mu["w"][0]) == 0.0 and float(s.adam.nu["w"][0]) == 0.0
  np.testing.assert_allclose(s.adam.mu["w"][1:], [0.2, 0.3], rtol=1e-6)
  np.testing.assert_allclose(s.adam.nu["w"][1:], [0.004, 0.009], rtol=1e-5)
  assert np.isnan(u["w"][0]) == np.isnan(bad)
  np.testing.assert_allclose(u["w"][1:], -1e-2, rtol=1e-5)  # Adam's first step


def test_float16_square_that_overflows_keeps_both_moments():
  """float16: a finite gradient whose square is not (300**2 > 65504) keeps
  m and v alike (m moved alone would take a step of m / eps); a zero
  gradient at step 0 updates by 0, not ``0 / 0`` (``eps`` is 0 in float16,
  ``optax.adam`` gives NaN there)."""
  tx = gt.spam(1e-2, warmup_steps=0)
  p = {"w": jnp.zeros(3, jnp.float16)}
  s = tx.init(p)
  u, s = tx.update({"w": jnp.asarray([300.0, 1.0, 0.0], jnp.float16)}, s)
  assert s.adam.mu["w"].dtype == jnp.float16 and u["w"].dtype == jnp.float16
  assert float(s.adam.mu["w"][0]) == 0.0 and float(s.adam.nu["w"][0]) == 0.0
  assert float(u["w"][0]) == 0.0 and float(u["w"][2]) == 0.0
  np.testing.assert_allclose(float(s.adam.mu["w"][1]), 0.1, rtol=1e-3)
  np.testing.assert_allclose(float(u["w"][1]), -1e-2, rtol=1e-3)


def test_bad_arguments_are_named():
  for kw, arg in [({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"), ({"eps": -1.0}, "eps"),
                  ({"threshold": 0.0}, "threshold"), ({"interval": 0}, "interval"),
                  ({"warmup_steps": -1}, "warmup_steps"),
                  ({"weight_decay": -1.0}, "weight_decay")]:
    with pytest.raises((TypeError, ValueError), match=arg):
      gt.spam(1e-3, **kw)
  with pytest.raises((TypeError, ValueError), match="learning_rate"):
    gt.spam(-1.0)
  with pytest.raises(ValueError, match="params"):
    tx = gt.spam(1e-3, weight_decay=0.1)
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


def test_bfloat16_figure_in_its_tpu_form(monkeypatch):
  """On TPU a bfloat16 run takes ``max_excess`` in bfloat16 (only then does
  XLA:TPU fuse it into the optimizer's pass: 1.000x Adam's bytes, 1.286 in
  float32). Run here on CPU: updates and moments bit-identical to the
  float32-figure form, the figure within bfloat16 rounding of it, and
  ``clipped`` the same at every step of this run (spikes and calm ones)."""
  seq = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
         for g in grads(9, spike_at=(3, 6))]
  params = jax.tree.map(jnp.zeros_like, seq[0])
  want_u, want_s = run(gt.spam(1e-2, threshold=50.0, interval=100), seq, params)

  def tpu_form(*args, tpu=None, default=None, **_):
    return (tpu or default)(*args)
  monkeypatch.setattr(jax.lax, "platform_dependent", tpu_form)
  got_u, got_s = run(gt.spam(1e-2, threshold=50.0, interval=100), seq, params)
  for a, b in zip(jax.tree.leaves((got_u, [s.adam for s in got_s])),
                  jax.tree.leaves((want_u, [s.adam for s in want_s]))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for t, (a, b, g) in enumerate(zip(got_s, want_s, seq)):
    assert bool(a.clipped) == bool(b.clipped), t
    if t:  # step 0 has no history: both -inf
      peak = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(g))
      assert abs(float(a.max_excess) - float(b.max_excess)) <= 2**-7 * peak, t
  assert any(bool(s.clipped) for s in want_s) and not all(bool(s.clipped) for s in want_s[1:])
