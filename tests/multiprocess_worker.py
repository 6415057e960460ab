"""One process of the multi-process test (tests/test_multiprocess.py).

``python multiprocess_worker.py --out F.npz --process-id I --num-processes N
--port P`` joins a ``jax.distributed`` run on ``localhost:P`` (CPU
collectives via gloo, ``--devices`` host devices per process) and trains a
small model whose params and batch are sharded over all devices under one
``jax.jit``, with ``clip_by_global_norm``, ``adagc``, ``guard`` and
``monitor``. At step ``NAN_STEP`` the batch rows of the LAST device (a
shard that only the last process holds) are NaN. It writes, per step, the
guard's decision and every scalar figure, and the final params (gathered),
to ``--out``. Without ``--port`` it runs alone on all its devices (the
single-process reference; :func:`train` is also importable).
"""

from __future__ import annotations

import argparse
import os
import sys

STEPS, NAN_STEP, BATCH = 8, 5, 32


def _setup_env(devices: int) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={devices}"])


def _data(step: int):
  import numpy as np
  rng = np.random.default_rng(100 + step)
  x = rng.normal(size=(BATCH, 16)).astype(np.float32)
  y = rng.normal(size=(BATCH, 8)).astype(np.float32)
  if step == NAN_STEP:
    x[-BATCH // 8:] = np.nan  # the rows of the last of the 8 devices
  return x, y


def train(devices):
  """Trains on a mesh of ``devices`` (all processes' devices); returns
  ``(skips, figures, params)`` as NumPy, the same on every process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import gradtransforms as gt

  mesh = Mesh(np.asarray(devices), ("d",))
  shard, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())

  def put(x, sharding):  # each process supplies only its own shards
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 8)).astype(np.float32) * 0.3,
            "w2": rng.normal(size=(8, 8)).astype(np.float32) * 0.3,
            "b": np.zeros((8,), np.float32)}
  params = {k: put(v, shard) for k, v in params.items()}
  tx = optax.chain(
      gt.monitor(per_leaf=True),
      gt.guard(optax.chain(gt.clip_by_global_norm(1.0),
                           gt.adagc(warmup_steps=2), optax.adam(1e-2)),
               warmup_steps=3))

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w1"])
    return jnp.mean((h @ p["w2"] + p["b"] - y) ** 2)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)
    figs = {k: v for k, v in gt.metrics(state, per_leaf=False).items()}
    figs = jax.lax.with_sharding_constraint(figs, rep)
    return optax.apply_updates(params, updates), state, figs

  state = jax.jit(tx.init)(params)
  skips, figures = [], []
  for t in range(STEPS):
    x, y = _data(t)
    params, state, figs = step(params, state, put(x, shard), put(y, shard))
    figs = {k: np.asarray(v) for k, v in figs.items()}
    skips.append(bool(figs["guard/bad"]))
    figures.append(figs)
  out = {k: np.asarray(v) for k, v in
         multihost_utils.process_allgather(params, tiled=True).items()}
  # the processes holding the NaN rows
  owner = {d.process_index for d, ix in shard.devices_indices_map(
      (BATCH,)).items() if ix[0].start == BATCH - BATCH // 8}
  return skips, figures, out, owner


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--port", type=int, default=None)
  ap.add_argument("--devices", type=int, default=4)
  args = ap.parse_args(argv)
  _setup_env(args.devices)
  import jax
  import numpy as np
  if args.port is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes, process_id=args.process_id,
        initialization_timeout=120)
  skips, figures, params, owner = train(jax.devices())
  keys = sorted(figures[0])
  np.savez(args.out, skips=np.asarray(skips), keys=np.asarray(keys),
           figures=np.stack([np.stack([np.asarray(f[k], np.float64).reshape(())
                                       for k in keys]) for f in figures]),
           owner=np.asarray(sorted(owner)),
           process_count=np.asarray(jax.process_count()),
           local_devices=np.asarray(jax.local_device_count()),
           **{f"param_{k}": v for k, v in params.items()})
  if args.port is not None:
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
