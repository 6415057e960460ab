"""Bad and unusual inputs: arguments, +inf bounds, empty trees, zero-size
leaves, low precision, saturating counters (issue 13)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_tree

import gradtransforms as gt
from gradtransforms import _checks

# --- the argument battery ------------------------------------------------------

_NOT_A_SCALAR = [None, True, "1.0", [1.0], (1.0,), {"a": 1.0}, jnp.ones(2),
                 np.float32(np.nan), float("nan"), 1j, optax.adam]
BAD = {
    # a real number >= 0 or +inf
    "bound": _NOT_A_SCALAR + [-1.0, -np.inf],
    # a real number > 0 or +inf
    "bound_or_none": _NOT_A_SCALAR[1:] + [-1.0, -np.inf],
    "bound+": _NOT_A_SCALAR + [0.0, -1.0, -np.inf],
    "positive": _NOT_A_SCALAR + [0.0, -1.0, np.inf],
    "nonnegative": _NOT_A_SCALAR + [-1e-9, np.inf],
    "unit": _NOT_A_SCALAR + [-0.1, 1.0, np.inf],  # [0, 1)
    "closed_unit": _NOT_A_SCALAR + [-0.1, 1.5, np.inf],  # [0, 1]
    "percent": _NOT_A_SCALAR + [-1.0, 100.5, np.inf],
    "int>=1": [None, True, 1.5, "3", [3], jnp.ones(2, jnp.int32), 0, -1],
    "bool": [None, "yes", "False", 1, 0, [True], jnp.ones(2, bool)],
    "axis_name": [1, True, ["batch"], ("batch", 1), ()],
    "axis": [1.5, "0", True, (0, None), [0.5], {0: 1}],
}

# (factory, argument, kind, other arguments)
ARGS = [
    (gt.adaptive_grad_clip, "clipping", "bound", {}),
    (gt.adaptive_grad_clip, "eps", "nonnegative", {"clipping": 0.1}),
    (gt.adaptive_grad_clip, "axis", "axis", {"clipping": 0.1}),
    (gt.zclip, "decay", "unit", {}),
    (gt.zclip, "z_thresh", "bound+", {}),
    (gt.zclip, "max_grad_norm", "bound_or_none", {}),
    (gt.zclip, "eps", "nonnegative", {}),
    (gt.zclip, "warmup_steps", "int>=1", {}),
    (gt.zclip, "clip_factor", "positive", {}),
    (gt.zclip, "skip_update_on_spike", "bool", {}),
    (gt.zclip, "axis_name", "axis_name", {}),
    (gt.autoclip, "percentile", "percent", {}),
    (gt.autoclip, "history", "int>=1", {}),
    (gt.autoclip, "axis_name", "axis_name", {}),
    (gt.quantile_clip, "target_quantile", "closed_unit", {}),
    (gt.quantile_clip, "learning_rate", "positive", {}),
    (gt.quantile_clip, "initial_clip", "bound+", {}),
    (gt.quantile_clip, "axis_name", "axis_name", {}),
    (gt.spike_clip, "threshold", "bound+", {}),
    (gt.spike_clip, "decay", "unit", {}),
    (gt.spike_clip, "axis_name", "axis_name", {}),
    (gt.per_example_clip, "l2_norm_clip", "bound", {}),
    (gt.per_example_clip, "axis_name", "axis_name", {"l2_norm_clip": 1.0}),
    (gt.with_moment_reset, "interval", "int>=1", {"inner": optax.adam(1e-3)}),
    (gt.spam, "b1", "unit", {"learning_rate": 1e-3}),
    (gt.spam, "b2", "unit", {"learning_rate": 1e-3}),
    (gt.spam, "eps", "nonnegative", {"learning_rate": 1e-3}),
    (gt.spam, "threshold", "bound+", {"learning_rate": 1e-3}),
    (gt.spam, "interval", "int>=1", {"learning_rate": 1e-3}),
    (gt.spam, "weight_decay", "nonnegative", {"learning_rate": 1e-3}),
]
CASES = [(f, arg, v, kw) for f, arg, kind, kw in ARGS for v in BAD[kind]]


@pytest.mark.parametrize("factory,arg,value,kw", CASES, ids=[
    f"{f.__name__}-{a}-{i}" for i, (f, a, _, _) in enumerate(CASES)])
def test_every_bad_argument_is_named_at_construction(factory, arg, value, kw):
  with pytest.raises((TypeError, ValueError), match=arg):
    factory(**kw, **{arg: value})


@pytest.mark.parametrize("factory,arg,value,kw", [
    (gt.zclip, "mode", "median", {}), (gt.zclip, "mode", None, {}),
    (gt.zclip, "mode", ["zscore"], {}), (gt.zclip, "clip_option", 1, {}),
    (gt.zclip, "clip_option", "max", {}),
    (gt.per_example_clip, "reduce", "median", {"l2_norm_clip": 1.0}),
    (gt.per_example_clip, "reduce", None, {"l2_norm_clip": 1.0}),
    (gt.with_moment_reset, "inner", None, {}),
    (gt.with_moment_reset, "inner", optax.adam, {}),
    (gt.with_moment_reset, "inner", 0.1, {}),
])
def test_string_and_transformation_arguments(factory, arg, value, kw):
  with pytest.raises((TypeError, ValueError), match=arg):
    factory(**kw, **{arg: value})


def test_list_threshold_and_string_boolean_are_refused():
  # clip_by_global_norm([1.0]) used to run, with outputs of another shape.
  with pytest.raises(TypeError, match="max_norm must be a scalar"):
    gt.clip_by_global_norm([1.0])
  with pytest.raises(TypeError, match="skip_update_on_spike"):
    gt.zclip(skip_update_on_spike="False")  # a non-empty string is truthy
  with pytest.raises(TypeError, match="factory"):
    gt.with_moment_reset(optax.adam)


def test_checks_accept_scalars_of_every_kind():
  for v in (1, 1.5, np.float32(2.0), np.int64(3), jnp.asarray(0.5),
            np.asarray(4.0)):
    _checks.positive("x", v)
    _checks.bound("x", v)
  _checks.bound("x", np.inf)
  _checks.bound("x", jnp.asarray(jnp.inf))
  _checks.bound("x", 0.0)
  with pytest.raises(ValueError, match="x must be > 0"):
    _checks.bound("x", 0.0, strict=True)
  _checks.nonnegative("x", np.inf, allow_inf=True)
  with pytest.raises(ValueError, match="x must be finite"):
    _checks.nonnegative("x", np.inf)
  with pytest.raises(ValueError, match="NaN"):
    _checks.bound("x", np.nan)
  assert _checks.boolean("b", np.bool_(True)) is True
  assert _checks.boolean("b", False) is False
  assert _checks.axis_name("a", ("x", "y")) == ("x", "y")

  @jax.jit
  def traced(v):  # inject_hyperparams inside jit: let through unchecked
    _checks.bound("x", v)
    _checks.in_range("y", v, 0.0, 1.0)
    return v
  traced(jnp.float32(-5.0))
  with pytest.raises(TypeError, match="x must be a scalar"):
    jax.jit(lambda v: _checks.bound("x", v))(jnp.ones(3))
  with pytest.raises(TypeError, match="b is static"):
    jax.jit(lambda v: _checks.boolean("b", v))(jnp.bool_(True))


def test_injected_hyperparameters_still_work():
  t = random_tree(0)
  tx = optax.inject_hyperparams(gt.adaptive_grad_clip)(clipping=0.01)
  state = tx.init(t)
  out, state = jax.jit(tx.update)(random_tree(1), state, t)
  ref, _ = optax.adaptive_grad_clip(0.01).update(random_tree(1), None, t)
  chex.assert_trees_all_close(out, ref, rtol=1e-6)
  tx = optax.inject_hyperparams(gt.spike_clip)(threshold=jnp.inf)
  out, _ = jax.jit(tx.update)(t, tx.init(t))
  chex.assert_trees_all_equal(out, t)


# --- +inf bounds never clip -----------------------------------------------------


def test_infinite_bounds_never_clip():
  g = random_tree(3, scale=50.0)
  small = random_tree(4, scale=1e-3)

  def run(tx, updates, params=None, steps=3):
    state, step = tx.init(updates), jax.jit(tx.update)
    for i in range(steps):
      u = jax.tree.map(lambda x: x * (1 + 100.0 * (i == steps - 1)), updates)
      out, state = step(u, state, params)
    return u, out
  for tx in (gt.zclip(max_grad_norm=np.inf, warmup_steps=1, z_thresh=np.inf),
             gt.quantile_clip(initial_clip=np.inf),
             gt.spike_clip(threshold=np.inf, decay=0.5)):
    u, out = run(tx, small)
    chex.assert_trees_all_close(out, u, rtol=1e-6)
  agc = gt.adaptive_grad_clip(np.inf)
  out, state = agc.update(g, agc.init(small), small)
  chex.assert_trees_all_equal(out, g)
  # zclip: max_grad_norm=inf is max_grad_norm=None
  a = run(gt.zclip(max_grad_norm=np.inf, warmup_steps=2), small)[1]
  b = run(gt.zclip(max_grad_norm=None, warmup_steps=2), small)[1]
  chex.assert_trees_all_equal(a, b)
  batch = jax.tree.map(lambda x: jnp.stack([x, -3 * x]), g)
  out, state = gt.per_example_clip(np.inf, reduce="sum").update(batch, None)
  chex.assert_trees_all_close(out, jax.tree.map(lambda x: -2 * x, g), rtol=1e-6)
  assert float(state.clip_fraction) == 0.0


# --- with_moment_reset ----------------------------------------------------------


@pytest.mark.parametrize("inner", [optax.sgd(0.1, momentum=0.9),
                                   optax.lion(1e-3), optax.identity()])
def test_moment_reset_refuses_an_optimizer_without_adam_moments(inner):
  tx = gt.with_moment_reset(inner, interval=2)
  with pytest.raises(ValueError, match="no optax.ScaleByAdamState"):
    tx.init(random_tree(0))


def test_moment_reset_finds_adam_inside_wrappers():
  inner = optax.chain(optax.clip(1.0),
                      optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
  tx = gt.with_moment_reset(inner, interval=2)
  t = random_tree(0)
  state = tx.init(t)
  for _ in range(3):
    _, state = tx.update(t, state, t)
  assert int(state.resets) == 1 and int(state.step) == 3


# --- per_example_clip without a batch axis ----------------------------------------


@pytest.mark.parametrize("tree,match", [
    ({"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))}, r"'a': 4, 'b': 3"),
    ({"a": jnp.ones((4, 2)), "s": jnp.ones(())}, r"\['s'\] are scalars"),
    (jnp.ones(()), "scalars"),
])
def test_per_example_needs_a_common_batch_axis(tree, match):
  tx = gt.per_example_clip(1.0)
  with pytest.raises(ValueError, match=match):
    tx.update(tree, tx.init(tree))


def test_per_example_empty_batch_gives_zeros():
  for reduce in ("mean", "sum"):
    g = {"w": jnp.zeros((0, 3)), "b": jnp.zeros((0,))}
    out, state = gt.per_example_clip(1.0, reduce=reduce).update(g, None)
    chex.assert_trees_all_equal(out, {"w": jnp.zeros((3,)), "b": jnp.zeros(())})
    assert [float(x) for x in state] == [0.0, 0.0, 0.0]


def test_per_example_nonfinite_example_passes_unscaled():
  g = {"w": jnp.asarray([[jnp.inf, 0.0], [3.0, 4.0]])}
  out, state = gt.per_example_clip(1.0, reduce="sum").update(g, None)
  np.testing.assert_allclose(out["w"], [np.inf, 0.8], rtol=1e-6)
  assert float(state.clip_fraction) == 0.5


# --- empty trees, zero-size leaves, low precision: every transform ---------------

MINE = {
    "adaptive_grad_clip": lambda: gt.adaptive_grad_clip(0.1),
    "zclip": lambda: gt.zclip(warmup_steps=1),
    "autoclip": lambda: gt.autoclip(history=4),
    "quantile_clip": gt.quantile_clip,
    "spike_clip": lambda: gt.spike_clip(threshold=4.0),
    "per_example_clip": lambda: gt.per_example_clip(1.0),
    # (eps=1e-3: Adam's default 1e-8 is 0 in float16)
    "with_moment_reset": lambda: gt.with_moment_reset(optax.adam(1e-2, eps=1e-3), 2),
    "spam": lambda: gt.spam(1e-2, eps=1e-3, threshold=4.0, interval=2),
}


def _steps(name, tree, n=3):
  tx = MINE[name]()
  state, step = tx.init(tree), jax.jit(tx.update)
  for _ in range(n):
    out, state = step(tree, state, tree)
  return out, state, step


@pytest.mark.parametrize("name", sorted(MINE))
@pytest.mark.parametrize("empty", [{}, [], ()], ids=["dict", "list", "tuple"])
def test_empty_trees(name, empty):
  out, state, _ = _steps(name, empty, n=2)
  assert out == empty and type(out) is type(empty)
  gt.metrics(state)  # figures are readable


@pytest.mark.parametrize("name", sorted(MINE))
def test_zero_size_leaves(name):
  t = {"e": jnp.zeros((4, 0)), "w": jnp.full((4, 3), 2.0),
       "f": jnp.zeros((0, 3, 2))}
  if name == "per_example_clip":
    t["f"] = jnp.zeros((4, 0, 2))
  out, state, _ = _steps(name, t)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      out, t if name != "per_example_clip" else
      jax.tree.map(lambda x: x[0], t))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  assert np.any(np.asarray(out["w"]) != 0)


@pytest.mark.parametrize("name", sorted(MINE))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_keeps_dtype_and_structure(name, dtype):
  t = jax.tree.map(lambda x: x.astype(dtype), random_tree(9))
  if name == "per_example_clip":
    t = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), t)
  out, state, step = _steps(name, t)
  want = t if name != "per_example_clip" else jax.tree.map(lambda x: x[0], t)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, want)
  assert jax.tree.structure(out) == jax.tree.structure(want)
  assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
             for x in jax.tree.leaves(out))
  assert step._cache_size() == 1  # the state's types do not drift


# --- counters saturate instead of wrapping ----------------------------------------

_MAX = 2**31 - 1


def test_counters_saturate():
  t = {"w": jnp.asarray([1.0, -2.0, 3.0])}
  big = jnp.asarray(_MAX - 1, jnp.int32)
  # zclip: observed wrapped to -2**31 and the warm-up restarted
  tx = gt.zclip(warmup_steps=2, max_grad_norm=None)
  s = tx.init(t)
  for _ in range(3):
    _, s = tx.update(t, s)
  s = s._replace(observed=big)
  for _ in range(3):
    out, s = tx.update(jax.tree.map(lambda x: 50 * x, t), s)
  assert int(s.observed) == _MAX and bool(s.spike)  # still past warm-up
  # spike_clip: step wrapped negative and clipping stopped
  tx = gt.spike_clip(threshold=4.0, decay=0.5)
  s = tx.init(t)
  _, s = tx.update(t, s)
  s = s._replace(step=big)
  for _ in range(2):
    _, s = tx.update(t, s)
  out, s = tx.update(jax.tree.map(lambda x: 100 * x, t), s)
  assert int(s.step) == _MAX and bool(s.clipped)
  np.testing.assert_array_less(np.abs(out["w"]), 100 * np.abs(t["w"]))
  # autoclip and with_moment_reset
  tx = gt.autoclip(50.0, history=4)
  s = tx.init(t)._replace(observed=big)
  for _ in range(2):
    _, s = tx.update(t, s)
  assert int(s.observed) == _MAX
  tx = gt.with_moment_reset(optax.adam(1e-2), interval=3)
  s = tx.init(t)
  s = s._replace(step=big, resets=big)
  for _ in range(2):
    _, s = tx.update(t, s, t)
  assert int(s.step) == _MAX and int(s.resets) >= _MAX - 1
