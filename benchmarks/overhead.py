"""Clipping overhead: each transform chained before Adam, as a ratio to Adam alone.

Every method runs inside the same donated ``jax.jit`` training step
(``update`` + ``apply_updates``) on the same gradients. Methods are timed
interleaved, round-robin, in one process after warm-up, and each ratio is
the median over rounds of (method time / Adam time in the same round), so
machine drift cancels. Compile time is reported too.

    python benchmarks/overhead.py                  # full run (make bench)
    python benchmarks/overhead.py --quick          # 1M params, a smoke test
    python benchmarks/overhead.py --sizes 10 50 --leaves 100 --only global_norm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtransforms as gt

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (gradtransforms transform, optax equivalent or None, group)
# Each is chained before optax.adam(1e-3).
METHODS: dict[str, tuple[Callable, Callable | None, str]] = {
    "clip_by_value": (lambda: gt.clip_by_value(1e-3),
                      lambda: optax.clip(1e-3), "static"),
    "clip_by_global_norm": (lambda: gt.clip_by_global_norm(1.0),
                            lambda: optax.clip_by_global_norm(1.0), "static"),
    "clip_by_leaf_norm": (lambda: gt.clip_by_leaf_norm(0.1), None, "static"),
    "clip_by_block_rms": (lambda: gt.clip_by_block_rms(1e-3),
                          lambda: optax.clip_by_block_rms(1e-3), "static"),
    "adaptive_grad_clip": (lambda: gt.adaptive_grad_clip(0.01),
                           lambda: optax.adaptive_grad_clip(0.01), "static"),
}
TARGET = {"static": 1.10, "adaptive": 1.15, "detection": 1.05}


def _register_optional():
  """Adaptive and detection transforms, where this version has them."""
  extra = {
      "autoclip": (lambda: gt.autoclip(10.0, history=1000), None, "adaptive"),
      "zclip": (lambda: gt.zclip(), None, "adaptive"),
      "adagc": (lambda: gt.adagc(), None, "adaptive"),
      "spike_clip": (lambda: gt.spike_clip(), None, "adaptive"),
      "clippy": (lambda: gt.clippy(), None, "adaptive"),
      "quantile_clip": (lambda: gt.quantile_clip(), None, "adaptive"),
      "monitor": (lambda: gt.monitor(), None, "detection"),
      "monitor_per_leaf": (lambda: gt.monitor(per_leaf=True), None, "detection"),
      "detect_spikes": (lambda: gt.detect_spikes(), None, "detection"),
  }
  for name, entry in extra.items():
    if hasattr(gt, name.replace("_per_leaf", "")):
      METHODS[name] = entry


def make_tree(n_params: int, n_leaves: int, seed: int = 0) -> dict:
  """``n_leaves`` 2-D float32 leaves totalling about ``n_params`` elements."""
  rng = np.random.default_rng(seed)
  per = max(n_params // n_leaves, 4)
  cols = max(int(np.sqrt(per)), 2)
  rows = max(per // cols, 2)
  return {f"layer{i:03d}": jnp.asarray(rng.normal(size=(rows, cols)) * 0.02,
                                       jnp.float32)
          for i in range(n_leaves)}


def make_step(tx: optax.GradientTransformation):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


class Runner:
  """A compiled step with its own params and state, timed one call at a time."""

  def __init__(self, tx, params, grads):
    self.step = make_step(tx)
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    self.grads = grads
    t0 = time.perf_counter()
    self.step = self.step.lower(self.params, self.state, grads).compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self) -> float:
    t0 = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready(self.params)
    return time.perf_counter() - t0


def measure(n_params: int, n_leaves: int, names: list[str], rounds: int,
            warmup: int) -> list[dict]:
  params = make_tree(n_params, n_leaves, 0)
  grads = make_tree(n_params, n_leaves, 1)
  runners = {"adam": Runner(optax.adam(1e-3), params, grads)}
  for name in names:
    ours, ref, _ = METHODS[name]
    runners[name] = Runner(optax.chain(ours(), optax.adam(1e-3)), params, grads)
    if ref is not None:
      runners["optax:" + name] = Runner(optax.chain(ref(), optax.adam(1e-3)),
                                        params, grads)
  for _ in range(warmup):
    for r in runners.values():
      r()
  times = {k: [] for k in runners}
  for _ in range(rounds):
    for k, r in runners.items():
      times[k].append(r())
  base = np.asarray(times["adam"])
  rows = []
  for name in names:
    row = {"method": name, "group": METHODS[name][2], "params": n_params,
           "leaves": n_leaves, "adam_ms": 1e3 * float(np.median(base)),
           "ms": 1e3 * float(np.median(times[name])),
           "vs_adam": float(np.median(np.asarray(times[name]) / base)),
           "compile_s": runners[name].compile_s,
           "target": TARGET[METHODS[name][2]]}
    if "optax:" + name in times:
      ref_t = np.asarray(times["optax:" + name])
      row["optax_vs_adam"] = float(np.median(ref_t / base))
      row["vs_optax"] = float(np.median(np.asarray(times[name]) / ref_t))
    rows.append(row)
  return rows


def machine() -> dict:
  dev = jax.devices()[0]
  return {"date": date.today().isoformat(), "platform": dev.platform,
          "device": dev.device_kind, "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "optax": optax.__version__}


def to_markdown(rows: list[dict], info: dict) -> str:
  lines = [f"Overhead of each transform chained before `optax.adam`, "
           f"median of per-round ratios ({info['device']}, {info['cpu_count']} "
           f"cores, jax {info['jax']}, optax {info['optax']}, {info['date']}).",
           "",
           "| method | params | leaves | Adam ms | ms | vs Adam | target | "
           "optax equiv. vs Adam | vs optax | compile s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ok = "" if r["vs_adam"] <= r["target"] else " (over)"
    lines.append(
        f"| {r['method']} | {r['params'] / 1e6:.0f}M | {r['leaves']} | "
        f"{r['adam_ms']:.1f} | {r['ms']:.1f} | {r['vs_adam']:.3f}{ok} | "
        f"{r['target']:.2f} | {r.get('optax_vs_adam', float('nan')):.3f} | "
        f"{r.get('vs_optax', float('nan')):.3f} | {r['compile_s']:.2f} |")
  return "\n".join(lines).replace("nan", "-") + "\n"


def main(argv=None) -> int:
  _register_optional()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50],
                  help="parameter counts, in millions")
  ap.add_argument("--leaves", type=int, nargs="+", default=[10, 100, 500])
  ap.add_argument("--only", nargs="+", default=None, choices=sorted(METHODS))
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="1M params, 10 leaves")
  ap.add_argument("--out", default=str(RESULTS / "overhead"))
  args = ap.parse_args(argv)
  if args.quick:
    args.sizes, args.leaves, args.rounds = [1], [10], 5
  names = args.only or list(METHODS)
  info = machine()
  rows = []
  for size in args.sizes:
    for leaves in args.leaves:
      print(f"-- {size:g}M params, {leaves} leaves", file=sys.stderr, flush=True)
      rows += measure(int(size * 1e6), leaves, names, args.rounds, args.warmup)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  md = to_markdown(rows, info)
  out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows},
                                                 indent=1))
  out.with_suffix(".md").write_text(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
