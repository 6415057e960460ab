"""Argument validation shared by every transform.

Checks run at construction time on Python numbers and on concrete arrays.
Traced values (for example hyperparameters injected by
``optax.inject_hyperparams`` inside ``jit``) cannot be inspected without a host
sync, so they are let through: their range is the caller's responsibility.
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


def _number(name: str, value: Any) -> np.ndarray | None:
  if isinstance(value, bool) or value is None:
    raise TypeError(f"{name} must be a real number, got {value!r}")
  arr = _concrete(value)
  if arr is None:
    return None
  if arr.dtype.kind not in "fiu":
    raise TypeError(f"{name} must be a real number, got {value!r}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {value!r}")
  return arr


def nonnegative(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value >= 0`` (where it can be checked)."""
  arr = _number(name, value)
  if arr is not None and np.any(arr < 0):
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value > 0`` (where it can be checked)."""
  arr = _number(name, value)
  if arr is not None and np.any(arr <= 0):
    raise ValueError(f"{name} must be > 0, got {value!r}")


def in_range(name: str, value: Any, lo: float, hi: float,
             lo_open: bool = False, hi_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``lo <= value <= hi`` (bounds open if asked)."""
  arr = _number(name, value)
  if arr is None:
    return
  bad = np.any(arr <= lo) if lo_open else np.any(arr < lo)
  bad = bad or (np.any(arr >= hi) if hi_open else np.any(arr > hi))
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
  """Returns ``value`` if it is one of ``options``; raises ``ValueError`` else."""
  options = tuple(options)
  if value not in options:
    raise ValueError(f"{name} must be one of {options}, got {value!r}")
  return value


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


def boolean(name: str, value: Any) -> bool:
  """Returns ``value`` if it is a bool (NumPy bools too); raises ``TypeError``
  for anything else, strings such as ``"False"`` included."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"{name} must be a bool, got {value!r}")
