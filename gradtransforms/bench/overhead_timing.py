"""Timing the overhead benchmark: methods interleaved round-robin against
one Adam baseline per chunk, one row per method and workload; and the
compile time of each method's step against Adam's as the leaves grow."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradtransforms.bench.overhead_steps import (
    ACCEL_OPTAX_MARGIN, CHUNK, GROUP, MODELS, REFERENCE, ModelRunner, Runner,
    build, make_stacked, make_tree, target)
from gradtransforms.catalogue import CATALOGUE


def _time(runners: dict, rounds: int, warmup: int) -> dict[str, np.ndarray]:
  for _ in range(warmup):
    for r in runners.values():
      r()
  times: dict[str, list[float]] = {k: [] for k in runners}
  for _ in range(rounds):
    for k, r in runners.items():
      times[k].append(r())
  return {k: np.asarray(v) for k, v in times.items()}


def _runner_for(name, make_runner, layer_axes):
  """(runner, optax runner or None, layer_axes used or a note why not)."""
  opt = optax.adam(1e-3)
  if layer_axes is not None and name in CATALOGUE and CATALOGUE[name].layer_axes:
    try:
      ours, ref = build(name, opt, layer_axes)
      return make_runner(ours), ref and make_runner(ref), layer_axes
    except (TypeError, ValueError) as e:  # transform does not take layer_axes yet
      note = f"layer_axes rejected ({type(e).__name__}): per-leaf"
      ours, ref = build(name, opt)
      return make_runner(ours), ref and make_runner(ref), note
  ours, ref = build(name, opt)
  return make_runner(ours), ref and make_runner(ref), None


def _rows(names, make_runner, rounds, warmup, info, progress,
          layer_axes=None) -> list[dict]:
  """Times ``names`` in chunks, each against its own Adam baseline."""
  platform_name = jax.devices()[0].platform
  adam = make_runner(optax.adam(1e-3))
  one_read_kernels = make_runner(build(REFERENCE, optax.adam(1e-3))[0]).kernels
  rows = []
  for c in range(0, len(names), CHUNK):
    chunk = names[c:c + CHUNK]
    progress.start(f"{info['workload']}: {', '.join(chunk)}")
    runners: dict[str, Runner] = {"adam": adam}
    notes = {}
    for name in chunk:
      runners[name], ref, notes[name] = _runner_for(name, make_runner, layer_axes)
      if ref is not None:
        runners["optax:" + name] = ref
      if layer_axes is not None and notes[name] == layer_axes:  # also per leaf
        runners["per_leaf:" + name] = make_runner(build(name, optax.adam(1e-3))[0])
    times = _time(runners, rounds, warmup)
    base = times["adam"]
    for name in chunk:
      r = runners[name]
      row = dict(info, method=name, group=GROUP[name],
                 adam_ms=1e3 * float(np.median(base)),
                 ms=1e3 * float(np.median(times[name])),
                 vs_adam=float(np.median(times[name] / base)),
                 compile_s=r.compile_s, adam_compile_s=adam.compile_s,
                 faults=float(np.median(r.faults)),
                 adam_faults=float(np.median(adam.faults)),
                 kernels=r.kernels, adam_kernels=adam.kernels,
                 one_read_kernels=one_read_kernels,
                 target=target(name, platform_name), layer_axes=notes[name],
                 optax_margin=(ACCEL_OPTAX_MARGIN if platform_name != "cpu" and
                               (GROUP[name] == "static" or name == "guard")
                               else None))
      if "optax:" + name in times:
        ref_t = times["optax:" + name]
        row["optax_vs_adam"] = float(np.median(ref_t / base))
        row["vs_optax"] = float(np.median(times[name] / ref_t))
        row["optax_kernels"] = runners["optax:" + name].kernels
      if "per_leaf:" + name in times:  # the same transform without layer_axes
        row["per_leaf_vs_adam"] = float(np.median(times["per_leaf:" + name] / base))
      rows.append(row)
    progress.done()
    del runners
  return rows


def measure_trees(n_params, n_leaves, names, rounds, warmup, k, progress
                  ) -> list[dict]:
  params = make_tree(n_params, n_leaves, 0)
  grads = make_tree(n_params, n_leaves, 1)
  return _rows(names, lambda tx: Runner(tx, params, grads, k), rounds, warmup,
               {"workload": f"{n_params / 1e6:g}M params, {n_leaves} leaves",
                "kind": "tree", "params": n_params, "leaves": n_leaves},
               progress)


def measure_stacked(n_params, layers, n_leaves, names, rounds, warmup, k,
                    progress) -> list[dict]:
  params = make_stacked(n_params, layers, n_leaves, 0)
  grads = make_stacked(n_params, layers, n_leaves, 1)
  return _rows(names, lambda tx: Runner(tx, params, grads, k), rounds, warmup,
               {"workload": f"{n_params / 1e6:g}M params, {layers} layers "
                f"stacked in {n_leaves} leaves", "kind": "stacked",
                "params": n_params, "leaves": n_leaves, "layers": layers},
               progress, layer_axes=0)


def measure_models(names, rounds, warmup, k, progress) -> list[dict]:
  rows = []
  for label, (make, shape) in MODELS.items():
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jnp.zeros((shape[0], 1))
    leaves = jax.tree.leaves(nnx.state(make(), nnx.Param))
    rows += _rows(names, lambda tx: ModelRunner(tx, make(), x, y, k), rounds,
                  warmup, {"workload": f"{label} train step", "kind": "model",
                           "params": sum(p.size for p in leaves),
                           "leaves": len(leaves)}, progress)
  return rows


def _compile_s(tx, params) -> float:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  t0 = time.perf_counter()
  jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile()
  return time.perf_counter() - t0


def compile_times(names, n_leaves: int, progress, repeats: int = 1
                  ) -> list[dict]:
  """Seconds to compile the donated step of Adam and of each method (with
  Adam) on ``n_leaves`` small leaves of a few shapes (compile time depends
  on the leaves, not their size); Adam is compiled again after each method
  and each ratio taken against the nearer Adam, so drift cancels. With
  ``repeats`` > 1 each figure is the fastest of that many compiles, the
  method's and Adam's interleaved (one compile on a shared machine varies
  by up to a third)."""
  progress.start(f"compile times, {n_leaves} leaves")
  params = {f"l{i:04d}": jnp.zeros((16, 8 + i % 5), jnp.float32)
            for i in range(n_leaves)}
  rows = []
  adam = _compile_s(optax.adam(1e-3), params)
  for name in names:
    if name == REFERENCE:
      continue
    s, again = np.inf, np.inf
    for _ in range(repeats):
      s = min(s, _compile_s(build(name, optax.adam(1e-3))[0], params))
      again = min(again, _compile_s(optax.adam(1e-3), params))
    base = min(adam, again)
    rows.append({"method": name, "group": GROUP[name], "leaves": n_leaves,
                 "compile_s": s, "adam_compile_s": base,
                 "vs_adam": s / base, "repeats": repeats})
    adam = again
  progress.done()
  return rows
