"""Adaptive clipping against NumPy re-statements of the papers / references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_global_norm, np_leaves, random_tree

import gradtransforms as gt
from gradtransforms.catalogue import CATALOGUE

# A norm sequence with a slow drift, noise, and planted spikes at 30 and 41.
_rng = np.random.default_rng(7)
NORMS = list(1.0 + 0.3 * np.sin(np.arange(60) / 7) + 0.05 * _rng.normal(size=60))
NORMS[30] *= 20.0
NORMS[41] *= 6.0

DIRECTION = random_tree(11)
_unit = np_global_norm(DIRECTION)
DIRECTION = jax.tree.map(lambda x: x / _unit, DIRECTION)


def drive(tx, norms, params=None):
  """Feeds updates of the given global norms; returns (out norms, states)."""
  state = tx.init(DIRECTION)
  step = jax.jit(tx.update)
  out, states = [], []
  for n in norms:
    u = jax.tree.map(lambda d: d * jnp.float32(n), DIRECTION)
    u, state = step(u, state, params)
    out.append(np_global_norm(u))
    states.append(state)
  return np.asarray(out), states


# --- AutoClip -----------------------------------------------------------------


def autoclip_ref(norms, p, history=None):
  hist, out = [], []
  for n in norms:
    hist.append(n)
    window = hist if history is None else hist[-history:]
    c = np.percentile(window, p)
    out.append(n * min(1.0, c / n))
  return np.asarray(out)


@pytest.mark.parametrize("p,history", [(10.0, 100), (50.0, 100), (90.0, 16)])
def test_autoclip_matches_reference(p, history):
  out, states = drive(gt.autoclip(p, history=history), NORMS)
  np.testing.assert_allclose(out, autoclip_ref(NORMS, p, history), rtol=2e-5)
  assert bool(states[30].clipped)
  np.testing.assert_allclose(gt.metrics(states[-1])["autoclip/threshold"],
                             np.percentile(NORMS[-history:], p), rtol=1e-5)


def test_autoclip_nan_step_is_not_recorded():
  norms = NORMS[:10] + [np.nan] + NORMS[10:20]
  out, states = drive(gt.autoclip(25.0, history=64), norms)
  assert np.isnan(out[10])  # passed through, not repaired
  assert int(states[-1].observed) == 20
  np.testing.assert_allclose(out[11:], autoclip_ref(NORMS[:20], 25.0)[10:],
                             rtol=2e-5)


# --- ZClip --------------------------------------------------------------------


class ZClipRef:
  """The authors' ZClip.step, restated on floats (torch removed)."""

  def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6,
               warmup_steps=25, mode="zscore", clip_option="adaptive_scaling",
               clip_factor=1.0, skip_update_on_spike=False):
    self.__dict__.update(locals())
    self.buffer, self.initialized, self.mean, self.var = [], False, None, None

  @staticmethod
  def coef(n, m):  # apply_in_place_clipping / clip_grad_norm_
    return m / (n + 1e-6) if n > m else 1.0

  def clip_val(self, n):
    std = self.var ** 0.5
    if self.mode == "percentile":
      thr = self.mean + self.z_thresh * std
      return thr if n > thr else None
    z = (n - self.mean) / (std + self.eps)
    if z > self.z_thresh:
      if self.clip_option == "adaptive_scaling":
        return (self.mean + self.z_thresh * std / (z / self.z_thresh)) * \
            self.clip_factor
      return self.mean
    return None

  def step(self, n):
    if not self.initialized:
      self.buffer.append(n)
      if len(self.buffer) >= self.warmup_steps:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized, self.buffer = True, []
      return n * (self.coef(n, self.max_grad_norm)
                  if self.max_grad_norm is not None else 1.0)
    cv = self.clip_val(n)
    bound = cv if cv is not None else n
    if self.max_grad_norm is not None:
      bound = min(bound, self.max_grad_norm)
    out = n * self.coef(n, bound)
    if not (cv is not None and self.skip_update_on_spike):
      x = cv if cv is not None else n
      self.mean = self.alpha * self.mean + (1 - self.alpha) * x
      self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
    return out


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(max_grad_norm=None, warmup_steps=10),
    dict(max_grad_norm=5.0, clip_option="mean", warmup_steps=10),
    dict(max_grad_norm=None, mode="percentile", z_thresh=2.0, warmup_steps=10),
    dict(max_grad_norm=None, skip_update_on_spike=True, clip_factor=0.7,
         warmup_steps=10, alpha=0.9),
])
def test_zclip_matches_reference_step_for_step(kwargs):
  ref = ZClipRef(**kwargs)
  expect = np.asarray([ref.step(float(n)) for n in NORMS])
  ours = {("decay" if k == "alpha" else k): v for k, v in kwargs.items()}
  out, states = drive(gt.zclip(**ours), NORMS)
  np.testing.assert_allclose(out, expect, rtol=1e-4)
  np.testing.assert_allclose(states[-1].mean, ref.mean, rtol=1e-4)
  np.testing.assert_allclose(states[-1].var, ref.var, rtol=1e-3)
  if kwargs.get("max_grad_norm", 1.0) is None:
    assert bool(states[30].spike) and bool(states[30].clipped)
    assert not bool(states[29].spike)


def test_zclip_nonfinite_step_leaves_statistics_alone():
  norms = NORMS[:15] + [np.inf, np.nan] + NORMS[15:40]
  out, states = drive(gt.zclip(max_grad_norm=None, warmup_steps=10), norms)
  ref = ZClipRef(max_grad_norm=None, warmup_steps=10)
  expect = [ref.step(float(n)) for n in NORMS[:40]]
  assert np.isinf(out[15]) and np.isnan(out[16])
  np.testing.assert_allclose(np.delete(out, [15, 16]), expect, rtol=1e-4)
  assert np.isfinite(float(states[-1].mean)) and np.isfinite(float(states[-1].var))


# --- AdaGC --------------------------------------------------------------------


def adagc_ref(seq, lam=1.05, beta=0.98, warmup=100, max_norm=1.0):
  gamma, outs = None, []
  for t, leaves in enumerate(seq):
    norms = np.asarray([np.linalg.norm(x) for x in leaves])
    if t < warmup:
      gn = np.sqrt(np.sum(norms ** 2))
      s = np.full_like(norms, min(1.0, max_norm / gn))
      c = norms * s
      gamma = c if t == 0 else np.minimum(gamma, c)
    else:
      s = np.minimum(1.0, lam * gamma / norms)
      gamma = beta * gamma + (1 - beta) * norms * s
    outs.append([x * si for x, si in zip(leaves, s)])
  return outs, gamma


def test_adagc_matches_reference():
  rng = np.random.default_rng(3)
  seq = []
  for t in range(30):
    tree = random_tree(100 + t, scale=1.0 + 0.1 * rng.normal())
    if t == 20:
      tree["dense"]["w"] = tree["dense"]["w"] * 50  # a spike in one layer
    seq.append(tree)
  tx = gt.adagc(warmup_steps=5, max_norm=3.0)
  state, step, outs = tx.init(seq[0]), jax.jit(tx.update), []
  for tree in seq:
    u, state = step(tree, state)
    outs.append(np_leaves(u))
  expect, gamma = adagc_ref([np_leaves(t) for t in seq], warmup=5, max_norm=3.0)
  for o, e in zip(outs, expect):
    for a, b in zip(o, e):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.gamma.values), gamma,
                             rtol=1e-4)
  # The spiking layer was clipped back near its running norm, the rest not.
  leaf = gt.leaf_names(seq[0]).index("dense/w")
  assert np.linalg.norm(outs[20][leaf]) < 2 * np.linalg.norm(np_leaves(seq[19])[leaf])


# --- spike_clip (SPAM) ------------------------------------------------------------


def spam_ref(seq, theta, b2):
  """SPAM's rule in NumPy (float64); also each step's largest |g| - bound
  over clipped entries (None when nothing was clipped)."""
  v, outs, excess = [np.zeros_like(x, np.float64) for x in seq[0]], [], []
  for t, leaves in enumerate(seq):
    new_out, new_v, worst = [], [], None
    for g, vi in zip(leaves, v):
      g = g.astype(np.float64)
      if t > 0:
        bound = theta * vi / (1 - b2 ** t)
        spike = g * g > bound
        if spike.any():
          e = np.max(np.abs(g[spike]) - np.sqrt(bound[spike]))
          worst = e if worst is None else max(worst, e)
        g = np.where(spike, np.sign(g) * np.sqrt(bound), g)
      new_out.append(g)
      new_v.append(b2 * vi + (1 - b2) * g * g)
    outs.append(new_out)
    excess.append(worst)
    v = new_v
  return outs, excess


@pytest.mark.parametrize("theta,b2,steps", [(50.0, 0.9, 12), (5000.0, 0.999, 60)])
def test_spike_clip_matches_reference(theta, b2, steps):
  seq = [random_tree(200 + t) for t in range(steps)]
  seq[6]["conv"][0] = seq[6]["conv"][0].at[0, 0, 0, 0].set(1e4)  # one entry
  tx = gt.spike_clip(threshold=theta, decay=b2)
  state, step, outs, figures = tx.init(seq[0]), jax.jit(tx.update), [], []
  for tree in seq:
    u, state = step(tree, state)
    outs.append(np_leaves(u))
    figures.append((bool(state.clipped), float(state.max_excess)))
  expect, excess = spam_ref([np_leaves(t) for t in seq], theta, b2)
  for o, e in zip(outs, expect):
    for a, b in zip(o, e):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for (clipped, got), want in zip(figures, excess):
    assert clipped == (want is not None)
    if want is None:
      assert got <= 0
    else:
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert figures[0] == (False, -np.inf) and figures[6][0]
  assert abs(outs[6][gt.leaf_names(seq[0]).index("conv/0")].flat[0]) < 1e3


def test_spike_clip_tpu_form_is_bit_identical(monkeypatch):
  """On TPU the state stores max(bound, 0) (spike_clip._state_copy): the
  same bits as the CPU form, zeros, spikes, Inf and NaN included."""
  seq = [random_tree(300 + t) for t in range(4)]
  seq[2] = dict(seq[2], scalar=jnp.asarray(jnp.inf))
  seq[3]["dense"]["w"] = seq[3]["dense"]["w"].at[0, 0].set(jnp.nan) * 50

  def run():
    tx = gt.spike_clip(threshold=2.0)  # a fresh function: traced anew
    state, step, got = tx.init(seq[0]), jax.jit(tx.update), []
    for tree in [jax.tree.map(jnp.zeros_like, seq[0])] + seq:
      u, state = step(tree, state)
      got += jax.tree.leaves((u, state))
    return got
  want = run()
  calls = []

  def tpu_form(*args, tpu=None, default=None, **kw):
    calls.append(tpu)
    return (tpu or default)(*args)
  monkeypatch.setattr(jax.lax, "platform_dependent", tpu_form)
  got = run()
  assert any(c is not None for c in calls)
  for x, y in zip(want, got):
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def test_spike_clip_nonfinite_never_enters_state():
  t = random_tree(1)
  tx = gt.spike_clip(threshold=10.0)
  state = tx.init(t)
  _, state = tx.update(t, state)
  bad = dict(t, scalar=jnp.asarray(jnp.inf), dense={"w": t["dense"]["w"].at[0, 0].set(jnp.nan),
                                                     "b": t["dense"]["b"]})
  out, state = tx.update(bad, state)
  assert np.isfinite(float(out["scalar"]))  # Inf is a spike: clipped to bound
  assert np.isnan(float(out["dense"]["w"][0, 0]))  # NaN passes
  assert all(np.all(np.isfinite(x)) for x in np_leaves(state.bound))


def test_with_moment_reset_zeroes_adam_moments():
  t = random_tree(2)
  tx = gt.with_moment_reset(optax.chain(optax.clip(1.0), optax.adam(1e-2)),
                            interval=3)
  state = tx.init(t)
  step = jax.jit(tx.update)
  ref = optax.adam(1e-2)
  ref_state = ref.init(t)
  for i in range(5):
    u, state = step(t, state, t)
    if i == 3:  # the reset happens before step index 3: adam restarts fresh
      ref_state = ref.init(t)
    r, ref_state = ref.update(jax.tree.map(lambda x: jnp.clip(x, -1, 1), t),
                              ref_state, t)
    chex.assert_trees_all_close(u, r, rtol=1e-5)
  assert gt.metrics(state)["with_moment_reset/resets"] == 1


# --- Clippy ---------------------------------------------------------------------


def test_clippy_matches_reference():
  u, w = random_tree(5, scale=0.05), random_tree(6)
  out, state = jax.jit(gt.clippy(0.5, 1e-2).update)(u, gt.clippy().init(w), w)
  for o, a, b in zip(np_leaves(out), np_leaves(u), np_leaves(w)):
    sigma = min(1.0, np.min((0.5 * np.abs(b) + 1e-2) / np.abs(a)))
    np.testing.assert_allclose(o, sigma * a, rtol=1e-5)
    assert np.all(np.abs(o) <= (0.5 * np.abs(b) + 1e-2) * (1 + 1e-5))


# --- quantile_clip --------------------------------------------------------------


def test_quantile_clip_matches_reference_and_tracks_quantile():
  rng = np.random.default_rng(0)
  norms = list(np.exp(rng.normal(size=300)))
  out, states = drive(gt.quantile_clip(0.8, 0.2, 1.0), norms)
  c, expect = 1.0, []
  for n in norms:
    expect.append(n * min(1.0, c / n))
    c *= math.exp(-0.2 * (float(n <= c) - 0.8))
  np.testing.assert_allclose(out, expect, rtol=1e-4)
  np.testing.assert_allclose(float(states[-1].clip), c, rtol=1e-3)
  # C ends near the 80th percentile of the log-normal norms (exp(0.84)).
  assert 1.5 < float(np.mean([s.clip for s in states[-100:]])) < 3.5


# --- shared properties --------------------------------------------------------------

ADAPTIVE = {k: e.test for k, e in CATALOGUE.items()
            if e.group == "adaptive" and e.placement == "before"}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_keep_dtype_and_structure_and_metrics(name):
  t = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_tree(9))
  tx = optax.chain(ADAPTIVE[name](), optax.sgd(0.1))
  state = tx.init(t)
  out, state = jax.jit(tx.update)(t, state, t)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, t)
  m = gt.metrics(state)
  assert m and all(k.startswith(name + "/") for k in m)


@pytest.mark.parametrize("make,arg", [
    (lambda: gt.autoclip(101.0), "percentile"),
    (lambda: gt.autoclip(history=0), "history"),
    (lambda: gt.zclip(mode="median"), "mode"),
    (lambda: gt.zclip(clip_option="max"), "clip_option"),
    (lambda: gt.zclip(decay=1.0), "decay"),
    (lambda: gt.zclip(z_thresh=0.0), "z_thresh"),
    (lambda: gt.adagc(decay=-0.1), "decay"),
    (lambda: gt.spike_clip(threshold=-1.0), "threshold"),
    (lambda: gt.clippy(absolute_factor=0.0), "absolute_factor"),
    (lambda: gt.quantile_clip(target_quantile=1.5), "target_quantile"),
    (lambda: gt.with_moment_reset(optax.adam(1e-3), interval=0), "interval"),
])
def test_adaptive_bad_arguments(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()


def test_autoclip_history_must_be_int():
  with pytest.raises(TypeError, match="history"):
    gt.autoclip(history=10.5)


@pytest.mark.parametrize("name", ["autoclip", "zclip", "adagc", "quantile_clip"])
def test_a_nonfinite_step_is_invisible_to_the_statistics(name):
  make = ADAPTIVE[name]
  seq = [random_tree(300 + i, scale=1.0 + 0.2 * i) for i in range(6)]
  nan = jax.tree.map(lambda x: x * jnp.nan, seq[0])
  inf = jax.tree.map(lambda x: x.at[...].set(jnp.inf), seq[0])
  outs = []
  for stream in (seq, seq[:3] + [nan, inf] + seq[3:]):
    tx = make()
    state, step = tx.init(seq[0]), jax.jit(tx.update)
    for g in stream:
      u, state = step(g, state)
    outs.append(u)
  chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6)
