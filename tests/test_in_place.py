"""``_in_place.step``: a skippable optimizer step with its selects moved to
where the new state is computed. Reference: the plain form,
``where(skip, old, new)`` after the optimizer's own ``update``
(``_xla.rollback_plain``), bit for bit; and XLA:CPU's buffer assignment for
the point of it (no update-sized temporary)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradtransforms import _in_place, _xla


def _params(dtype=jnp.float32):
  return {"w": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4),
          "b": jnp.asarray([0.5, -0.0, 2.0], dtype),
          "e": jnp.zeros((0, 2), dtype)}


def _grads(i, params, bad=None):
  g = jax.tree.map(lambda x: (jnp.cos(jnp.arange(x.size, dtype=jnp.float32)
                                      + i).reshape(x.shape) * 0.3).astype(x.dtype),
                   params)
  if bad is not None:
    g["w"] = g["w"].at[1, 2].set(bad)
  return g


def _bits(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def _steps(tx):
  def run(g, s, p):
    return tx.update(g, s, p)

  @jax.jit
  def in_place(skip, g, s, p):
    u, s = _in_place.step(run, skip, g, s, p)
    return _xla.skip_updates(skip, u), s

  @jax.jit
  def plain(skip, g, s, p):
    u, new = run(g, s, p)
    return _xla.rollback_plain(skip, u, s, new)
  return in_place, plain


INNERS = {
    "adam": lambda: optax.adam(0.1),
    "adamw": lambda: optax.adamw(0.1, weight_decay=0.1),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(0.5),
                                           optax.adam(0.1)),
    "inject": lambda: optax.inject_hyperparams(optax.adam)(
        learning_rate=optax.linear_schedule(0.1, 0.01, 3)),
    "multisteps": lambda: optax.MultiSteps(optax.adam(0.1), 2
                                           ).gradient_transformation(),
    "adafactor": lambda: optax.adafactor(0.1),
    "identity": optax.identity,
}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_bit_identical_to_the_plain_select_over_a_run(name):
  """Good, skipped (a NaN gradient) and good steps again: the same updates
  and states, bit for bit, as selecting after the optimizer's update."""
  tx = INNERS[name]()
  p = _params()
  in_place, plain = _steps(tx)
  s_a = s_b = tx.init(p)
  for i, (bad, skip) in enumerate([(None, False), (jnp.nan, True),
                                   (None, False), (None, True), (None, False)]):
    g = _grads(i, p, bad)
    u_a, s_a = in_place(jnp.asarray(skip), g, s_a, p)
    u_b, s_b = plain(jnp.asarray(skip), g, s_b, p)
    _bits(u_a, u_b)
    _bits(s_a, s_b)
    if skip:
      assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u_a))
    p = optax.apply_updates(p, u_a)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_state_keeps_its_dtype_and_bits(dtype):
  tx = optax.adam(0.1, mu_dtype=dtype)
  p = _params(dtype)
  in_place, plain = _steps(tx)
  s = tx.init(p)
  for skip in (False, True):
    a, b = in_place(jnp.asarray(skip), _grads(1, p), s, p), plain(
        jnp.asarray(skip), _grads(1, p), s, p)
    _bits(a, b)
    assert all(x.dtype == dtype for x in jax.tree.leaves(a[0]))


def test_skip_state_is_the_state_of_a_skipped_step():
  tx = optax.adam(0.1)
  p = _params()
  s = tx.init(p)
  s = tx.update(_grads(0, p), s, p)[1]
  fresh = tx.init(p)
  run = lambda g, st, pa: tx.update(g, st, pa)
  for skip in (True, False):
    _, got = jax.jit(lambda k, g, st: _in_place.step(run, k, g, st, p, fresh))(
        jnp.asarray(skip), _grads(1, p), s)
    _bits(got, fresh if skip else jax.jit(tx.update)(_grads(1, p), s, p)[1])


def _twin_transform():
  """A state whose two leaves are one computed value, which is also the
  update: each output must still get its own old value back."""
  def init(params):
    return {"a": jax.tree.map(jnp.zeros_like, params),
            "b": jax.tree.map(jnp.ones_like, params), "n": jnp.zeros((), jnp.int32)}

  def update(g, s, params=None):
    t = jax.tree.map(lambda x, a: 0.5 * x + a, g, s["a"])
    return t, {"a": t, "b": t, "n": s["n"]}
  return optax.GradientTransformation(init, update)


def test_values_returned_twice_and_passed_through():
  tx = _twin_transform()
  p = _params()
  in_place, plain = _steps(tx)
  s = tx.init(p)
  for skip in (True, False):
    _bits(in_place(jnp.asarray(skip), _grads(0, p), s, p),
          plain(jnp.asarray(skip), _grads(0, p), s, p))


def test_eager_and_empty_trees():
  tx = optax.adam(0.1)
  run = lambda g, st, pa: tx.update(g, st, pa)
  p = _params()
  s = tx.init(p)
  got = _in_place.step(run, jnp.asarray(False), _grads(0, p), s, p)  # eager
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(tx.update(_grads(0, p), s, p))):
    np.testing.assert_allclose(x, y, rtol=1e-6)  # op by op: other rounding
  u, new = _in_place.step(run, jnp.asarray(True), {}, tx.init({}), {})
  assert u == {} and int(new[0].count) == 0


def test_a_new_state_of_another_tree_is_refused():
  bad = optax.GradientTransformation(
      lambda p: {"x": jnp.zeros(())},
      lambda g, s, p=None: (g, {"x": s["x"], "y": s["x"]}))
  with pytest.raises(ValueError, match="another tree"):
    _in_place.step(lambda g, s, p: bad.update(g, s, p), jnp.asarray(False),
                   {"w": jnp.ones(2)}, {"x": jnp.zeros(())}, None)


def test_no_update_sized_temporary_on_cpu():
  """The point of it: a skippable Adam step with apply_updates allocates no
  parameter-sized temporary on XLA:CPU, where the plain select after the
  update costs at least one (an update or a copy of the old moments)."""
  tx = optax.adam(1e-3)
  p = {f"w{i}": jnp.ones((64, 48)) for i in range(3)}
  run = lambda g, s, pa: tx.update(g, s, pa)

  def in_place(p, s, g, skip):
    u, s = _in_place.step(run, skip, g, s, p)
    return optax.apply_updates(p, _xla.skip_updates(skip, u)), s

  def plain(p, s, g, skip):
    u, new = run(g, s, p)
    u, s = _xla.rollback_plain(skip, u, s, new)
    return optax.apply_updates(p, u), s

  def temps(f):
    c = jax.jit(f, donate_argnums=(0, 1)).lower(
        p, tx.init(p), p, jnp.asarray(False)).compile()
    return c.memory_analysis().temp_size_in_bytes / sum(
        x.nbytes for x in jax.tree.leaves(p))
  assert temps(in_place) < 0.05
  assert temps(plain) >= 1.0
