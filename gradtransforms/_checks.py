"""Argument validation shared by every transform.

Checks run at construction time on Python numbers and on concrete arrays.
Traced values (for example hyperparameters injected by
``optax.inject_hyperparams`` inside ``jit``) cannot be inspected without a host
sync, so they are let through: their range is the caller's responsibility
(their shape is checked: numeric arguments are scalars).

Every failure names the argument: ``TypeError`` for a wrong kind (None,
bool, str, list, non-scalar array, a traced static argument),
``ValueError`` for a value out of range (NaN always; ``inf`` unless the
check allows it).

The library's one rule for ``inf``: a *threshold* (a clip bound, or a level
that triggers an action: ``max_norm``, ``z_thresh``, ``relative_threshold``,
...) is checked by :func:`bound` and accepts ``+inf``, meaning "never clip /
never trigger" (as in optax and torch); ``-inf`` and NaN are refused. Every
other number (decays, epsilons, learning rates, factors of a threshold,
percentiles) must be finite.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(value: Any) -> np.ndarray | None:
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except Exception:  # pragma: no cover - exotic array types
    return None


def _number(name: str, value: Any, allow_inf: bool = False
            ) -> np.ndarray | None:
  """``value`` as a 0-d NumPy array, or None if it is traced.

  Accepted: Python ints and floats, NumPy scalars, 0-d concrete arrays, and
  0-d traced values (``optax.inject_hyperparams`` inside ``jit``). Refused
  with ``TypeError``: None, bools, strings, lists/tuples and arrays of any
  other shape (a list-valued threshold would silently change the output
  shapes). NaN is refused with ``ValueError``, and so is ``+-inf`` unless
  ``allow_inf`` (the sign is left to the caller's range check).
  """
  if (value is None or isinstance(value, (bool, np.bool_, str, bytes)) or
      not (isinstance(value, (int, float, np.number, np.ndarray, jax.Array)))):
    raise TypeError(f"{name} must be a scalar real number (a Python number "
                    f"or a 0-d array), got {value!r}")
  if np.ndim(value) != 0:
    raise TypeError(f"{name} must be a scalar real number, got an array of "
                    f"shape {np.shape(value)}")
  if jnp.result_type(value).kind not in "fiu":
    raise TypeError(f"{name} must be a real number, got {value!r} of dtype "
                    f"{jnp.result_type(value)}")
  arr = _concrete(value)
  if arr is None:
    return None
  if np.isnan(arr):
    raise ValueError(f"{name} must not be NaN, got {value!r}")
  if np.isinf(arr) and not allow_inf:
    raise ValueError(f"{name} must be finite, got {value!r}")
  return arr


def nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> None:
  """Raises unless ``value`` is a scalar ``>= 0`` (where it can be checked);
  ``+inf`` passes only with ``allow_inf``."""
  arr = _number(name, value, allow_inf)
  if arr is not None and arr < 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Any, *, allow_inf: bool = False) -> None:
  """Raises unless ``value`` is a scalar ``> 0`` (where it can be checked);
  ``+inf`` passes only with ``allow_inf``."""
  arr = _number(name, value, allow_inf)
  if arr is not None and arr <= 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def bound(name: str, value: Any, *, strict: bool = False) -> None:
  """A threshold (clip bound or trigger level): a scalar ``>= 0`` (``> 0``
  if ``strict``) or ``+inf``, which means "never clip / never trigger" (as
  in optax and torch). NaN and ``-inf`` raise
  ``ValueError``; None, bools, strings and lists raise ``TypeError``."""
  if strict:
    positive(name, value, allow_inf=True)
  else:
    nonnegative(name, value, allow_inf=True)


def boolean(name: str, value: Any) -> bool:
  """Returns ``value`` as a Python bool; ``TypeError`` unless it is a bool.

  Strings (``"False"`` is truthy), numbers and None are refused, and so is
  a traced value (these flags choose the computation: they are static).
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} is static and cannot be traced; with optax.inject_hyperparams "
        f"pass static_args=({name!r},)")
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}")
  return bool(value)


def in_range(name: str, value: Any, lo: float, hi: float,
             lo_open: bool = False, hi_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``lo <= value <= hi`` (bounds open if asked)."""
  arr = _number(name, value)
  if arr is None:
    return
  bad = bool(arr <= lo) if lo_open else bool(arr < lo)
  bad = bad or (bool(arr >= hi) if hi_open else bool(arr > hi))
  if bad:
    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def integer(name: str, value: Any, minimum: int = 0, static: bool = True) -> Any:
  """Returns ``value`` as a Python int, raising unless it is an int >= minimum.

  These arguments are static (buffer sizes, step counts compiled into the
  step). A concrete integer array (``optax.inject_hyperparams`` at init) is
  accepted; a traced one is refused with a hint to mark it static, unless
  ``static=False`` (a count only compared against, which may be injected).
  """
  if isinstance(value, jax.core.Tracer) and not static:
    return value
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} is static and cannot be traced; with optax.inject_hyperparams "
        f"pass static_args=({name!r},)")
  if (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and
      jnp.issubdtype(value.dtype, jnp.integer)):
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
  return int(value)


def one_of(name: str, value: Any, options: Iterable[str]) -> str:
  """Returns ``value`` if it is one of ``options`` (strings); raises
  ``TypeError`` for a non-string and ``ValueError`` for another string."""
  options = tuple(options)
  if not isinstance(value, str):
    raise TypeError(f"{name} must be one of {options}, got {value!r}")
  if value not in options:
    raise ValueError(f"{name} must be one of {options}, got {value!r}")
  return value


def axis_name(name: str, value: Any) -> Any:
  """Returns a ``shard_map``/``pmap`` axis name: None, a str or a tuple of
  strs (several mesh axes); ``TypeError`` otherwise."""
  ok = value is None or isinstance(value, str) or (
      isinstance(value, tuple) and value and
      all(isinstance(v, str) for v in value))
  if not ok:
    raise TypeError(f"{name} must be None, an axis name (str) or a tuple of "
                    f"axis names, got {value!r}")
  return value


def transformation(name: str, value: Any) -> Any:
  """Raises ``TypeError`` unless ``value`` is an optax transformation (an
  object with ``init`` and ``update``), naming the common mistake of passing
  the factory (``optax.adam``) instead of an instance (``optax.adam(1e-3)``)."""
  if callable(getattr(value, "init", None)) and callable(
      getattr(value, "update", None)):
    return value
  hint = ""
  if callable(value):
    hint = (f"; {getattr(value, '__name__', value)!s} looks like a factory: "
            "call it (e.g. optax.adam(1e-3))")
  raise TypeError(f"{name} must be an optax.GradientTransformation, got "
                  f"{value!r}{hint}")


def float_leaves(name: str, tree: Any) -> None:
  """Raises ``TypeError`` at trace time if any leaf is not a float array."""
  for leaf in jax.tree.leaves(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{name} must contain only floating-point arrays, found dtype {dtype}")


def needs_params(name: str, params: Any) -> None:
  if params is None:
    raise ValueError(f"{name} needs params: call update(updates, state, params)")


def ints_as_float(name: str, tree: Any) -> Any:
  """``tree`` with integer leaves cast to float32, as optax's clips that
  accept them compute (``clip_by_block_rms``, ``adaptive_grad_clip``,
  ``per_example_global_norm_clip`` return float32 for integer input);
  ``TypeError`` at trace time for a leaf that is neither float nor integer
  (bool, complex)."""
  def one(leaf):
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.floating):
      return leaf
    if jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_:
      return jnp.asarray(leaf, jnp.float32)
    raise TypeError(f"{name} must contain only floating-point or integer "
                    f"arrays, found dtype {dtype}")
  return jax.tree.map(one, tree)


def state_optional(init_fn: Any, update_fn: Any) -> Any:
  """``update_fn`` that also takes ``state=None``, as optax's stateless
  clips do (``tx.update(updates, None)``): the step runs from a fresh state
  (``init_fn(updates)``: the updates have the params' structure) and
  returns the updates and that step's state (its figures), where optax
  returns the ``None`` it was given."""
  def update(updates, state, params=None):
    if state is None:
      state = init_fn(updates)
    return update_fn(updates, state, params)
  update.__doc__ = update_fn.__doc__
  return update
