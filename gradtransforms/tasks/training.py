"""A pure training loop over ``nnx.split`` state, jitted, scanned over steps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradtransforms import _checks
from gradtransforms._reading import metrics
from gradtransforms.monitor import monitor
from gradtransforms.tasks.synthetic import Task


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation,
                    task: Task, batch_size: int):
  """Returns ``(step, carry)``: a pure step function and its initial carry.

  ``step(carry, key) -> (carry, figures)`` with ``carry = (params, rest,
  opt_state)`` from ``nnx.split(model, nnx.Param, ...)``. ``tx`` is chained
  behind a :func:`gradtransforms.monitor` so that every run records the raw
  gradient norm (and per-leaf norms); ``figures`` is the loss plus every scalar of
  ``gt.metrics(opt_state)``. The loss reaches ``tx`` as ``value=loss``.
  """
  batch_size = _checks.integer("batch_size", batch_size, minimum=1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(monitor(per_leaf=True), optax.with_extra_args_support(tx))
  opt_state = tx.init(params)

  def step(carry, key):
    params, rest, opt_state = carry
    x, y = task.sample(key, batch_size)

    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      loss = task.loss(m(x), y)
      return loss, nnx.state(m, nnx.Not(nnx.Param))

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    params = optax.apply_updates(params, updates)
    figs = {k: v for k, v in metrics(opt_state).items() if jnp.ndim(v) == 0}
    figs["loss"] = loss
    return (params, rest, opt_state), figs

  return step, (params, rest, opt_state)


def train(model: nnx.Module, tx: optax.GradientTransformation, task: Task,
          steps: int, batch_size: int = 64, seed: int = 0
          ) -> tuple[dict[str, np.ndarray], Any]:
  """Trains ``steps`` steps in one compiled ``lax.scan``.

  Returns ``(history, carry)``: ``history`` maps each figure (``loss``,
  ``monitor/norm``, ...) to a numpy array over steps.
  """
  steps = _checks.integer("steps", steps, minimum=1)
  step, carry = make_train_step(model, tx, task, batch_size)
  keys = jax.random.split(jax.random.PRNGKey(seed), steps)
  carry, figs = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(carry, keys)
  return {k: np.asarray(v) for k, v in figs.items()}, carry
