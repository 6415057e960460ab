"""Named scenarios where gradients explode or vanish (and their remedies), a
healthy run under an over-tight clip, and the methods compared on them.
Shared by ``gradtransforms demo`` and ``benchmarks/stability.py``."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import optax
from flax import nnx

import gradtransforms as gt
from gradtransforms.models import LSTM, DeepMLP, ElmanRNN
from gradtransforms.tasks.synthetic import Task, addition, corrupted, deep_regression


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A model factory (taking a seed), a task, and the base optimizer:
  SGD with momentum 0.9, behind a fixed ``gt.clip_by_global_norm(clip)``
  when ``clip`` is set (a clip that belongs to the scenario, such as an
  over-tight one, rather than to the method compared)."""
  name: str
  make_model: Callable[[int], nnx.Module]
  task: Task
  learning_rate: float
  note: str
  clip: float | None = None

  def optimizer(self) -> optax.GradientTransformation:
    sgd = optax.sgd(self.learning_rate, momentum=0.9)
    if self.clip is None:
      return sgd
    return optax.chain(gt.clip_by_global_norm(self.clip), sgd)


def _scenarios() -> dict[str, Scenario]:
  reg, add = deep_regression(16), addition(50)
  mlp = lambda **kw: (lambda s: DeepMLP(16, 64, in_features=16,
                                        rngs=nnx.Rngs(s), **kw))
  return {s.name: s for s in [
      Scenario("mlp16-init1.6", mlp(init_scale=1.6), reg, 0.01,
               "16-layer ReLU MLP, init 1.6x He: explodes through depth"),
      Scenario("mlp16-he", mlp(), reg, 0.01,
               "remedy: He init (and ReLU + He for mlp16-sigmoid)"),
      Scenario("mlp16-init1.6-layernorm", mlp(init_scale=1.6, norm="layer"),
               reg, 0.01, "remedy: LayerNorm"),
      Scenario("mlp16-sigmoid", mlp(activation="sigmoid", init="xavier"), reg,
               0.01, "16-layer sigmoid MLP, Xavier init: gradients vanish "
               "through depth (x0.2 per layer); remedies: mlp16-he (ReLU + He), "
               "mlp16-sigmoid-batchnorm"),
      Scenario("mlp16-sigmoid-batchnorm", mlp(activation="sigmoid",
                                              init="xavier", norm="batch"),
               reg, 0.01, "remedy: BatchNorm before each sigmoid"),
      Scenario("mlp4-lr0.2", lambda s: DeepMLP(4, 64, in_features=16,
                                               rngs=nnx.Rngs(s)), reg, 0.2,
               "4-layer MLP, learning rate too high: diverges"),
      Scenario("mlp4-lr0.02", lambda s: DeepMLP(4, 64, in_features=16,
                                                rngs=nnx.Rngs(s)), reg, 0.02,
               "healthy 4-layer MLP, sane learning rate"),
      Scenario("mlp4-lr0.02-clip0.05", lambda s: DeepMLP(
          4, 64, in_features=16, rngs=nnx.Rngs(s)), reg, 0.02,
               "the same with clip_by_global_norm(0.05) in front of SGD: "
               "over-tight (pre-clip norms ~0.5-4), the effective learning "
               "rate drops to ~2%; compare mlp4-lr0.02 with autoclip / zclip",
               clip=0.05),
      Scenario("mlp4-corrupt-batches", lambda s: DeepMLP(
          4, 64, in_features=16, rngs=nnx.Rngs(s)), corrupted(reg, 0.03, 100.0),
               0.02, "healthy 4-layer MLP, 3% of batches corrupted (x100)"),
      Scenario("rnn-T50-rho2", lambda s: ElmanRNN(32, 2.0, in_features=2,
                                                  rngs=nnx.Rngs(s)), add, 0.05,
               "Elman RNN, spectral radius 2, adding problem T=50"),
      Scenario("lstm-T50", lambda s: LSTM(32, in_features=2, rngs=nnx.Rngs(s)),
               add, 0.05, "remedy: LSTM on the same task"),
      Scenario("rnn-T50-rho0.5", lambda s: ElmanRNN(32, 0.5, in_features=2,
                                                    rngs=nnx.Rngs(s)), add, 0.05,
               "Elman RNN, spectral radius 0.5, adding problem T=50: the "
               "gradient vanishes through time, the loss stalls at the mean "
               "(~0.167); beside lstm-T50"),
  ]}


SCENARIOS: dict[str, Scenario] = _scenarios()

def summarize(history: dict[str, np.ndarray]) -> dict[str, float]:
  """diverged (any non-finite loss), step of the first one, final loss (median
  of the last 10% of steps), max finite grad norm, steps skipped."""
  loss, norm = history["loss"], history["monitor/norm"]
  bad = ~np.isfinite(loss)
  tail = loss[-max(len(loss) // 10, 1):]
  finite_norms = norm[np.isfinite(norm)]
  return {
      "diverged": bool(bad.any()),
      "nan_step": int(np.argmax(bad)) if bad.any() else None,
      "final_loss": float(np.median(tail)) if not bad.any() else float("nan"),
      "max_norm": float(finite_norms.max()) if finite_norms.size else float("nan"),
      "skipped": int(history["guard/skipped"][-1]) if "guard/skipped" in history else 0,
  }
