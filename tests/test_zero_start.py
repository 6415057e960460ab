"""A running statistic must never lock a parameter at zero (issue 13).

Zero gradients at the start (an embedding row missing from the first
batches, a LoRA ``A`` at step 0) or a long stretch of zeros, then normal
gradients: the updates after the zeros must be the ones a reference gives
for the normal gradients alone.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_leaves, random_tree
from test_adaptive import DIRECTION, NORMS, ZClipRef, autoclip_ref

import gradtransforms as gt


def scan_norms(tx, norms):
  """Feeds DIRECTION * n for each n in one compiled scan; returns the output
  global norms (float64) and the final state."""
  def body(state, n):
    u = jax.tree.map(lambda d: d * n, DIRECTION)
    u, state = tx.update(u, state)
    return state, jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(u)))
  state, out = jax.jit(lambda s, ns: jax.lax.scan(body, s, ns))(
      tx.init(DIRECTION), jnp.asarray(norms, jnp.float32))
  return np.asarray(out, np.float64), state


def with_zeros(norms, at, count):
  return list(norms[:at]) + [0.0] * count + list(norms[at:])


def ref_skipping_zeros(step_fn, norms):
  """A reference stepped on the non-zero norms only; zeros give 0."""
  return np.asarray([0.0 if n == 0 else step_fn(float(n)) for n in norms])


# --- zclip ------------------------------------------------------------------


@pytest.mark.parametrize("at,count", [(0, 6), (15, 60)])
def test_zclip_zero_norms_are_not_observations(at, count):
  # at=0: zeros through the whole warm-up (the reference gets mu = var = 0 and
  # clips everything after to 0, forever); at=15: a stretch after warm-up.
  kw = dict(max_grad_norm=None, warmup_steps=4)
  norms = with_zeros(NORMS[:40], at, count)
  out, state = scan_norms(gt.zclip(**kw), norms)
  ref = ZClipRef(**kw)
  np.testing.assert_allclose(out, ref_skipping_zeros(ref.step, norms),
                             rtol=1e-4, atol=1e-6)
  assert np.all(out[at + count:] > 0.5)
  np.testing.assert_allclose(float(state.mean), ref.mean, rtol=1e-4)
  assert int(state.observed) == 40


def test_zclip_zscore_reads_zero_during_warmup():
  out, states = [], []
  tx = gt.zclip(warmup_steps=5, max_grad_norm=None)
  state = tx.init(DIRECTION)
  for n in [1.0, 2.0, 100.0, 0.0, 3.0]:
    _, state = tx.update(jax.tree.map(lambda d: d * n, DIRECTION), state)
    assert float(state.zscore) == 0.0 and not bool(state.spike)


# --- autoclip ---------------------------------------------------------------


@pytest.mark.parametrize("at,count", [(0, 5), (16, 20)])
def test_autoclip_zero_norms_are_not_recorded(at, count):
  # Before the fix the zeros filled the window: the 10th/50th percentile was 0
  # and every update was zeroed until they slid out.
  for p in (10.0, 50.0):
    norms = with_zeros(NORMS[:30], at, count)
    out, state = scan_norms(gt.autoclip(p, history=16), norms)
    want = np.zeros(len(norms))
    nz = [i for i, n in enumerate(norms) if n != 0]
    want[nz] = autoclip_ref(NORMS[:30], p, history=16)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-6)
    assert np.all(out[at + count:] > 0.3)
    assert int(state.observed) == 30


def test_autoclip_threshold_is_inf_before_any_observation():
  tx = gt.autoclip(10.0, history=4)
  zero = jax.tree.map(jnp.zeros_like, DIRECTION)
  u, state = tx.update(zero, tx.init(DIRECTION))
  chex.assert_trees_all_equal(u, zero)
  assert np.isposinf(float(state.threshold)) and not bool(state.clipped)


# --- quantile_clip ----------------------------------------------------------


def quantile_ref(norms, q, lr, c=1.0):
  out = []
  for n in norms:
    out.append(n * min(1.0, c / n) if n > 0 else 0.0)
    if n > 0:
      c *= np.exp(-lr * (float(n <= c) - q))
  return np.asarray(out), c


def test_quantile_clip_long_zero_stretch_does_not_underflow_the_bound():
  # 1200 zeros: exp(-0.1)**1200 = 1e-52 underflowed C to exactly 0 before
  # the fix, and 0 * exp(x) = 0 zeroed every later update.
  norms = with_zeros(NORMS[:30], 10, 1200)
  out, state = scan_norms(gt.quantile_clip(0.5, 0.2, 1.0), norms)
  want, c = quantile_ref(norms, 0.5, 0.2)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-6)
  assert np.all(out[1210:] > 0.5)
  np.testing.assert_allclose(float(state.clip), c, rtol=1e-4)


def test_quantile_clip_zero_start():
  norms = with_zeros(NORMS[:20], 0, 50)
  out, _ = scan_norms(gt.quantile_clip(0.9, 0.2, 1.0), norms)
  np.testing.assert_allclose(out, quantile_ref(norms, 0.9, 0.2)[0], rtol=1e-4,
                             atol=1e-6)
  assert np.all(out[50:] > 0.5)


# --- spike_clip -------------------------------------------------------------


def spam_fresh_ref(seq, theta, b2):
  """SPAM's rule in NumPy (float64), with the documented start of an entry:
  an entry whose v is 0 is not clipped, and its first observation sets
  v = (1 - b2**(t+1)) g**2 (so v_hat = g**2 at the next step)."""
  v, outs = [np.zeros_like(x, np.float64) for x in seq[0]], []
  for t, leaves in enumerate(seq):
    new_out, new_v = [], []
    for g, vi in zip(leaves, v):
      g = g.astype(np.float64)
      if t > 0:
        bound = theta * vi / (1 - b2 ** t)
        spike = (vi > 0) & (g * g > bound)
        g = np.where(spike, np.sign(g) * np.sqrt(bound), g)
      new_out.append(g)
      nv = np.where(vi > 0, b2 * vi + (1 - b2) * g * g,
                    (1 - b2 ** (t + 1)) * g * g)
      new_v.append(np.where(np.isfinite(nv), nv, vi))
    outs.append(new_out)
    v = new_v
  return outs


def test_spike_clip_zero_entry_at_step_zero_hand_computed():
  # theta = 4, b2 = 0.9; an entry is 0 for steps 0-4, then 1, then 10.
  tx = gt.spike_clip(threshold=4.0, decay=0.9)
  p = {"w": jnp.zeros((2,))}
  state, outs = tx.init(p), []
  for g in [[1.0, 0.0]] * 5 + [[1.0, 1.0], [1.0, 10.0]]:
    u, state = tx.update({"w": jnp.asarray(g)}, state)
    outs.append(np.asarray(u["w"]))
  assert outs[5][1] == 1.0  # its first gradient passes (was clipped to 0)
  # v_hat = 1**2 after it: the spike 10 is clipped to sqrt(4 * 1) = 2
  np.testing.assert_allclose(outs[6][1], 2.0, rtol=1e-5)
  np.testing.assert_allclose([o[0] for o in outs], 1.0, rtol=1e-6)
  assert bool(state.clipped)


def test_spike_clip_zero_leaf_at_start_matches_reference():
  seq = [random_tree(400 + t) for t in range(10)]
  for t in range(4):  # an embedding absent from the first batches
    seq[t]["emb"] = (jnp.zeros_like(seq[t]["emb"][0]),)
  seq[2]["dense"]["b"] = seq[2]["dense"]["b"].at[1].set(0.0)
  seq[7]["emb"] = (seq[7]["emb"][0].at[0, 0].set(1e3),)  # a real spike
  tx = gt.spike_clip(threshold=50.0, decay=0.9)
  state, step, outs = tx.init(seq[0]), jax.jit(tx.update), []
  for tree in seq:
    u, state = step(tree, state)
    outs.append(np_leaves(u))
  for o, e in zip(outs, spam_fresh_ref([np_leaves(t) for t in seq], 50.0, 0.9)):
    for a, b in zip(o, e):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  emb = gt.leaf_names(seq[0]).index("emb/0")
  np.testing.assert_array_equal(outs[4][emb], np_leaves(seq[4])[emb])
  assert abs(outs[7][emb][0, 0]) < 100


def test_spike_clip_long_zero_stretch_then_normal_gradients():
  # 1000 zero steps decay v by 0.9**1000 = 2e-46: it underflows to 0, and
  # before the fix the bound sqrt(theta * 0) froze every entry at 0.
  t = random_tree(5)
  zero = jax.tree.map(jnp.zeros_like, t)
  tx = gt.spike_clip(threshold=50.0, decay=0.9)

  @jax.jit
  def run(state):
    u, state = tx.update(t, state)
    state = jax.lax.fori_loop(0, 1000, lambda i, s: tx.update(zero, s)[1], state)
    return tx.update(t, state)
  u, state = run(tx.init(t))
  chex.assert_trees_all_equal(u, t)  # every entry starts afresh: unclipped
  u, _ = jax.jit(tx.update)(jax.tree.map(lambda x: 1.5 * x, t), state)
  chex.assert_trees_all_close(u, jax.tree.map(lambda x: 1.5 * x, t), rtol=1e-6)


# --- adaptive_grad_clip and per_example_clip ----------------------------------


def test_agc_zero_params_and_zero_grads_as_optax():
  g = {"w": jnp.ones((3, 4)), "z": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}
  p = {"w": jnp.zeros((3, 4)), "z": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
  tx = gt.adaptive_grad_clip(0.5)
  out, _ = tx.update(g, tx.init(p), p)
  ref, _ = optax.adaptive_grad_clip(0.5).update(g, None, p)
  chex.assert_trees_all_close(out, ref, rtol=1e-6)
  # a zero-initialised unit moves, by clipping * eps per unit
  np.testing.assert_allclose(np.linalg.norm(out["w"], axis=0), 0.5e-3, rtol=1e-5)
  chex.assert_trees_all_equal(out["z"], g["z"])


def test_per_example_zero_example_stays_zero():
  g = {"w": jnp.asarray([[0.0, 0.0], [3.0, 4.0]])}
  out, state = gt.per_example_clip(1.0, reduce="sum").update(g, None)
  np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
  assert float(state.clip_fraction) == 0.5 and float(state.max_norm) == 5.0
