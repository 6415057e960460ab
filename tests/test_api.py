"""Properties every public transform shares: donation, jit, chain, docs."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_tree

import gradtransforms as gt

from gradtransforms.catalogue import CATALOGUE

# Every public transform that takes an ordinary gradient tree.
ALL = {k: e for k, e in CATALOGUE.items() if not e.batch_axis}


def test_catalogue_lists_every_public_transform():
  """Adding a transform means adding it to __init__ and the catalogue."""
  public = {n for n in gt.__all__ if callable(getattr(gt, n)) and n[0].islower()
            and n not in {"metrics", "dashboard", "leaf_names", "culprits",
                          "diagnose"}}
  assert public == set(CATALOGUE)


@pytest.mark.parametrize("name", sorted(ALL))
def test_donated_jit_step_chained_with_adam(name):
  """Three donated, jitted steps (the executable the structure tests below
  read): finite params, no retrace, no private figure in the metrics."""
  params, step, _ = _adam_step(name)
  rng = np.random.default_rng(1)
  tx = ALL[name].build(optax.adam(1e-3))
  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  for _ in range(3):
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    params, state = step(params, state, grads)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert step._cache_size() == 1
  assert all(not k.startswith("@") for k in gt.metrics(state))


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_state_array_count_does_not_grow_with_leaves(name):
  """GPU-first layout: per-leaf figures are stacked vectors, so a
  transform's own state has as many arrays for 64 leaves as for 8
  (parameter-shaped arrays such as moments excepted)."""
  entry = CATALOGUE[name]

  def count(n):
    params = {f"l{i:02d}": jnp.ones((3, 2)) for i in range(n)}
    if entry.placement == "around":
      tx = entry.test()(optax.adam(0.1))  # moments are parameter-shaped
    else:
      tx = entry.test()
    state = tx.init(params)
    shaped = {x.shape for x in jax.tree.leaves(params)}
    return sum(1 for x in jax.tree.leaves(state)
               if not (x.shape in shaped and x.ndim))
  assert count(8) == count(64)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_public_transforms_document_formula_defaults_and_args(name):
  doc = getattr(gt, name).__doc__
  assert doc and "Args:" in doc and "State:" in doc or name == "with_moment_reset"


def test_metrics_through_multi_transform_and_duplicates():
  params = {"enc": random_tree(0), "dec": random_tree(1)}
  labels = {"enc": jax.tree.map(lambda _: "a", params["enc"]),
            "dec": jax.tree.map(lambda _: "b", params["dec"])}
  tx = optax.multi_transform(
      {"a": optax.chain(gt.clip_by_global_norm(1.0), optax.sgd(0.1)),
       "b": optax.chain(gt.clip_by_global_norm(2.0), optax.adam(1e-3))}, labels)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  m = gt.metrics(state)
  assert set(m) == {"clip_by_global_norm@a.0/norm", "clip_by_global_norm@a.0/scale",
                    "clip_by_global_norm@b.0/norm", "clip_by_global_norm@b.0/scale"}
  from conftest import np_global_norm
  np.testing.assert_allclose(m["clip_by_global_norm@a.0/norm"],
                             np_global_norm(params["enc"]), rtol=1e-5)


def test_readme_example_runs():
  params = random_tree(0)
  loss_fn = lambda p, batch: sum(jnp.sum((x * batch) ** 2) for x in jax.tree.leaves(p))
  tx = gt.guard(optax.chain(gt.zclip(), optax.adamw(3e-4)), on="spike",
                max_consecutive_errors=10)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  params, state, loss = step(params, state, jnp.float32(1.0))
  m = gt.metrics(state)
  for key in ("detect_spikes/norm", "detect_spikes/norm_zscore", "guard/skipped",
              "guard/halt", "zclip/threshold", "zclip/clipped"):
    assert key in m
  assert set(gt.culprits(state, params)) >= {"detect_spikes/culprit"}


def test_inject_hyperparams_with_static_and_string_arguments():
  p = {"a": jnp.ones(3)}
  tx = optax.inject_hyperparams(gt.zclip, static_args=("warmup_steps",))(
      decay=0.9, mode="percentile", max_grad_norm=None, warmup_steps=2)
  s = tx.init(p)
  for _ in range(3):
    _, s = jax.jit(tx.update)(p, s)
  assert int(gt.metrics(s)["zclip/observed"]) == 3
  np.testing.assert_allclose(gt.metrics(s)["zclip/norm"], np.sqrt(3.0), rtol=1e-6)
  bad = optax.inject_hyperparams(gt.zclip)(warmup_steps=2)
  s = bad.init(p)  # concrete at init: accepted
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(bad.update)(p, s)


# Parameter-sized buffers a compiled Adam step may allocate besides Adam's
# own, as a multiple of the parameters' bytes (XLA's buffer assignment, so
# no timing). Each one is a write and a read, and on CPU a freshly
# page-faulted allocation every step: the main cost of a clip, if any.
EXTRA_BUFFERS = {
    # one leaf's isfinite mask of the output check, a byte per entry: a
    # quarter of the largest leaf, 0.08 here (the step itself is taken in
    # place: _in_place.step); the update, before (1.0)
    "guard": 0.08,
    # the update (its reduction and apply_updates both read it); and where
    # leaves share a shape, XLA:CPU shares and materialises the scalar
    # broadcasts of its reduction (the learning rate's among them): ~1 more.
    "clippy": 2.0,
    # XLA:CPU materialises the scalar broadcasts that the clip figure's
    # reduction (a YNNPACK fusion) shares among leaves of one shape: two
    # per shape (none for leaves of unique shape). No copy of v any more
    # (that was 1.0 more:
    # test_state_updated_in_place_where_leaves_share_a_shape)
    "spam": 1.0,
    # its guard's (rewind's rare work copies nothing: see
    # gradtransforms/_snapshot.py)
    "rewind": 0.08,
}


_SHAPES = [(256, 384), (256, 384), (384, 128), (384, 128), (128, 64), (512,)]


@functools.lru_cache(maxsize=None)
def _adam_step(name):
  """``(params, donated jitted step, its compiled executable)`` of ``name``
  + Adam on leaves that share shapes in pairs: one compile per method for
  the tests of this file (calling the jitted step reuses the executable)."""
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
            for i, s in enumerate(_SHAPES)}
  tx = ALL[name].build(optax.adam(1e-3))

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
    return optax.apply_updates(params, updates), state
  step = jax.jit(step, donate_argnums=(0, 1))
  return params, step, step.lower(params, tx.init(params), params).compile()


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_parameter_sized_temporaries(name):
  params, _, compiled = _adam_step(name)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  extra = compiled.memory_analysis().temp_size_in_bytes / param_bytes
  assert extra <= EXTRA_BUFFERS.get(name, 0.0) + 0.05, extra


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_updated_in_place_where_leaves_share_a_shape(name):
  """No compiled CPU step copies a donated state (or parameter) buffer
  before it is overwritten: every reader of the old value is ordered
  before the in-place write. A copy is a parameter-sized write, and on CPU
  a freshly page-faulted buffer each step (spam copied every ``nu`` where
  leaves shared a shape: 3.4x an Adam step at 50M params, about 2.2x
  without). The temporaries test above misses it where copies share a
  buffer."""
  _, _, compiled = _adam_step(name)
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  # parameter-sized arrays only (a copy of a small per-leaf vector is not)
  array = (r"f32\[(?:" + "|".join(",".join(map(str, x)) for x in _SHAPES) +
           r")\]\{[\d,]+\}")
  donated = set(re.findall(rf"%((?:params|state)_[\w.]+) = {array} parameter",
                           entry))
  # the pattern reads this HLO: it finds the params and Adam's moments
  assert len(donated) >= 3 * len(_SHAPES), sorted(donated)
  copied = re.findall(rf"= {array} copy\(%([\w.]+)\)", entry)
  assert not donated & set(copied), copied


@pytest.mark.parametrize("name", ["guard", "rewind"])
def test_compiles_in_linear_size(name):
  """The compiled step grows linearly with the leaf count: 4x the leaves,
  at most 4.6x the instructions (Adam alone: 3.7x). Quadratic before:
  the guard's rollback tied every leaf to every update (minutes and 20+
  GB to compile 500 leaves); rewind's finiteness flag, a chain of N
  reductions, was copied by XLA:CPU into each of its N selects (6.0x here;
  275 s to compile 500 leaves, about 20 s now)."""
  def instructions(n):
    params = {f"l{i:03d}": jnp.full((4, 4), float(i)) for i in range(n)}
    tx = ALL[name].build(optax.adam(1e-3))

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return (jax.jit(step).lower(params, tx.init(params), params)
            .compile().as_text().count("\n"))
  assert instructions(80) < 4.6 * instructions(20)
