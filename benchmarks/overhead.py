"""Clipping overhead: each transform with Adam, as a ratio to Adam alone.

Every method runs inside the same donated ``jax.jit`` training step
(``update`` + ``apply_updates``) on the same gradients. Methods are timed
interleaved, round-robin, in one process after warm-up; each ratio is the
median over rounds of (method time / Adam time in the same round), so machine
drift cancels. Compile times are reported too, and minor page faults per
step: on CPU, XLA allocates its temporaries afresh every step, and a
temporary over glibc's mmap threshold (32 MB) is page-faulted each time,
which costs more than the arithmetic (at 10M parameters one extra
parameter-sized buffer roughly doubles an Adam step). The row "reference:
one read" only reads the gradients once (a sum of squares): what any clip
that needs a norm costs at least. Part (b) does the same for full training
steps (forward, backward, update) of the reference models.

    python benchmarks/overhead.py                  # full run (make bench)
    python benchmarks/overhead.py --quick          # 1M params, a smoke test
    python benchmarks/overhead.py --sizes 10 50 --leaves 100 --only zclip
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradtransforms as gt
from gradtransforms.models import LSTM, DeepMLP, ElmanRNN

RESULTS = Path(__file__).resolve().parent / "results"


def _before(make):
  """A transform chained before the optimizer."""
  return lambda opt: optax.chain(make(), opt)


def _one_read() -> optax.GradientTransformation:
  """Reference, not a clip: records the gradients' sum of squares and passes
  them on. It only reads every gradient once: what any clip or detector
  that needs a norm costs at least."""
  def update_fn(updates, state, params=None):
    del state, params
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
    return jax.lax.optimization_barrier((updates, sq))
  return optax.GradientTransformation(lambda _: jnp.zeros(()), update_fn)


# name -> (gradtransforms optimizer, optax equivalent or None, group). Each
# takes the base optimizer (optax.adam(1e-3)) and returns the full one.
METHODS: dict[str, tuple[Callable, Callable | None, str]] = {
    "reference: one read": (_before(_one_read), None, "reference"),
    "clip_by_value": (_before(lambda: gt.clip_by_value(1e-3)),
                      _before(lambda: optax.clip(1e-3)), "static"),
    "clip_by_global_norm": (_before(lambda: gt.clip_by_global_norm(1.0)),
                            _before(lambda: optax.clip_by_global_norm(1.0)),
                            "static"),
    "clip_by_leaf_norm": (_before(lambda: gt.clip_by_leaf_norm(0.1)), None,
                          "static"),
    "clip_by_block_rms": (_before(lambda: gt.clip_by_block_rms(1e-3)),
                          _before(lambda: optax.clip_by_block_rms(1e-3)),
                          "static"),
    "adaptive_grad_clip": (_before(lambda: gt.adaptive_grad_clip(0.01)),
                           _before(lambda: optax.adaptive_grad_clip(0.01)),
                           "static"),
    "autoclip": (_before(lambda: gt.autoclip(10.0, history=1000)), None,
                 "adaptive"),
    "zclip": (_before(gt.zclip), None, "adaptive"),
    "adagc": (_before(gt.adagc), None, "adaptive"),
    "quantile_clip": (_before(gt.quantile_clip), None, "adaptive"),
    "spike_clip": (_before(gt.spike_clip), None, "adaptive"),
    "clippy": (lambda opt: optax.chain(opt, gt.clippy()), None, "adaptive"),
    "monitor": (_before(gt.monitor), None, "detection"),
    "monitor(per_leaf)": (_before(lambda: gt.monitor(per_leaf=True)), None,
                          "detection"),
    "detect_spikes": (_before(gt.detect_spikes), None, "detection"),
    "guard": (gt.guard, lambda opt: optax.apply_if_finite(opt, 10),
              "detection"),
    "clip_by_global_norm+monitor": (
        lambda opt: optax.chain(gt.monitor(), gt.clip_by_global_norm(1.0), opt),
        None, "detection"),
}
TARGET = {"static": 1.10, "adaptive": 1.15, "detection": 1.05,
          "reference": float("nan")}
CHUNK = 4  # methods timed together against one Adam baseline (bounds memory)


def make_tree(n_params: int, n_leaves: int, seed: int = 0) -> dict:
  """``n_leaves`` 2-D float32 leaves totalling about ``n_params`` elements."""
  rng = np.random.default_rng(seed)
  per = max(n_params // n_leaves, 4)
  cols = max(int(np.sqrt(per)), 2)
  rows = max(per // cols, 2)
  return {f"layer{i:03d}": jnp.asarray(
      rng.standard_normal((rows, cols), np.float32) * 0.02)
          for i in range(n_leaves)}


class Runner:
  """A compiled, donated step with its own params and state, timed per call."""

  def __init__(self, tx, params, grads):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._compile(step, tx, jax.tree.map(jnp.copy, params), grads)

  def _compile(self, step, tx, params, data) -> None:
    """Compiles ``step(params, state, data)`` donating params and state."""
    self.params, self.state, self.grads = params, tx.init(params), data
    self.faults: list[int] = []  # minor page faults of each timed call
    t0 = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
        self.params, self.state, self.grads).compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self) -> float:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready(self.params)
    t = time.perf_counter() - t0
    self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return t


class ModelRunner(Runner):
  """A full training step (forward, backward, update) of a reference model."""

  def __init__(self, tx, model, x, y):
    graphdef, params = nnx.split(model, nnx.Param)

    def step(params, state, batch):
      x, y = batch
      loss_fn = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(x) - y))
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._compile(step, tx, params, (x, y))


def _time(runners: dict, rounds: int, warmup: int) -> dict[str, np.ndarray]:
  for _ in range(warmup):
    for r in runners.values():
      r()
  times = {k: [] for k in runners}
  for _ in range(rounds):
    for k, r in runners.items():
      times[k].append(r())
  return {k: np.asarray(v) for k, v in times.items()}


def _rows(names, make_runner, rounds, warmup, info) -> list[dict]:
  """Times ``names`` in chunks, each against its own Adam baseline."""
  rows = []
  for c in range(0, len(names), CHUNK):
    chunk = names[c:c + CHUNK]
    runners = {"adam": make_runner(optax.adam(1e-3))}
    for name in chunk:
      ours, ref, _ = METHODS[name]
      runners[name] = make_runner(ours(optax.adam(1e-3)))
      if ref is not None:
        runners["optax:" + name] = make_runner(ref(optax.adam(1e-3)))
    times = _time(runners, rounds, warmup)
    base = times["adam"]
    for name in chunk:
      group = METHODS[name][2]
      row = dict(info, method=name, group=group,
                 adam_ms=1e3 * float(np.median(base)),
                 ms=1e3 * float(np.median(times[name])),
                 vs_adam=float(np.median(times[name] / base)),
                 compile_s=runners[name].compile_s,
                 # minor page faults per step (median): fresh temporaries
                 faults=float(np.median(runners[name].faults)),
                 adam_faults=float(np.median(runners["adam"].faults)),
                 adam_compile_s=runners["adam"].compile_s, target=TARGET[group])
      if "optax:" + name in times:
        ref_t = times["optax:" + name]
        row["optax_vs_adam"] = float(np.median(ref_t / base))
        row["vs_optax"] = float(np.median(times[name] / ref_t))
      rows.append(row)
    del runners
  return rows


def measure_trees(n_params, n_leaves, names, rounds, warmup) -> list[dict]:
  params = make_tree(n_params, n_leaves, 0)
  grads = make_tree(n_params, n_leaves, 1)
  return _rows(names, lambda tx: Runner(tx, params, grads), rounds, warmup,
               {"workload": f"{n_params / 1e6:g}M params, {n_leaves} leaves",
                "params": n_params, "leaves": n_leaves})


MODELS = {
    "DeepMLP(16x512)": (lambda: DeepMLP(16, 512, in_features=64,
                                        rngs=nnx.Rngs(0)), (256, 64)),
    "ElmanRNN(256), T=50": (lambda: ElmanRNN(256, 1.0, in_features=8,
                                             rngs=nnx.Rngs(0)), (64, 50, 8)),
    "LSTM(128), T=50": (lambda: LSTM(128, in_features=8, rngs=nnx.Rngs(0)),
                        (64, 50, 8)),
}


def measure_models(names, rounds, warmup) -> list[dict]:
  rows = []
  for label, (make, shape) in MODELS.items():
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jnp.zeros((shape[0], 1))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(make(), nnx.Param)))
    rows += _rows(names, lambda tx: ModelRunner(tx, make(), x, y), rounds,
                  warmup, {"workload": f"{label} train step", "params": n,
                           "leaves": len(jax.tree.leaves(nnx.state(make(),
                                                                   nnx.Param)))})
  return rows


def machine() -> dict:
  dev = jax.devices()[0]
  return {"date": date.today().isoformat(), "platform": dev.platform,
          "device": dev.device_kind, "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "optax": optax.__version__}


def to_markdown(rows: list[dict], info: dict) -> str:
  lines = [f"Step time of each method with `optax.adam` / Adam alone, median of "
           f"paired per-round ratios. {info['device']} ({info['platform']}), "
           f"{info['cpu_count']} cores, jax {info['jax']}, optax "
           f"{info['optax']}, {info['date']}.", "",
           "| workload | method | Adam ms | ms | vs Adam | target | "
           "optax equiv. vs Adam | vs optax | page faults/step (Adam) | "
           "compile s (Adam) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    over = " **over**" if r["vs_adam"] > r["target"] else ""
    lines.append(
        f"| {r['workload']} | {r['method']} | {r['adam_ms']:.2f} | "
        f"{r['ms']:.2f} | {r['vs_adam']:.3f}{over} | {r['target']:.2f} | "
        f"{r.get('optax_vs_adam', float('nan')):.3f} | "
        f"{r.get('vs_optax', float('nan')):.3f} | "
        f"{r['faults']:.0f} ({r['adam_faults']:.0f}) | "
        f"{r['compile_s']:.2f} ({r['adam_compile_s']:.2f}) |")
  return "\n".join(lines).replace("nan", "-") + "\n"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  trees = [r for r in rows if r["workload"].endswith("leaves")]
  if not trees:
    return
  names = list(dict.fromkeys(r["method"] for r in trees))
  loads = list(dict.fromkeys(r["workload"] for r in trees))
  fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names) * len(loads) / 3), 4.5))
  w = 0.8 / len(loads)
  for j, load in enumerate(loads):
    vals = [next((r["vs_adam"] for r in trees if r["method"] == n and
                  r["workload"] == load), np.nan) for n in names]
    ax.bar(np.arange(len(names)) + j * w, vals, w, label=load)
  for group, target in TARGET.items():
    ax.axhline(target, ls="--", lw=0.8, color="gray")
  ax.axhline(1.0, color="black", lw=0.8)
  ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names, rotation=45,
                ha="right", fontsize=8)
  ax.set_ylabel("step time / Adam alone")
  ax.set_ylim(0.9, max(1.6, np.nanmax([r["vs_adam"] for r in trees]) + 0.05))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50],
                  help="parameter counts, in millions")
  ap.add_argument("--leaves", type=int, nargs="+", default=[10, 100, 500])
  ap.add_argument("--only", nargs="+", default=None, choices=sorted(METHODS))
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--no-models", action="store_true")
  ap.add_argument("--quick", action="store_true", help="1M params, 10 leaves")
  ap.add_argument("--out", default=str(RESULTS / "overhead"))
  args = ap.parse_args(argv)
  if args.quick:
    args.sizes, args.leaves, args.rounds, args.no_models = [1], [10], 5, True
  names = args.only or list(METHODS)
  info = machine()
  rows = []
  for size in args.sizes:
    for leaves in args.leaves:
      print(f"-- {size:g}M params, {leaves} leaves", file=sys.stderr, flush=True)
      rows += measure_trees(int(size * 1e6), leaves, names, args.rounds,
                            args.warmup)
  if not args.no_models:
    print("-- reference models", file=sys.stderr, flush=True)
    rows += measure_models(names, args.rounds, args.warmup)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  md = to_markdown(rows, info)
  out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows},
                                                 indent=1))
  out.with_suffix(".md").write_text(md)
  plot(rows, out.with_suffix(".png"))
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
