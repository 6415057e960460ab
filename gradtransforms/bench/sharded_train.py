"""Data-parallel training of a reference model with gradtransforms, sharded.

The batch is split over a 1-D device mesh ("data"), parameters and optimizer
state are replicated, and the step is one ``jax.jit``: XLA inserts the
gradient all-reduce, so the clip and the guard see global gradients and
every device takes the same decision, with no ``axis_name`` needed. (Inside
``shard_map`` you would pass ``axis_name`` instead; see the README.)

On a CPU-only machine it asks JAX for --cpu-devices host devices (this only
works before JAX has started its backend). It then checks that the sharded
run matches the same run on one device (exit status 1 if not).
"""

from __future__ import annotations

from gradtransforms._extras import require

require("demo", "flax", "matplotlib", "rich", what="gradtransforms bench")

import argparse  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradtransforms as gt  # noqa: E402
from gradtransforms.bench import HelpFormatter, positive_int  # noqa: E402
from gradtransforms.models import DeepMLP  # noqa: E402
from gradtransforms.tasks import corrupted, deep_regression  # noqa: E402


def train(mesh: Mesh | None, steps: int, batch: int, seed: int = 0):
  task = corrupted(deep_regression(16), prob=0.03, scale=100.0)
  model = DeepMLP(4, 128, in_features=16, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = gt.guard(optax.chain(gt.clip_by_global_norm(1.0), optax.adam(3e-3)),
                on="spike", warmup_steps=10)
  opt_state = tx.init(params)
  if mesh is not None:
    replicated = NamedSharding(mesh, P())
    params, opt_state = jax.device_put((params, opt_state), replicated)
    data = NamedSharding(mesh, P("data"))
  else:
    data = None

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return task.loss(nnx.merge(graphdef, p)(x), y)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(steps):
    x, y = task.sample(jax.random.PRNGKey(1000 + i), batch)
    if data is not None:
      x, y = jax.device_put((x, y), data)
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  return np.asarray(losses), gt.metrics(opt_state)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                               formatter_class=HelpFormatter)
  ap.add_argument("--steps", type=positive_int, default=150, help="training steps")
  ap.add_argument("--batch", type=positive_int, default=256,
                  help="global batch size; a multiple of the device count")
  ap.add_argument("--cpu-devices", type=positive_int, default=8,
                  help="host devices to ask for when JAX runs on CPU")
  return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  ap = parser(prog)
  args = ap.parse_args(argv)
  try:  # only possible before the backend starts; harmless on GPU/TPU
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  except RuntimeError as e:
    print(f"note: {e}", file=sys.stderr)
  devices = jax.devices()
  if args.batch % len(devices):
    ap.error(f"--batch must be a multiple of the {len(devices)} devices")
  mesh = Mesh(np.asarray(devices), ("data",))
  print(f"{len(devices)} {devices[0].platform} devices, batch {args.batch} "
        f"({args.batch // len(devices)} per device)", flush=True)
  losses, m = train(mesh, args.steps, args.batch)
  ref, ref_m = train(None, args.steps, args.batch)
  every = max(args.steps // 6, 1)
  for i in range(0, args.steps, every):
    print(f"step {i:4d}  loss {losses[i]:.4f}  (one device: {ref[i]:.4f})")
  print(f"guard skipped {int(m['guard/skipped'])} steps "
        f"(one device: {int(ref_m['guard/skipped'])}); final loss "
        f"{np.median(losses[-10:]):.4f}")
  same = np.allclose(losses, ref, rtol=1e-3, atol=1e-5)
  print("sharded == single device:", same)
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
