"""TransformerLM, the stdlib byte corpus, and the restated skip-step baselines
(gradtransforms/bench/lm_stability/skip_rules.py) against hand-computed cases and a NumPy restatement."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gradtransforms.models import TransformerLM
from gradtransforms.models.transformer import param_count
from gradtransforms.tasks import corpus

from gradtransforms.bench.lm_stability import skip_rules

V = 256


# ------------------------------------------------------------------- model --

def small(**kw):
  cfg = dict(vocab_size=V, d_model=32, num_layers=3, num_heads=4, max_len=16)
  return TransformerLM(**(cfg | kw), rngs=nnx.Rngs(0))


forward = nnx.jit(lambda m, x: m(x))  # compiled once per model config and shape


def expected_params(V, d, L, T, ratio=4, tied=True):
  """Counted by hand: embeddings, positions, per block (2 LayerNorms, q/k/v/out
  with biases, the MLP), final LayerNorm, untied head."""
  block = 2 * d + 4 * (d * d + d) + 2 * d + (d * ratio * d + ratio * d) + (
      ratio * d * d + d)
  return V * d + T * d + L * block + 2 * d + (0 if tied else d * V)


def test_logits_shape():
  m = small()
  assert forward(m, jnp.zeros((2, 12), jnp.int32)).shape == (2, 12, V)
  assert nnx.eval_shape(lambda m, x: m(x), m, jnp.zeros((3, 5), jnp.int32)
                        ).shape == (3, 5, V)


def test_causal_future_token_changes_no_earlier_logit():
  m = small()
  x = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, V)
  k = 7
  x2 = x.at[:, k].set((x[:, k] + 17) % V)
  a, b = np.asarray(forward(m, x)), np.asarray(forward(m, x2))
  np.testing.assert_array_equal(a[:, :k], b[:, :k])
  assert np.abs(a[:, k:] - b[:, k:]).max() > 1e-4  # and it does change later ones


def test_blocks_are_stacked_on_a_leading_layer_axis():
  m = small(num_layers=3)
  blocks = nnx.state(m.blocks, nnx.Param)
  leaves = jax.tree.leaves(blocks)
  assert len(leaves) == 16  # 2 LayerNorms x 2, q/k/v/out x 2, MLP 2 x 2
  assert all(x.shape[0] == 3 for x in leaves)
  q = m.blocks.attn.query.kernel[...]
  assert q.shape == (3, 32, 4, 8)
  assert not np.allclose(q[0], q[1])  # split RNGs: layers initialised apart


def test_unrolled_and_rolled_scan_agree():
  x = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, V)
  np.testing.assert_allclose(forward(small(unroll=1), x), forward(small(), x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_hand_count(tied):
  m = small(tie_embeddings=tied)
  assert param_count(m) == expected_params(V, 32, 3, 16, tied=tied)


@pytest.mark.parametrize("d,L,H,tied", [(128, 5, 4, True), (384, 6, 6, False)])
def test_configs_span_one_to_ten_million_params(d, L, H, tied):
  n = expected_params(V, d, L, 128, tied=tied)
  assert 1e6 <= n <= 1.1e7
  m = jax.eval_shape(lambda: nnx.state(TransformerLM(
      V, d, L, H, 128, tie_embeddings=tied, rngs=nnx.Rngs(0)), nnx.Param))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(m)) == n


def test_model_rejects_bad_config():
  with pytest.raises(ValueError, match="divisible"):
    TransformerLM(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="max_len"):
    small()(jnp.zeros((1, 17), jnp.int32))


# ------------------------------------------------------------------ corpus --

@pytest.fixture
def src(tmp_path):
  files = {"b/z.py": b"zzzz\n", "a.py": b"print(1)\n", "b/a.py": b"x = 2\n",
           "c/d/e.py": b"# \xc3\xa9\n" * 3, "notes.txt": b"not python",
           "site-packages/pkg/m.py": b"installed", "dist-packages/m.py": b"no"}
  for name, data in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
  return tmp_path


def test_corpus_is_sorted_py_files_without_installed_packages(src):
  c = corpus.load(src, held_out=0.25)
  want = b"print(1)\n" + b"x = 2\n" + b"zzzz\n" + b"# \xc3\xa9\n" * 3
  assert c.files == 4
  assert bytes(np.concatenate([c.train, c.held_out])) == want
  assert c.held_out.size == round(0.25 * len(want))
  assert c.bytes == len(want) and c.describe()["python"] == c.python


def test_corpus_limit_reads_first_files(src):
  c = corpus.load(src, held_out=0.5, limit=2)
  assert c.files == 2
  assert bytes(np.concatenate([c.train, c.held_out])) == b"print(1)\nx = 2\n"


def test_corpus_errors(src, tmp_path_factory):
  with pytest.raises(ValueError, match="held_out"):
    corpus.load(src, held_out=1.0)
  with pytest.raises(ValueError, match="no .py files"):
    corpus.load(tmp_path_factory.mktemp("empty"))


def test_stdlib_corpus_slice():
  c = corpus.load(limit=5)
  assert c.files == 5 and c.train.size > 0 and c.held_out.size > 0
  assert "site-packages" not in c.root


def test_sample_windows_are_shifted_slices_within_bounds():
  data = np.arange(200, dtype=np.uint8)  # unique bytes: a window names its start
  x, y = corpus.sample(jnp.asarray(data), jax.random.PRNGKey(0), 64, 16)
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == y.shape == (64, 16)
  for xi, yi in zip(x, y):
    s = int(xi[0])
    assert 0 <= s <= 200 - 17
    np.testing.assert_array_equal(xi, data[s:s + 16])
    np.testing.assert_array_equal(yi, data[s + 1:s + 17])
  x2, _ = corpus.sample(jnp.asarray(data), jax.random.PRNGKey(0), 64, 16)
  np.testing.assert_array_equal(x, x2)  # deterministic in the key
  x3, _ = corpus.sample(jnp.asarray(data), jax.random.PRNGKey(1), 64, 16)
  assert not np.array_equal(x, x3)
  # The last window start is reachable: starts cover [0, n - T - 1].
  xs, _ = corpus.sample(jnp.asarray(data[:18]), jax.random.PRNGKey(2), 200, 16)
  assert set(np.asarray(xs)[:, 0].tolist()) == {0, 1}


def test_eval_windows_fixed_and_in_bounds():
  data = np.arange(100, dtype=np.uint8)
  x, y = corpus.eval_windows(data, 4, 9)
  np.testing.assert_array_equal(x[:, 0], [0, 30, 60, 90])
  np.testing.assert_array_equal(y[-1], data[91:100])


# ----------------------------------------------- skip rules: NumPy reference --

def ref_olmo(losses, norms, w, sigma, fixed):
  """OLMo-core SkipStepOptimizer, restated with Python lists as in its source."""
  hl, hn, skips = [], [], []
  for l, n in zip(losses, norms):
    hl.append(l), hn.append(n)
    hl, hn = hl[-(w + 1):], hn[-(w + 1):]
    if len(hl) < max(2, w // 2):
      skips.append(False)
      continue
    pl, pn = np.array(hl[:-1]), np.array(hn[:-1])
    if fixed:
      pl, pn = pl[np.isfinite(pl)], pn[np.isfinite(pn)]
    with np.errstate(all="ignore"):
      ok = (l - pl.mean() <= sigma * pl.std(ddof=1)) and (
          n - pn.mean() <= sigma * pn.std(ddof=1))
    if fixed:
      ok = ok and np.isfinite(l) and np.isfinite(n)
    skips.append(not ok)
  return skips


def ref_levanter(losses, norms, w, sigma):
  hl, hn, skips = [], [], []
  for l, n in zip(losses, norms):
    if len(hl) >= max(2, w // 2):
      tl = np.mean(hl) + sigma * max(np.std(hl), 1e-6)
      tn = np.mean(hn) + sigma * max(np.std(hn), 1e-6)
      skips.append(not (l <= tl and n <= tn))
    else:
      skips.append(False)
    hl, hn = (hl + [l])[-w:], (hn + [n])[-w:]
  return skips


def ref_maxtext(losses, norms, w, sigma):
  hl, hn, skips = [], [], []
  for l, n in zip(losses, norms):
    def stats(h):
      h = np.array(h, np.float64)
      mean = h.sum() / max(1, len(h))
      return mean, np.sqrt(((h - mean) ** 2).sum() / max(1, len(h) - 1))
    (ml, sl), (mn, sn) = stats(hl), stats(hn)
    ok = (l - ml <= sigma * sl) and (n - mn <= sigma * sn)
    skips.append(not (ok or len(hl) + 1 < max(2, w // 2)))
    hl, hn = (hl + [l])[-w:], (hn + [n])[-w:]
  return skips


W, SIGMA = 8, 3.0
RULES = {
    "olmo": (lambda i: skip_rules.olmo_skip_step(i, W, SIGMA),
             lambda l, n: ref_olmo(l, n, W, SIGMA, False)),
    "olmo_fix": (lambda i: skip_rules.olmo_skip_step(i, W, SIGMA, fixed=True),
                 lambda l, n: ref_olmo(l, n, W, SIGMA, True)),
    "levanter": (lambda i: skip_rules.levanter_skip_bad_steps(i, W, SIGMA),
                 lambda l, n: ref_levanter(l, n, W, SIGMA)),
    "maxtext": (lambda i: skip_rules.maxtext_skip_step_on_spikes(i, W, SIGMA),
                lambda l, n: ref_maxtext(l, n, W, SIGMA)),
}


INNER = {"sgd": lambda: optax.sgd(1.0), "adam": lambda: optax.adam(0.1)}
_COMPILED = {}


def compiled(rule, inner):
  """``(tx, jitted update)`` for a rule around an inner optimizer, built once."""
  if (rule, inner) not in _COMPILED:
    tx = RULES[rule][0](INNER[inner]())
    p = {"w": jnp.zeros(2)}
    _COMPILED[rule, inner] = tx, jax.jit(
        lambda g, s, l: tx.update({"w": g}, s, p, value=l))
  return _COMPILED[rule, inner]


def drive(rule, inner, losses, grads):
  """Runs a rule on ``{"w": g}`` per step; returns skip flags, updates, states."""
  tx, update = compiled(rule, inner)
  state = tx.init({"w": jnp.zeros(2)})
  skips, ups, states = [], [], [state]
  for l, g in zip(losses, grads):
    u, state = update(jnp.asarray(g, jnp.float32), state, jnp.float32(l))
    skips.append(bool(state.skipped))
    ups.append(np.asarray(u["w"]))
    states.append(state)
  return skips, ups, states


def series(seed=0, steps=40, nan_at=(), spike_at=()):
  """Losses and 2-vector gradients (norm ~1) with spikes and NaNs: noisy for
  a seed, alternating +-5% (never 3 sigma out) for ``seed=None``."""
  if seed is None:
    wobble = 1 + 0.05 * (-1.0) ** np.arange(steps)
    losses, grads = 3 * wobble, np.outer(wobble, [0.6, 0.8])
  else:
    rng = np.random.default_rng(seed)
    losses = 3 + 0.1 * rng.normal(size=steps)
    grads = rng.normal(size=(steps, 2)) * 0.05 + [0.6, 0.8]
  for t in spike_at:
    grads[t] *= 50
  for t in nan_at:
    grads[t, 0] = np.nan
    losses[t] = np.nan
  return losses, grads


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("seed", [0])
def test_rule_matches_numpy_restatement(rule, seed):
  make, ref = RULES[rule]
  losses, grads = series(seed, 40, nan_at=(20,), spike_at=(3, 12, 33))
  skips, _, _ = drive(rule, "sgd", losses, grads)
  norms = [float(np.sqrt(np.sum(g ** 2))) for g in grads]
  assert skips == ref(list(losses), norms)
  assert skips[12]  # a x50 norm spike after warm-up is skipped by every rule


def test_warmup_boundaries_hand_computed():
  # Window 8 -> skipping allowed once max(2, 4) values are in: OLMo and
  # MaxText count the current value, Levanter only the previous ones. A x50
  # spike at step 3 (3 previous values) is skipped by OLMo/MaxText only.
  losses, grads = series(None, 6, spike_at=(3,))
  got = {r: drive(r, "sgd", losses, grads)[0][3] for r in RULES}
  assert got == {"olmo": True, "olmo_fix": True, "levanter": False,
                 "maxtext": True}


@pytest.mark.parametrize("rule", ["olmo", "levanter", "maxtext"])
def test_one_nan_poisons_the_old_rules_for_a_window(rule):
  losses, grads = series(None, 40, nan_at=(20,))
  skips, _, _ = drive(rule, "sgd", losses, grads)
  # The NaN sits in the history for the next W steps: all skipped, then none.
  assert skips[20:21 + W] == [True] * (W + 1)
  assert not any(skips[21 + W:]) and not any(skips[:20])


def test_olmo_pr424_skips_only_the_nan_step():
  losses, grads = series(None, 40, nan_at=(20,))
  skips, _, _ = drive("olmo_fix", "sgd", losses, grads)
  assert [t for t, s in enumerate(skips) if s] == [20]


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


@pytest.mark.parametrize("rule,update_nan,state_nan", [
    ("olmo", True, True), ("olmo_fix", True, True),   # 0 * NaN = NaN
    ("levanter", True, False),                        # where keeps moments
    ("maxtext", False, False)])                       # lax.cond: zero, frozen
def test_whether_a_skipped_nan_step_reaches_params_and_moments(
    rule, update_nan, state_nan):
  losses, grads = series(None, 12)
  grads[10, 0] = np.nan  # NaN gradient, finite loss, after warm-up
  skips, ups, states = drive(rule, "adam", losses, grads)
  assert skips[10]
  assert np.isnan(ups[10]).any() == update_nan
  assert (not _finite(states[11].inner_state)) == state_nan
  if not state_nan:  # the moments are exactly the ones before the step
    jax.tree.map(np.testing.assert_array_equal, states[11].inner_state,
                 states[10].inner_state)
  if not update_nan:
    np.testing.assert_array_equal(ups[10], 0.0)


def test_nan_in_warmup_passes_every_rule():
  losses, grads = series(None, 4)
  grads[1, 0] = np.nan
  for rule in RULES:
    skips, ups, _ = drive(rule, "sgd", losses, grads)
    assert not skips[1] and np.isnan(ups[1]).any(), rule


@pytest.mark.parametrize("rule", list(RULES))
def test_finite_skip_freezes_state_and_normal_steps_equal_inner(rule):
  losses, grads = series(None, 16, spike_at=(12,))
  inner = INNER["adam"]()
  skips, ups, states = drive(rule, "adam", losses, grads)
  assert [t for t, s in enumerate(skips) if s] == [12]
  np.testing.assert_array_equal(ups[12], 0.0)
  jax.tree.map(np.testing.assert_array_equal, states[13].inner_state,
               states[12].inner_state)
  # Before the skip, the wrapper's updates are exactly the inner optimizer's.
  p, s = {"w": jnp.zeros(2)}, inner.init({"w": jnp.zeros(2)})
  for t in range(12):
    u, s = inner.update({"w": jnp.asarray(grads[t], jnp.float32)}, s, p)
    np.testing.assert_allclose(ups[t], np.asarray(u["w"]), rtol=1e-6)


def test_rules_need_the_loss():
  tx = skip_rules.maxtext_skip_step_on_spikes(optax.sgd(1.0), 8)
  p = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="loss"):
    tx.update(p, tx.init(p), p)


def test_apply_if_finite_keeps_nan_out_and_finds_state():
  inner = optax.adam(0.1)
  tx = optax.apply_if_finite(inner, 10)
  p = {"w": jnp.zeros(2)}
  s = tx.init(p)
  u, s = tx.update({"w": jnp.ones(2)}, s, p)
  before = s.inner_state
  u, s = tx.update({"w": jnp.array([np.nan, 1.0])}, s, p)
  np.testing.assert_array_equal(u["w"], 0.0)
  jax.tree.map(np.testing.assert_array_equal, s.inner_state, before)
  assert skip_rules.find_states(s) == [s]
