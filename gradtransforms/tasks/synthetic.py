"""Synthetic tasks made in-process: deep regression, addition, temporal order."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from gradtransforms import _checks


@dataclasses.dataclass(frozen=True)
class Task:
  """A data source and its loss. ``sample(key, batch) -> (x, y)``."""
  name: str
  sample: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  in_features: int
  out_features: int


def _mse(pred, y):
  return jnp.mean(jnp.square(pred - y))


def _xent(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def deep_regression(in_features: int = 16, seed: int = 0) -> Task:
  """``y = sin(3 x.w) + 0.5 cos(x.v)`` for ``x ~ N(0, I)`` and fixed teacher
  directions ``w, v`` (unit norm): a smooth target a deep MLP can fit."""
  in_features = _checks.integer("in_features", in_features, minimum=1)
  kw, kv = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.normal(kw, (in_features,))
  v = jax.random.normal(kv, (in_features,))
  w, v = w / jnp.linalg.norm(w), v / jnp.linalg.norm(v)

  def sample(key, batch):
    x = jax.random.normal(key, (batch, in_features))
    y = jnp.sin(3 * x @ w) + 0.5 * jnp.cos(x @ v)
    return x, y[:, None]

  return Task("deep_regression", sample, _mse, in_features, 1)


def addition(seq_len: int) -> Task:
  """The adding problem (Hochreiter & Schmidhuber, 1997; Pascanu et al., 2013).

  Input (batch, T, 2): channel 0 uniform values in [0, 1), channel 1 marks
  two positions, one in the first 10% and one in the first half. Target: the
  sum of the two marked values. Predicting 1 gives an MSE of about 0.167.
  """
  T = _checks.integer("seq_len", seq_len, minimum=4)

  def sample(key, batch):
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (batch, T))
    first = jax.random.randint(k1, (batch,), 0, max(T // 10, 1))
    second = jax.random.randint(k2, (batch,), max(T // 10, 1), T // 2)
    marks = (jax.nn.one_hot(first, T) + jax.nn.one_hot(second, T))
    y = jnp.sum(values * marks, axis=1, keepdims=True)
    return jnp.stack([values, marks], axis=-1), y

  return Task(f"addition_T{T}", sample, _mse, 2, 1)


def temporal_order(seq_len: int) -> Task:
  """The temporal order problem (Hochreiter & Schmidhuber, 1997).

  A sequence of distractor symbols {a, b, c, d} with two relevant symbols
  X or Y, one at 10-20% and one at 50-60% of the length. Class (4-way): the
  ordered pair XX, XY, YX, YY. Input one-hot over 6 symbols; chance level
  cross-entropy is log 4 = 1.386.
  """
  T = _checks.integer("seq_len", seq_len, minimum=10)

  def sample(key, batch):
    kd, k1, k2, kc = jax.random.split(key, 4)
    symbols = jax.random.randint(kd, (batch, T), 0, 4)
    p1 = jax.random.randint(k1, (batch,), T // 10, max(T // 5, T // 10 + 1))
    p2 = jax.random.randint(k2, (batch,), T // 2, max(3 * T // 5, T // 2 + 1))
    label = jax.random.randint(kc, (batch,), 0, 4)
    rows = jnp.arange(batch)
    symbols = symbols.at[rows, p1].set(4 + label // 2)
    symbols = symbols.at[rows, p2].set(4 + label % 2)
    return jax.nn.one_hot(symbols, 6), label

  return Task(f"temporal_order_T{T}", sample, _xent, 6, 4)


def corrupted(task: Task, prob: float = 0.02, scale: float = 1e3) -> Task:
  """``task`` with occasional corrupt batches: with probability ``prob`` a
  batch's inputs are multiplied by ``scale`` (a data-pipeline fault). The
  result is sudden gradient and loss spikes in an otherwise healthy run:
  the case guards and spike detectors exist for."""
  _checks.in_range("prob", prob, 0.0, 1.0)
  _checks.positive("scale", scale)

  def sample(key, batch):
    kc, kd = jax.random.split(key)
    x, y = task.sample(kd, batch)
    bad = jax.random.uniform(kc) < prob
    return jnp.where(bad, x * scale, x), y

  return Task(f"{task.name}_corrupted", sample, task.loss, task.in_features,
              task.out_features)
