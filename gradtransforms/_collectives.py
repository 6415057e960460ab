"""Collectives over a named axis that mean what one device's reductions mean.

``lax.pmax`` drops NaN on XLA:CPU (``pmax([nan, 1]) == 1``, measured with
jax 0.10.2 under ``shard_map`` on host devices), where ``jnp.max`` on one
device gives NaN. A figure that is a maximum (clippy's peaks, spike_clip's
excess, per_example_clip's largest norm) would then read as finite on the
sharded run and NaN on the single-device one, and a NaN in one shard would
steer the step. :func:`pmax` carries a NaN flag in the same collective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def psum(x: Any, axis_name: str | None) -> Any:
  """``lax.psum`` over ``axis_name``; ``x`` itself where it is ``None``."""
  return x if axis_name is None else lax.psum(x, axis_name)


def pmax(x: Any, axis_name: str | None) -> Any:
  """``lax.pmax`` of a pytree over ``axis_name`` that is NaN where any
  device's entry is NaN, as ``jnp.max`` is; ``x`` itself where
  ``axis_name`` is ``None``. One collective: each floating leaf goes with
  its NaN flag (``isnan`` in its own dtype) in the same ``pmax``."""
  if axis_name is None:
    return x
  leaves, treedef = jax.tree.flatten(x)
  floats = [k for k, v in enumerate(leaves)
            if jnp.issubdtype(v.dtype, jnp.floating)]
  flags = [jnp.isnan(leaves[k]).astype(leaves[k].dtype) for k in floats]
  out = lax.pmax(leaves + flags, axis_name)
  done = list(out[:len(leaves)])
  for k, f in zip(floats, out[len(leaves):]):
    done[k] = jnp.where(f > 0, jnp.nan, done[k]).astype(done[k].dtype)
  return jax.tree.unflatten(treedef, done)
