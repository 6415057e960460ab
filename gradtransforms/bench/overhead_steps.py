"""The overhead benchmark's workloads and compiled steps: which methods, the
reference row, the parameter trees, and the donated, jitted step each
method is timed in (with its compile time and kernel count)."""

from __future__ import annotations

from gradtransforms._extras import require

require("demo", "flax", what="gradtransforms bench")

import re  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from gradtransforms.catalogue import CATALOGUE  # noqa: E402
from gradtransforms.models import LSTM, DeepMLP, ElmanRNN  # noqa: E402

REFERENCE = "one_read"
# Benchmarked: the reference, then every catalogue entry whose updates need
# no per-example axis.
NAMES = [REFERENCE] + [n for n, e in CATALOGUE.items() if not e.batch_axis]
GROUP = {REFERENCE: "reference", **{n: e.group for n, e in CATALOGUE.items()}}
CPU_TARGET = {"static": 1.10, "adaptive": 1.15, "detection": 1.05}
# Accelerators (issue 12): at most these ratios, and within +0.03 of the
# optax equivalent where one exists.
ACCEL_TARGET = {"static": 1.20, "adaptive": 1.20, "detection": 1.20,
                "spike_clip": 1.30, "clippy": 1.30}
ACCEL_OPTAX_MARGIN = 0.03
CHUNK = 4  # methods timed together against one Adam baseline (bounds memory)


def target(name: str, platform_name: str) -> float:
  group = GROUP[name]
  if group == "reference":
    return float("nan")
  if platform_name == "cpu":
    return CPU_TARGET[group]
  return ACCEL_TARGET.get(name, ACCEL_TARGET[group])


def _one_read() -> optax.GradientTransformation:
  """Reference, not a clip: records the gradients' sum of squares and passes
  them on. It only reads every gradient once: what any clip or detector
  that needs a norm costs at least."""
  def update_fn(updates, state, params=None):
    del state, params
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
    return jax.lax.optimization_barrier((updates, sq))
  return optax.GradientTransformation(lambda _: jnp.zeros(()), update_fn)


def build(name: str, opt, layer_axes: int | None = None):
  """(transform placed with ``opt``, optax equivalent or None)."""
  if name == REFERENCE:
    return optax.chain(_one_read(), opt), None
  entry = CATALOGUE[name]
  kw = {"layer_axes": layer_axes} if layer_axes is not None and entry.layer_axes else {}
  return entry.build(opt, config="bench", **kw), entry.build_optax(opt)


def count_kernels(compiled) -> int:
  """Fusions and custom calls in the ENTRY computation of compiled HLO."""
  text = compiled.as_text()
  entry = text[text.rfind("ENTRY"):]
  return len(re.findall(r"= [^\n]*\bfusion\(|custom-call\(", entry))


def make_tree(n_params: int, n_leaves: int, seed: int = 0) -> dict:
  """``n_leaves`` 2-D float32 leaves totalling about ``n_params`` elements."""
  rng = np.random.default_rng(seed)
  per = max(n_params // n_leaves, 4)
  cols = max(int(np.sqrt(per)), 2)
  rows = max(per // cols, 2)
  return {f"layer{i:03d}": jnp.asarray(
      rng.standard_normal((rows, cols), np.float32) * 0.02)
          for i in range(n_leaves)}


def make_stacked(n_params: int, layers: int, n_leaves: int, seed: int = 0) -> dict:
  """``n_leaves`` leaves of shape ``(layers, r, c)`` totalling about
  ``n_params`` elements: a scanned stack of ``layers`` identical layers."""
  rng = np.random.default_rng(seed)
  per = max(n_params // (n_leaves * layers), 4)
  cols = max(int(np.sqrt(per)), 2)
  rows = max(per // cols, 2)
  return {f"stack{i}": jnp.asarray(
      rng.standard_normal((layers, rows, cols), np.float32) * 0.02)
          for i in range(n_leaves)}


class Runner:
  """A compiled, donated step with its own params and state. Each call
  times ``k`` back-to-back steps and returns seconds per step."""

  def __init__(self, tx, params, grads, k: int):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._compile(step, tx, jax.tree.map(jnp.copy, params), grads, k)

  def _compile(self, step, tx, params, data, k: int) -> None:
    """Compiles ``step(params, state, data)`` donating params and state."""
    self.params, self.state, self.data, self.k = params, tx.init(params), data, k
    self.faults: list[float] = []  # minor page faults per step of each sample
    t0 = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
        self.params, self.state, self.data).compile()
    self.compile_s = time.perf_counter() - t0
    self.kernels = count_kernels(self.step)

  def __call__(self) -> float:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(self.k):
      self.params, self.state = self.step(self.params, self.state, self.data)
    jax.block_until_ready((self.params, self.state))
    t = (time.perf_counter() - t0) / self.k
    self.faults.append(
        (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / self.k)
    return t


class ModelRunner(Runner):
  """A full training step (forward, backward, update) of a reference model."""

  def __init__(self, tx, model, x, y, k: int):
    graphdef, params = nnx.split(model, nnx.Param)

    def step(params, state, batch):
      x, y = batch
      loss_fn = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(x) - y))
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._compile(step, tx, params, (x, y), k)


MODELS = {
    "DeepMLP(16x512)": (lambda: DeepMLP(16, 512, in_features=64,
                                        rngs=nnx.Rngs(0)), (256, 64)),
    "ElmanRNN(256), T=50": (lambda: ElmanRNN(256, 1.0, in_features=8,
                                             rngs=nnx.Rngs(0)), (64, 50, 8)),
    "LSTM(128), T=50": (lambda: LSTM(128, in_features=8, rngs=nnx.Rngs(0)),
                        (64, 50, 8)),
}
