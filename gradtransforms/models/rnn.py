"""Recurrent reference models: Elman RNN (explodes), LSTM and GRU (gated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradtransforms import _checks


def _orthogonal(key: jax.Array, n: int) -> jax.Array:
  q, r = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  return q * jnp.sign(jnp.diag(r))


def _normal(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  return jax.random.normal(key, shape) / np.sqrt(fan_in)


class _Recurrent(nnx.Module):
  """Scans ``cell`` over time (axis 1) and reads out the last hidden state."""

  hidden: int

  def _readout_init(self, out_features: int, rngs: nnx.Rngs) -> None:
    self.out = nnx.Linear(self.hidden, out_features, rngs=rngs)

  def cell_params(self):
    raise NotImplementedError

  def cell(self, params, carry, x):
    raise NotImplementedError

  def init_carry(self, batch: int):
    return jnp.zeros((batch, self.hidden))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: (batch, time, in_features) -> (batch, out_features)."""
    params = self.cell_params()
    step = lambda c, xt: (self.cell(params, c, xt), None)
    carry, _ = jax.lax.scan(step, self.init_carry(x.shape[0]),
                            jnp.swapaxes(x, 0, 1))
    h = carry[0] if isinstance(carry, tuple) else carry
    return self.out(h)


class ElmanRNN(_Recurrent):
  """``h_t = tanh(x_t W_xh + h_{t-1} W_hh + b)``, read-out from ``h_T``.

  ``W_hh = recurrent_scale * Q`` with ``Q`` orthogonal, so its spectral
  radius is exactly ``recurrent_scale``: above 1 the backward signal can grow
  geometrically with the sequence length T (Pascanu et al., 2013), below 1
  it vanishes.

  Args:
    hidden: hidden units, >= 1.
    recurrent_scale: spectral radius of ``W_hh``, > 0 (default 1).
    in_features, out_features: input / output sizes (default 1, 1).
    rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``).
  """

  def __init__(self, hidden: int, recurrent_scale: float = 1.0, *,
               in_features: int = 1, out_features: int = 1,
               rngs: nnx.Rngs | None = None):
    self.hidden = _checks.integer("hidden", hidden, minimum=1)
    _checks.positive("recurrent_scale", recurrent_scale)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.w_xh = nnx.Param(_normal(rngs.params(), (in_features, hidden),
                                  in_features))
    self.w_hh = nnx.Param(recurrent_scale * _orthogonal(rngs.params(), hidden))
    self.b_h = nnx.Param(jnp.zeros((hidden,)))
    self._readout_init(out_features, rngs)

  def cell_params(self):
    return self.w_xh[...], self.w_hh[...], self.b_h[...]

  def cell(self, params, h, x):
    w_xh, w_hh, b = params
    return jnp.tanh(x @ w_xh + h @ w_hh + b)


class _Gated(_Recurrent):
  """Gated cells: ``w_x`` (in, gates*hidden), ``w_h`` (hidden, gates*hidden)
  orthogonal per gate, ``b`` zeros, then the read-out."""

  gates: int

  def __init__(self, hidden: int, *, in_features: int = 1,
               out_features: int = 1, rngs: nnx.Rngs | None = None):
    self.hidden = _checks.integer("hidden", hidden, minimum=1)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    g = self.gates
    self.w_x = nnx.Param(_normal(rngs.params(), (in_features, g * hidden),
                                 in_features))
    self.w_h = nnx.Param(jnp.concatenate(
        [_orthogonal(rngs.params(), hidden) for _ in range(g)], axis=1))
    self.b = nnx.Param(jnp.zeros((g * hidden,)))
    self._readout_init(out_features, rngs)

  def cell_params(self):
    """The arrays ``cell`` needs, read once outside the time scan."""
    return self.w_x[...], self.w_h[...], self.b[...]


class LSTM(_Gated):
  """LSTM (Hochreiter & Schmidhuber, 1997) with forget-gate bias 1.

  ``i, f, o = sigmoid(.)``, ``g = tanh(.)`` of ``x_t W_x + h_{t-1} W_h + b``;
  ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``. The additive cell path
  keeps gradients through time far smaller than an Elman RNN's.

  Args:
    hidden: hidden units, >= 1.
    in_features, out_features: input / output sizes (default 1, 1).
    rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``).
  """

  gates = 4

  def __init__(self, hidden: int, *, in_features: int = 1,
               out_features: int = 1, rngs: nnx.Rngs | None = None):
    super().__init__(hidden, in_features=in_features,
                     out_features=out_features, rngs=rngs)
    self.b = nnx.Param(self.b[...].at[hidden:2 * hidden].set(1.0))  # forget

  def init_carry(self, batch: int):
    z = jnp.zeros((batch, self.hidden))
    return (z, z)

  def cell(self, params, carry, x):
    w_x, w_h, b = params
    h, c = carry
    i, f, g, o = jnp.split(x @ w_x + h @ w_h + b, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return (jax.nn.sigmoid(o) * jnp.tanh(c), c)


class GRU(_Gated):
  """GRU (Cho et al., 2014): ``z, r = sigmoid(.)``,
  ``n = tanh(x W_xn + r * (h W_hn) + b_n)``, ``h_t = (1 - z) n + z h_{t-1}``.

  Args:
    hidden: hidden units, >= 1.
    in_features, out_features: input / output sizes (default 1, 1).
    rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``).
  """

  gates = 3

  def cell(self, params, h, x):
    w_x, w_h, b = params
    xz, xr, xn = jnp.split(x @ w_x + b, 3, axis=-1)
    hz, hr, hn = jnp.split(h @ w_h, 3, axis=-1)
    z, r = jax.nn.sigmoid(xz + hz), jax.nn.sigmoid(xr + hr)
    return (1 - z) * jnp.tanh(xn + r * hn) + z * h
