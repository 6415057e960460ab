"""Reference models, synthetic tasks, the pure training step and scenarios."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradtransforms as gt
from gradtransforms import _norms
from gradtransforms.models import GRU, LSTM, DeepMLP, ElmanRNN
from gradtransforms.tasks import (addition, corrupted, deep_regression,
                                  make_train_step, temporal_order, train)


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("init", ["he", "xavier", "normal"])
def test_mlp_shapes(norm, init):
  m = DeepMLP(3, 8, "tanh", init, 1.0, norm, in_features=5, out_features=2)
  assert m(jnp.ones((4, 5))).shape == (4, 2)
  assert len(m.layers) == 3


def test_mlp_init_scale_sets_weight_std():
  for init, base in (("he", np.sqrt(2 / 256)), ("xavier", np.sqrt(2 / 512)),
                     ("normal", 1.0)):
    m = DeepMLP(2, 256, init=init, init_scale=1.5)
    std = float(jnp.std(m.layers[1].kernel[...]))
    np.testing.assert_allclose(std, 1.5 * base, rtol=0.05)


@pytest.mark.parametrize("cls", [ElmanRNN, LSTM, GRU])
def test_rnn_shapes(cls):
  m = cls(6, in_features=3, out_features=2)
  assert m(jnp.ones((4, 9, 3))).shape == (4, 2)


def test_elman_spectral_radius_is_recurrent_scale():
  m = ElmanRNN(16, recurrent_scale=1.7)
  radius = np.max(np.abs(np.linalg.eigvals(np.asarray(m.w_hh[...]))))
  np.testing.assert_allclose(radius, 1.7, rtol=1e-4)


def _grad_norm(model_fn, T):
  task = addition(T)
  x, y = task.sample(jax.random.PRNGKey(0), 32)
  g = nnx.grad(lambda m: task.loss(m(x), y))(model_fn())
  return float(_norms.global_norm(nnx.state(g, nnx.Param)))


def test_rnn_gradient_grows_with_length_and_lstm_much_less():
  rnn = [_grad_norm(lambda: ElmanRNN(32, 2.0, in_features=2), T) for T in (5, 40)]
  lstm = [_grad_norm(lambda: LSTM(32, in_features=2), T) for T in (5, 40)]
  assert rnn[1] > 10 * rnn[0]
  assert lstm[1] < 2 * lstm[0]
  assert rnn[1] > 50 * lstm[1]


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="norm"):
    DeepMLP(2, 4, norm="group")
  with pytest.raises(ValueError, match="init"):
    DeepMLP(2, 4, init="orthogonal")
  with pytest.raises(ValueError, match="depth"):
    DeepMLP(0, 4)
  with pytest.raises(ValueError, match="recurrent_scale"):
    ElmanRNN(4, recurrent_scale=-1.0)


# --- tasks -----------------------------------------------------------------------


def test_addition_target_is_sum_of_two_marked_values():
  x, y = addition(30).sample(jax.random.PRNGKey(1), 16)
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == (16, 30, 2) and y.shape == (16, 1)
  assert np.all(x[:, :, 1].sum(axis=1) == 2)
  np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * x[:, :, 1]).sum(axis=1),
                             rtol=1e-6)
  first = np.argmax(x[:, :, 1], axis=1)
  assert np.all(first < 3)  # within the first 10%


def test_temporal_order_label_matches_relevant_symbols():
  x, y = temporal_order(40).sample(jax.random.PRNGKey(2), 32)
  sym = np.argmax(np.asarray(x), axis=-1)
  for row, label in zip(sym, np.asarray(y)):
    relevant = row[row >= 4] - 4
    assert len(relevant) == 2 and 2 * relevant[0] + relevant[1] == label


def test_corrupted_scales_some_batches():
  task = corrupted(deep_regression(4), prob=0.5, scale=1e3)
  base = deep_regression(4)
  scales = []
  for i in range(20):
    key = jax.random.PRNGKey(i)
    x, _ = task.sample(key, 8)
    x0, _ = base.sample(jax.random.split(key)[1], 8)
    scales.append(float(jnp.max(jnp.abs(x)) / jnp.max(jnp.abs(x0))))
  assert set(np.round(scales, 3)) == {1.0, 1000.0}


# --- training --------------------------------------------------------------------


def test_train_step_is_pure_jit_over_split_state():
  model = DeepMLP(2, 8, in_features=16, norm="batch")
  step, carry = make_train_step(model, optax.adam(1e-2), deep_regression(16), 8)
  step = jax.jit(step)
  key = jax.random.PRNGKey(0)
  c1, f1 = step(carry, key)
  c1b, _ = step(carry, key)  # same input, same output: no hidden state
  jax.tree.map(np.testing.assert_array_equal, c1, c1b)
  c2, f2 = step(c1, key)
  assert float(f2["loss"]) < float(f1["loss"])
  # BatchNorm running statistics travel in the non-Param part of the carry.
  assert not np.allclose(jax.tree.leaves(c1[1])[0], jax.tree.leaves(carry[1])[0])
  assert step._cache_size() == 1


def test_clipping_keeps_a_diverging_run_finite():
  make = lambda: DeepMLP(4, 32, in_features=16, rngs=nnx.Rngs(0))
  sgd = optax.sgd(0.3, momentum=0.9)
  task = deep_regression(16)
  h_none, _ = train(make(), sgd, task, 40, 32)
  h_clip, _ = train(make(), optax.chain(gt.clip_by_global_norm(1.0), sgd), task,
                    40, 32)
  assert not np.all(np.isfinite(h_none["loss"]))
  assert np.all(np.isfinite(h_clip["loss"]))
  assert np.nanmax(h_none["monitor/norm"]) > 1e3
