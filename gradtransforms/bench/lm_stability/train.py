"""Training: the model, schedule, fault injection and the compiled runner."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradtransforms.bench.lm_stability.methods import Method, base_optimizer
from gradtransforms.models import TransformerLM
from gradtransforms.tasks import corpus as corpus_lib

FAULTS = ("x1000", "nan", "repeat", "burst30", "lr_x50")
FAULT_CODE = {"clean": 0, "x1000": 1, "nan": 2, "repeat": 3, "burst30": 4,
              "lr_x50": 5}
REPEATED_BYTE = 0          # NUL: never in the corpus, so the batch is novel
BURST_STEPS = 30           # burst30: this many corrupted batches in a row
LR_BUG_STEPS, LR_BUG_FACTOR = 20, 50.0  # lr_x50: a schedule bug


@dataclasses.dataclass(frozen=True)
class Config:
  d_model: int
  num_layers: int
  num_heads: int
  seq_len: int
  batch: int
  steps: int
  seeds: int
  rates: tuple[float, ...]
  fault_lr: float
  chunk: int
  window: int
  timing_rounds: int
  eval_windows: int


def make_model(cfg: Config, seed: int) -> TransformerLM:
  return TransformerLM(256, cfg.d_model, cfg.num_layers, cfg.num_heads,
                       cfg.seq_len, rngs=nnx.Rngs(seed))


def schedule(t: jax.Array, steps: int) -> jax.Array:
  """10% linear warm-up, then cosine from 1 to 0.1."""
  warm = max(steps // 10, 1)
  frac = jnp.clip((t - warm) / max(steps - warm, 1), 0.0, 1.0)
  cos = 0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  return jnp.where(t < warm, (t + 1) / warm, cos)


def xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def layer_norms(grads: Any) -> jax.Array:
  """Per-layer gradient norm of the stacked blocks: for each leaf under
  ``blocks``, the sum of squares over all but the leading layer axis, summed
  over leaves, square-rooted. Shape (num_layers,)."""
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
        for x in jax.tree.leaves(grads["blocks"])]
  return jnp.sqrt(sum(sq))


def _path(path) -> str:
  """``"blocks/attn/query/kernel"`` (an nnx.State path ends in ``.value``)."""
  return "/".join(str(k.key) for k in path if hasattr(k, "key"))


def inject(grads: Any, kind: jax.Array, now: jax.Array, layer: int) -> Any:
  """At ``now``: x1000 on every gradient of block ``layer`` (its slice of
  each stacked leaf; kind 1), or NaN in block ``layer``'s slice of
  ``blocks/mlp_in/kernel`` (kind 2). Other steps pass unchanged."""
  big = jnp.where(now & (kind == 1), 1000.0, 1.0)
  nan = jnp.where(now & (kind == 2), jnp.nan, 1.0)

  def one(path, x):
    name = _path(path)
    if not name.startswith("blocks/"):
      return x
    factor = big * nan if name == "blocks/mlp_in/kernel" else big
    sel = (jnp.arange(x.shape[0]) == layer).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(sel, x * factor, x)

  return jax.tree_util.tree_map_with_path(one, grads)


class Runner:
  """One method's compiled chunk of training steps, shared by all its runs."""

  def __init__(self, cfg: Config, method: Method, graphdef, train: jax.Array):
    self.cfg, self.method, self.train = cfg, method, train
    self.tx = method.build(base_optimizer())
    tx, steps, layer = self.tx, cfg.steps, cfg.num_layers // 2

    def loss_fn(params, x, y):
      return xent(nnx.merge(graphdef, params)(x), y)

    def step(carry, t, lr, kind, fault_step, data_key, data):
      params, opt_state = carry
      x, y = corpus_lib.sample(data, jax.random.fold_in(data_key, t),
                               cfg.batch, cfg.seq_len)
      now = t == fault_step
      span = (t >= fault_step) & (t < fault_step + jnp.where(
          kind == 4, BURST_STEPS, LR_BUG_STEPS))
      rep = (now & (kind == 3)) | (span & (kind == 4))
      x = jnp.where(rep, REPEATED_BYTE, x)
      y = jnp.where(rep, REPEATED_BYTE, y)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      grads = inject(grads, kind, now, layer)
      norm = optax.global_norm(grads)
      rate = lr * schedule(t, steps) * jnp.where(span & (kind == 5),
                                                 LR_BUG_FACTOR, 1.0)
      if method.kind == "rewind":  # the rate inside: its updates are final
        updates, opt_state = tx.update(grads, opt_state, params, value=loss,
                                       rate=rate)
        params = optax.apply_updates(params, updates)
      else:
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = jax.tree.map(lambda p, u: p + rate * u, params, updates)
      figs = {"loss": loss, "norm": norm, "layer_norms": layer_norms(grads),
              "acted": method.acted(opt_state, norm),
              **method.costs(opt_state, norm)}
      return (params, opt_state), figs

    def chunk(carry, t0, lr, kind, fault_step, data_key, data):
      ts = t0 + jnp.arange(cfg.chunk)
      return jax.lax.scan(
          lambda c, t: step(c, t, lr, kind, fault_step, data_key, data), carry, ts)

    self._chunk = jax.jit(chunk)

  def init(self, params) -> tuple:
    return (params, self.tx.init(params))

  def run(self, params, lr: float, seed: int, fault: str = "clean",
          fault_step: int = -1, on_chunk: Callable[[], None] | None = None):
    """Trains ``cfg.steps`` steps; returns ``(figures, carry)`` with the
    figures as numpy arrays over steps."""
    carry = self.init(params)
    key = jax.random.PRNGKey(1000 + seed)
    figs = []
    for t0 in range(0, self.cfg.steps, self.cfg.chunk):
      carry, f = self._chunk(carry, jnp.int32(t0), jnp.float32(lr),
                             jnp.int32(FAULT_CODE[fault]), jnp.int32(fault_step),
                             key, self.train)
      figs.append(jax.device_get(f))
      if on_chunk:
        on_chunk()
    out = {k: np.concatenate([f[k] for f in figs]) for k in figs[0]}
    return out, carry

  def time_chunk(self, carry) -> tuple[float, tuple]:
    """Seconds for one chunk of steps (compiled already)."""
    t = time.perf_counter()
    carry, f = self._chunk(carry, jnp.int32(0), jnp.float32(1e-3), jnp.int32(0),
                           jnp.int32(-1), jax.random.PRNGKey(0), self.train)
    jax.block_until_ready(f)
    return time.perf_counter() - t, carry
