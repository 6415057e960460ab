"""Shared fixtures. 8 host devices for the sharding tests: set before JAX loads."""

import os

# LLVM at -O0 and in one module for the CPU executables: the tests read the
# optimized HLO (fusions, copies, buffers), which XLA's own passes make and
# these flags do not touch (the same text, checked for every catalogue
# step), and run small shapes; compiles, most of the suite's time, are
# about a fifth faster (the two test processes share 2 cores: splitting
# codegen over threads gains nothing).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_cpu_parallel_codegen_split_count=1").strip()
# CPU only, also in subprocesses: the CUDA plugin of the accel extra must
# never try to open a GPU; libtpu (deviceless TPU compiles) takes a lockfile
# that concurrent test processes would otherwise fight over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def random_tree(seed: int = 0, scale: float = 1.0, dtype=jnp.float32):
  """A small pytree with leaves of rank 0-4 (nested dict, list, tuple)."""
  rng = np.random.default_rng(seed)
  shapes = {"dense": {"w": (6, 5), "b": (5,)}, "conv": [(3, 3, 2, 4), (4,)],
            "scalar": (), "emb": ((7, 3),)}
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s) * scale, dtype), shapes,
      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))


@pytest.fixture
def tree():
  return random_tree(0, scale=2.0)


def np_leaves(t):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


def np_global_norm(t):
  return float(np.sqrt(sum(np.sum(x * x) for x in np_leaves(t))))


@pytest.fixture
def force_platform(monkeypatch):
  """``force_platform("cuda")`` (or ``"tpu"``): for the rest of the test
  every ``lax.platform_dependent`` takes that branch (else its default), as
  when the step is lowered for that chip, and runs it here on the CPU."""
  def force(platform):
    def pick(*args, default=None, **branches):
      return branches.get(platform, default)(*args)
    monkeypatch.setattr(jax.lax, "platform_dependent", pick)
  return force
