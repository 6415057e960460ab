"""A deep MLP whose init, activation and normalisation are the knobs of explosion."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gradtransforms import _checks

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu,
    "linear": lambda x: x, "sigmoid": jax.nn.sigmoid,
}
INITS = ("he", "xavier", "normal")
NORMS = (None, "batch", "layer")


def kernel_init(init: str, init_scale: float):
  """Weight init with std ``init_scale * base``: He ``sqrt(2/fan_in)``,
  Xavier ``sqrt(2/(fan_in+fan_out))``, or plain ``normal`` (base 1)."""
  s2 = float(init_scale) ** 2
  if init == "he":
    return nnx.initializers.variance_scaling(2.0 * s2, "fan_in", "normal")
  if init == "xavier":
    return nnx.initializers.variance_scaling(s2, "fan_avg", "normal")
  return nnx.initializers.normal(stddev=float(init_scale))


class DeepMLP(nnx.Module):
  """``depth`` hidden layers of ``width`` units, then a linear read-out.

  ``h_{l+1} = act(norm(W_l h_l + b_l))``. With ``init_scale`` above 1 (or
  ``init="normal"`` at a large width) the backward signal is multiplied by
  roughly ``init_scale`` per layer: gradients of the first layers explode
  with depth; He init and ``norm="layer"``/``"batch"`` are the remedies.

  Args:
    depth: number of hidden layers, >= 1.
    width: hidden units, >= 1.
    activation: one of ``ACTIVATIONS`` (default ``"relu"``).
    init: ``"he"``, ``"xavier"`` or ``"normal"``.
    init_scale: multiplier of the init std, > 0.
    norm: None, ``"batch"`` or ``"layer"`` after each hidden linear layer.
    in_features: input size (default ``width``).
    out_features: output size (default 1).
    rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``).
  """

  def __init__(self, depth: int, width: int, activation: str = "relu",
               init: str = "he", init_scale: float = 1.0, norm: str | None = None,
               *, in_features: int | None = None, out_features: int = 1,
               rngs: nnx.Rngs | None = None):
    depth = _checks.integer("depth", depth, minimum=1)
    width = _checks.integer("width", width, minimum=1)
    _checks.one_of("activation", activation, ACTIVATIONS)
    _checks.one_of("init", init, INITS)
    _checks.positive("init_scale", init_scale)
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    k_init = kernel_init(init, init_scale)
    sizes = [in_features or width] + [width] * depth
    self.activation = activation
    self.layers = nnx.List([nnx.Linear(a, b, kernel_init=k_init, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    if norm == "batch":
      self.norms = nnx.List([nnx.BatchNorm(width, rngs=rngs) for _ in range(depth)])
    elif norm == "layer":
      self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(depth)])
    else:
      self.norms = None
    self.out = nnx.Linear(width, out_features,
                          kernel_init=kernel_init("xavier", 1.0), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if self.norms is not None:
        x = self.norms[i](x)
      x = act(x)
    return self.out(x)
