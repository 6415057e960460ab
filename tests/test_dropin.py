"""Drop-in for optax's stateless clips (state=None, integer leaves), one rule
for ``inf`` thresholds across the library, an empty history in diagnose."""

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtransforms as gt
from gradtransforms.catalogue import CATALOGUE

# --- state=None, as optax's stateless clips -------------------------------------

STATIC = sorted(n for n, e in CATALOGUE.items() if e.group == "static")
U = {"w": jnp.asarray([[3.0, -4.0, 0.5], [0.1, 2.0, -7.0]]),
     "b": jnp.asarray([0.5, -9.0, 1e-3], jnp.bfloat16)}
P = {"w": jnp.asarray([[1.0, 0.5, -0.2], [0.0, 0.3, 2.0]]),
     "b": jnp.asarray([1.0, 0.0, -1.0], jnp.bfloat16)}


def _updates(entry):
  return jax.tree.map(lambda x: jnp.stack([x, -2 * x]), U) if entry.batch_axis else U


@pytest.mark.parametrize("name", STATIC)
def test_static_clips_take_a_none_state(name):
  entry = CATALOGUE[name]
  tx, u = entry.test(), _updates(CATALOGUE[name])
  ref = tx.update(u, tx.init(P), P)
  same = lambda a, b: np.testing.assert_allclose(  # jit fuses: to rounding
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)
  for got in (tx.update(u, None, P),  # the step from a fresh state
              jax.jit(lambda u, p: tx.update(u, None, p))(u, P)):
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    jax.tree.map(same, got, ref)


def test_optax_suite_calls_work():
  """The calls optax's own tests make."""
  def close(a, b):  # bfloat16: optax divides, ours multiply by the inverse
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32),
                               rtol=1e-2 if a.dtype == jnp.bfloat16 else 1e-6)
  out, _ = gt.clip_by_block_rms(1.0).update(U, None)
  ref, _ = optax.clip_by_block_rms(1.0).update(U, None)
  jax.tree.map(close, out, ref)
  out, _ = gt.adaptive_grad_clip(0.1).update(U, None, P)
  ref, _ = optax.adaptive_grad_clip(0.1).update(U, None, P)
  jax.tree.map(close, out, ref)


# --- integer leaves ----------------------------------------------------------------

UI = {"a": jnp.asarray([1, -5, 3, 0], jnp.int32),
      "b": jnp.asarray([[2, 7], [-11, 1]], jnp.int8)}  # squares fit in int8
PI = {"a": jnp.asarray([2, 1, -1, 0], jnp.int32),
      "b": jnp.asarray([[1, 1], [3, -2]], jnp.int8)}


def _same(out, ref):
  assert jax.tree.structure(out) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(b, np.float64), rtol=1e-6)


@pytest.mark.parametrize("ours,theirs", [
    (lambda: gt.clip_by_value(2), lambda: optax.clip(2)),  # stays integer
    (lambda: gt.clip_by_value(2.5), lambda: optax.clip(2.5)),  # float32
    (lambda: gt.clip_by_block_rms(2.0), lambda: optax.clip_by_block_rms(2.0)),
    (lambda: gt.clip_by_block_rms(1e9), lambda: optax.clip_by_block_rms(1e9)),
    (lambda: gt.adaptive_grad_clip(0.1), lambda: optax.adaptive_grad_clip(0.1)),
], ids=["clip-int", "clip-float", "block_rms", "block_rms-noclip", "agc"])
def test_integer_leaves_as_optax(ours, theirs):
  ref, _ = theirs().update(UI, None, PI)
  for state in (None, ours().init(PI)):
    out, _ = ours().update(UI, state, PI)
    _same(out, ref)
  out, _ = jax.jit(ours().update)(UI, ours().init(PI), PI)
  _same(out, ref)


@pytest.mark.parametrize("ours,theirs", [
    (gt.clip_by_block_rms(2.0), optax.clip_by_block_rms(2.0)),
    (gt.adaptive_grad_clip(0.1), optax.adaptive_grad_clip(0.1))])
def test_integer_squares_do_not_wrap(ours, theirs):
  """Where optax differs: it squares integer leaves in their own dtype
  (int8 wraps from |x| >= 12); ours square in float32, as the float input."""
  u = {"b": jnp.asarray([[100, -128], [3, 1]], jnp.int8)}
  f = {"b": jnp.asarray(u["b"], jnp.float32)}
  out, _ = ours.update(u, None, f)
  ref, _ = ours.update(f, None, f)
  _same(out, ref)
  wrapped, _ = theirs.update(u, None, f)
  assert not np.allclose(wrapped["b"], ref["b"])  # optax's wrapped squares


def test_integer_per_example_leaves_as_optax():
  g = {"a": jnp.asarray([[1, 2], [30, 40], [0, 0]], jnp.int32)}
  ref, _ = optax.per_example_global_norm_clip(list(g.values()), 5.0)
  out, _ = gt.per_example_clip(5.0, reduce="sum").update(g, None)
  _same(list(out.values()), ref)


@pytest.mark.parametrize("make", [lambda: gt.clip_by_global_norm(1.0),
                                  lambda: gt.clip_by_leaf_norm(1.0)])
def test_integer_leaves_are_refused_where_optax_fails(make):
  """optax.clip_by_global_norm fails on integer leaves (lax.select of
  float32 and int32); ours say so up front; clip_by_leaf_norm as well."""
  with pytest.raises(TypeError, match="floating-point"):
    make().update(UI, make().init(UI))


@pytest.mark.parametrize("name", STATIC)
def test_bool_and_complex_leaves_are_refused(name):
  entry = CATALOGUE[name]
  tx = entry.test()
  for bad in (jnp.asarray([True, False]), jnp.asarray([1j, 2.0])):
    u = {"x": jnp.stack([bad, bad]) if entry.batch_axis else bad}
    with pytest.raises(TypeError, match="updates"):
      tx.update(u, None, {"x": jnp.ones(2)})


# --- +inf thresholds: accepted everywhere, never clip / never trigger ------------

THRESHOLD = re.compile(r"thresh|^max_(?!consecutive)|clip$|^clipping$|^l2_|"
                       r"_factor$|^threshold$")
NOT_THRESHOLD = {"clip_factor"}  # a factor of zclip's clip value: finite


def _factory(name):
  return getattr(gt, name)


def _threshold_args(name):
  sig = inspect.signature(_factory(name))
  return [a for a, p in sig.parameters.items()
          if THRESHOLD.search(a) and a not in NOT_THRESHOLD and
          not isinstance(p.default, (bool, int, str))]


def _build(name, **kw):
  sig = inspect.signature(_factory(name))
  if "inner" in sig.parameters:
    kw["inner"] = optax.sgd(1.0)
  if "warmup_steps" in sig.parameters:
    kw.setdefault("warmup_steps", 2)
  for a, p in sig.parameters.items():  # other required arguments: a bound
    if p.default is inspect.Parameter.empty and a not in kw:
      kw[a] = 1.0
  return _factory(name)(**kw)


THRESHOLDS = [(n, a) for n in sorted(CATALOGUE) for a in _threshold_args(n)]


def test_the_battery_sees_the_thresholds_we_know():
  known = {("zclip", "z_thresh"), ("zclip", "max_grad_norm"),
           ("detect_spikes", "z_thresh"), ("detect_spikes", "loss_z_thresh"),
           ("guard", "z_thresh"), ("guard", "loss_z_thresh"),
           ("adagc", "relative_threshold"), ("adagc", "max_norm"),
           ("clippy", "relative_factor"), ("clippy", "absolute_factor"),
           ("clip_by_global_norm", "max_norm"), ("clip_by_value", "max_abs"),
           ("adaptive_grad_clip", "clipping"), ("spike_clip", "threshold"),
           ("per_example_clip", "l2_norm_clip"),
           ("quantile_clip", "initial_clip")}
  assert known <= set(THRESHOLDS), known - set(THRESHOLDS)


@pytest.mark.parametrize("name,arg", THRESHOLDS,
                         ids=[f"{n}-{a}" for n, a in THRESHOLDS])
def test_threshold_accepts_inf_and_refuses_nan_and_minus_inf(name, arg):
  _build(name, **{arg: math.inf})
  _build(name, **{arg: np.float32(np.inf)})
  for bad in (math.nan, -math.inf):
    with pytest.raises(ValueError, match=arg):
      _build(name, **{arg: bad})


def _spiky_grads(entry, t):
  rng = np.random.default_rng(t)
  g = {"w": rng.normal(size=(3, 4)) * (1e4 if t == 5 else 1.0),
       "b": rng.normal(size=(4,))}
  if entry.batch_axis:
    g = {k: np.stack([v, 3 * v]) for k, v in g.items()}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)


@pytest.mark.parametrize("name", sorted({n for n, _ in THRESHOLDS}))
def test_all_thresholds_inf_never_clip_or_trigger(name):
  """Every threshold +inf at once: the transform passes updates unchanged
  (around: the inner sgd(1) step, never skipped; an optimizer such as spam,
  without its post-reset warm-up: optax.adam's update), through a 1e4x
  spike."""
  entry = CATALOGUE[name]
  optimizer = entry.placement == "optimizer"
  kw = dict(warmup_steps=0) if optimizer else {}
  tx = _build(name, **kw, **{a: math.inf for a in _threshold_args(name)})
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  state = tx.init(params)
  adam = optax.adam(1.0)
  adam_state = adam.init(params)
  update = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v)
                   if entry.placement == "around" or "detect" in name
                   else tx.update(g, s, params))
  for t in range(7):
    g = _spiky_grads(entry, t)
    out, state = update(g, state, jnp.float32(1e4 if t == 5 else 1.0))
    want = jax.tree.map(lambda x: jnp.mean(x, 0), g) if entry.batch_axis else g
    if entry.placement == "around":
      want = jax.tree.map(lambda x: -x, want)
    tol = dict(rtol=1e-6)
    if optimizer:
      want, adam_state = adam.update(g, adam_state, params)
      tol = dict(rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol),
                 out, want)
  m = gt.metrics(state)
  for k, v in m.items():
    if k.endswith(("spike_count", "/clipped", "/skip", "skip_count",
                   "/norm_spike", "/loss_spike", "/spike")):
      assert not np.any(np.asarray(v)), (k, v)


# --- diagnose: an empty history -----------------------------------------------

@pytest.mark.parametrize("history", [
    {"monitor/norm": np.zeros((0,))}, {"monitor/norm": []},
    {"monitor/norm": np.zeros((0,)), "monitor/leaf_norm/w": np.zeros((0,))},
    []])
def test_diagnose_says_the_history_is_empty(history):
  with pytest.raises(ValueError, match="history is empty"):
    gt.diagnose(history)
