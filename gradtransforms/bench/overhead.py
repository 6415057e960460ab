"""Overhead: each transform with Adam, as a ratio of step time to Adam alone.

Every method of ``gradtransforms.catalogue.CATALOGUE`` (built with its
benchmark configuration) and its optax equivalent run inside the same
donated ``jax.jit`` training step (``update`` + ``apply_updates``) on the
same gradients. Methods are timed interleaved, round-robin, in one process
after warm-up; each ratio is the median over rounds of (method time / Adam
time in the same round), so machine drift cancels.

On CPU each sample is one step. On GPU/TPU a sample is K back-to-back
donated steps divided by K (dispatch is asynchronous: timing single calls
measures launch latency, not throughput). Each method's kernel count is
read from its compiled HLO (fusions and custom calls in the ENTRY
computation; on CPU these are XLA:CPU fusions, not GPU kernels) next to
that of its optax equivalent, or of Adam plus one read of the gradients
(the row ``one_read``) where none exists. On CPU, minor page faults per
step show parameter-sized temporaries (XLA:CPU allocates them afresh every
step; beyond glibc's 32 MB mmap threshold each is page-faulted each time).

Workloads: trees of 2-D leaves (``--sizes`` x ``--leaves``), optionally
stacked layers (``--stacked``: ``--layers`` layers in ``--stacked-leaves``
leaves of shape ``(layers, r, c)``, built with ``layer_axes=0`` where a
transform takes it), and full training steps of the reference models.
Writes ``overhead.{md,json,png}`` (``overhead_gpu.*`` on a GPU) into --out.
"""

from __future__ import annotations

from gradtransforms._extras import require

require("demo", "flax", "matplotlib", "rich", what="gradtransforms bench")

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from gradtransforms.bench import (HelpFormatter, add_results_args,  # noqa: E402
                                  positive_float, positive_int, write_results)
from gradtransforms.catalogue import CATALOGUE  # noqa: E402
from gradtransforms.demo import tables  # noqa: E402
from gradtransforms.demo.progress import Steps  # noqa: E402
from gradtransforms.models import LSTM, DeepMLP, ElmanRNN  # noqa: E402

REFERENCE = "one_read"
# Benchmarked: the reference, then every catalogue entry whose updates need
# no per-example axis.
NAMES = [REFERENCE] + [n for n, e in CATALOGUE.items() if not e.batch_axis]
GROUP = {REFERENCE: "reference", **{n: e.group for n, e in CATALOGUE.items()}}
CPU_TARGET = {"static": 1.10, "adaptive": 1.15, "detection": 1.05}
# Accelerators (issue 12): at most these ratios, and within +0.03 of the
# optax equivalent where one exists.
ACCEL_TARGET = {"static": 1.20, "adaptive": 1.20, "detection": 1.20,
                "spike_clip": 1.30, "clippy": 1.30}
ACCEL_OPTAX_MARGIN = 0.03
CHUNK = 4  # methods timed together against one Adam baseline (bounds memory)


def target(name: str, platform_name: str) -> float:
  group = GROUP[name]
  if group == "reference":
    return float("nan")
  if platform_name == "cpu":
    return CPU_TARGET[group]
  return ACCEL_TARGET.get(name, ACCEL_TARGET[group])


def _one_read() -> optax.GradientTransformation:
  """Reference, not a clip: records the gradients' sum of squares and passes
  them on. It only reads every gradient once: what any clip or detector
  that needs a norm costs at least."""
  def update_fn(updates, state, params=None):
    del state, params
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
    return jax.lax.optimization_barrier((updates, sq))
  return optax.GradientTransformation(lambda _: jnp.zeros(()), update_fn)


def build(name: str, opt, layer_axes: int | None = None):
  """(transform placed with ``opt``, optax equivalent or None)."""
  if name == REFERENCE:
    return optax.chain(_one_read(), opt), None
  entry = CATALOGUE[name]
  kw = {"layer_axes": layer_axes} if layer_axes is not None and entry.layer_axes else {}
  return entry.build(opt, config="bench", **kw), entry.build_optax(opt)


def count_kernels(compiled) -> int:
  """Fusions and custom calls in the ENTRY computation of compiled HLO."""
  text = compiled.as_text()
  entry = text[text.rfind("ENTRY"):]
  return len(re.findall(r"= [^\n]*\bfusion\(|custom-call\(", entry))


def make_tree(n_params: int, n_leaves: int, seed: int = 0) -> dict:
  """``n_leaves`` 2-D float32 leaves totalling about ``n_params`` elements."""
  rng = np.random.default_rng(seed)
  per = max(n_params // n_leaves, 4)
  cols = max(int(np.sqrt(per)), 2)
  rows = max(per // cols, 2)
  return {f"layer{i:03d}": jnp.asarray(
      rng.standard_normal((rows, cols), np.float32) * 0.02)
          for i in range(n_leaves)}


def make_stacked(n_params: int, layers: int, n_leaves: int, seed: int = 0) -> dict:
  """``n_leaves`` leaves of shape ``(layers, r, c)`` totalling about
  ``n_params`` elements: a scanned stack of ``layers`` identical layers."""
  rng = np.random.default_rng(seed)
  per = max(n_params // (n_leaves * layers), 4)
  cols = max(int(np.sqrt(per)), 2)
  rows = max(per // cols, 2)
  return {f"stack{i}": jnp.asarray(
      rng.standard_normal((layers, rows, cols), np.float32) * 0.02)
          for i in range(n_leaves)}


class Runner:
  """A compiled, donated step with its own params and state. Each call
  times ``k`` back-to-back steps and returns seconds per step."""

  def __init__(self, tx, params, grads, k: int):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._compile(step, tx, jax.tree.map(jnp.copy, params), grads, k)

  def _compile(self, step, tx, params, data, k: int) -> None:
    """Compiles ``step(params, state, data)`` donating params and state."""
    self.params, self.state, self.data, self.k = params, tx.init(params), data, k
    self.faults: list[float] = []  # minor page faults per step of each sample
    t0 = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
        self.params, self.state, self.data).compile()
    self.compile_s = time.perf_counter() - t0
    self.kernels = count_kernels(self.step)

  def __call__(self) -> float:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(self.k):
      self.params, self.state = self.step(self.params, self.state, self.data)
    jax.block_until_ready((self.params, self.state))
    t = (time.perf_counter() - t0) / self.k
    self.faults.append(
        (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / self.k)
    return t


class ModelRunner(Runner):
  """A full training step (forward, backward, update) of a reference model."""

  def __init__(self, tx, model, x, y, k: int):
    graphdef, params = nnx.split(model, nnx.Param)

    def step(params, state, batch):
      x, y = batch
      loss_fn = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(x) - y))
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._compile(step, tx, params, (x, y), k)


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


MODELS = {
    "DeepMLP(16x512)": (lambda: DeepMLP(16, 512, in_features=64,
                                        rngs=nnx.Rngs(0)), (256, 64)),
    "ElmanRNN(256), T=50": (lambda: ElmanRNN(256, 1.0, in_features=8,
                                             rngs=nnx.Rngs(0)), (64, 50, 8)),
    "LSTM(128), T=50": (lambda: LSTM(128, in_features=8, rngs=nnx.Rngs(0)),
                        (64, 50, 8)),
}


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


def machine(k: int) -> dict:
  dev = jax.devices()[0]
  return {"date": date.today().isoformat(), "platform": dev.platform,
          "device": dev.device_kind, "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "python": platform.python_version(), "jax": jax.__version__,
          "optax": optax.__version__, "steps_per_sample": k}


def _over(r: dict) -> bool:
  over = r["vs_adam"] > r["target"]
  margin = r.get("optax_margin")
  if margin is not None and "optax_vs_adam" in r:
    over |= r["vs_adam"] > r["optax_vs_adam"] + margin
  return bool(over)


HEADER = ("workload", "method", "Adam ms", "ms", "vs Adam", "target",
          "optax equiv. vs Adam", "kernels", "kernels: optax equiv. / Adam+one read",
          "page faults/step (Adam)", "compile s (Adam)", "note")


def to_markdown(rows: list[dict], info: dict) -> str:
  k = info.get("steps_per_sample", 1)
  timing = ("one step per sample" if k == 1 else
            f"{k} back-to-back donated steps per sample")
  text = (f"Step time of each method with `optax.adam` / Adam alone, median "
          f"of paired per-round ratios ({timing}). {info['device']} "
          f"({info['platform']}), {info['cpu_count']} cores, jax {info['jax']}, "
          f"optax {info['optax']}, {info['date']}. Kernels: fusions and custom "
          f"calls in the compiled ENTRY computation"
          f"{' (XLA:CPU fusions, not GPU kernels)' if info['platform'] == 'cpu' else ''}"
          f". **over**: above the target.\n\n")
  body = []
  for r in rows:
    ref_k = (f"{r['optax_kernels']} (optax)" if "optax_kernels" in r else
             f"{r['one_read_kernels']} (one read)")
    body.append((r["workload"], r["method"], f"{r['adam_ms']:.2f}",
                 f"{r['ms']:.2f}",
                 f"{r['vs_adam']:.3f}" + (" **over**" if _over(r) else ""),
                 f"{r['target']:.2f}" if np.isfinite(r["target"]) else None,
                 r.get("optax_vs_adam"), r["kernels"], ref_k,
                 f"{r['faults']:.0f} ({r['adam_faults']:.0f})",
                 f"{r['compile_s']:.2f} ({r['adam_compile_s']:.2f})",
                 r.get("layer_axes") if isinstance(r.get("layer_axes"), str)
                 else ("layer_axes=0" if r.get("layer_axes") == 0 else "") +
                 (f" (per leaf: {r['per_leaf_vs_adam']:.3f})"
                  if "per_leaf_vs_adam" in r else "")))
  return text + tables.markdown(HEADER, body, align="llrrrrrrrrrl")


def _kind(r: dict) -> str:
  return r.get("kind") or ("model" if r["workload"].endswith("train step")
                           else "tree")


def plot(rows: list[dict], path: Path, title: str = "") -> None:
  """Dot plot, one panel per workload size: each method's ratio to Adam
  alone (colour: number of leaves; x: the optax equivalent), its target as a
  labelled dashed segment."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels: dict[str, list[dict]] = {}
  for r in rows:
    kind = _kind(r)
    key = {"tree": f"{r['params'] / 1e6:g}M params",
           "stacked": f"{r['params'] / 1e6:g}M params, stacked layers",
           "model": "full training steps"}[kind]
    panels.setdefault(key, []).append(r)
  order = {"static": 0, "adaptive": 1, "detection": 2, "reference": 3}
  methods = sorted(dict.fromkeys(r["method"] for r in rows),
                   key=lambda m: (order.get(GROUP.get(m, next(
                       r["group"] for r in rows if r["method"] == m)), 9)))
  y = {m: i for i, m in enumerate(methods)}
  n = len(panels)
  ncols = min(n, 4)  # wrap: readable at README width
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(
      max(2.5 * ncols + 1.6, 6.5),
      nrows * ((0.3 if nrows == 1 else 0.25) * len(methods) + 1.2) + 0.3),
                           sharey=True, squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  cmap = plt.get_cmap("viridis")
  xmax_cap = 3.0
  for ax, (label, prs) in zip(axes.flat, panels.items()):
    series = list(dict.fromkeys(
        r["workload"].split(" train step")[0] if _kind(r) == "model"
        else f"{r['leaves']} leaves" for r in prs))
    colors = {s: cmap(0.85 * i / max(len(series) - 1, 1)) for i, s in enumerate(series)}
    offs = {s: (i - (len(series) - 1) / 2) * 0.22 for i, s in enumerate(series)}
    for r in prs:
      s = (r["workload"].split(" train step")[0] if _kind(r) == "model"
           else f"{r['leaves']} leaves")
      yy = y[r["method"]] + offs[s]
      v = min(r["vs_adam"], xmax_cap)
      ax.plot([1.0, v], [yy, yy], color=colors[s], lw=0.8, alpha=0.5)
      ax.plot(v, yy, "o" if r["vs_adam"] <= xmax_cap else ">", color=colors[s],
              ms=4.5)
      if r.get("optax_vs_adam") is not None and np.isfinite(r["optax_vs_adam"]):
        ax.plot(min(r["optax_vs_adam"], xmax_cap), yy, "x", color="black", ms=4.5,
                mew=1.0)
    # Target per group, a labelled segment over the group's rows.
    by_target: dict[float, list[int]] = {}
    for m in methods:
      t = next((r["target"] for r in prs if r["method"] == m), float("nan"))
      if np.isfinite(t):
        by_target.setdefault(t, []).append(y[m])
    for t, ys in by_target.items():
      for grp in np.split(np.array(sorted(ys)),
                          np.flatnonzero(np.diff(sorted(ys)) > 1) + 1):
        ax.plot([t, t], [grp[0] - 0.45, grp[-1] + 0.45], ls="--", color="crimson",
                lw=1)
        ax.text(t, grp[0] - 0.5, f" target {t:.2f}", color="crimson",
                fontsize=6.5, va="bottom", ha="left")
    ax.axvline(1.0, color="black", lw=0.8)
    lo = min([0.8] + [r[k] - 0.05 for r in prs for k in ("vs_adam", "optax_vs_adam")
                      if r.get(k) is not None and np.isfinite(r[k])])
    ax.set_xlim(lo, min(xmax_cap, max(1.5, max(r["vs_adam"] for r in prs))) + 0.15)
    ax.set_title(label, fontsize=9)
    ax.grid(axis="x", lw=0.3)
    ax.tick_params(labelsize=7.5)
    ax.set_xlabel("step time / Adam alone", fontsize=8)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[s], ms=5)
               for s in series]
    handles.append(plt.Line2D([], [], ls="", marker="x", color="black"))
    ax.legend(handles, series + ["optax equivalent"], fontsize=6.5,
              loc="lower right", frameon=True, framealpha=0.9)
  axes[0, 0].set_yticks(range(len(methods)), methods)
  axes[0, 0].invert_yaxis()  # sharey: every row follows
  fig.suptitle(title or "Step time with Adam / Adam alone (> at the edge: "
               "beyond 3x)", fontsize=9.5, x=0.02, ha="left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def stem(platform_name: str) -> str:
  return "overhead" if platform_name == "cpu" else f"overhead_{platform_name}"


def parser(prog: str | None = None) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                               formatter_class=HelpFormatter)
  ap.add_argument("--sizes", type=positive_float, nargs="+", default=[1, 10, 50],
                  metavar="M", help="parameter counts of the tree workloads, "
                  "in millions")
  ap.add_argument("--leaves", type=positive_int, nargs="+", default=[10, 100, 500],
                  metavar="N", help="leaf counts of the tree workloads")
  ap.add_argument("--methods", nargs="+", default=None, choices=NAMES,
                  metavar="NAME", help="methods to time (default: all); "
                  f"choose from {', '.join(NAMES)}")
  ap.add_argument("--rounds", type=positive_int, default=15,
                  help="timed rounds (samples per method)")
  ap.add_argument("--warmup", type=positive_int, default=3,
                  help="untimed rounds first")
  ap.add_argument("--steps-per-sample", type=positive_int, default=None,
                  metavar="K", help="back-to-back steps per timed sample "
                  "(default: 1 on CPU, 20 on GPU/TPU)")
  ap.add_argument("--stacked", action="store_true",
                  help="also time stacked layers at each size, built with "
                  "layer_axes=0 where a transform takes it")
  ap.add_argument("--layers", type=positive_int, default=24,
                  help="layers of the stacked workload")
  ap.add_argument("--stacked-leaves", type=positive_int, default=6,
                  help="leaves of the stacked workload, each (layers, r, c)")
  ap.add_argument("--no-trees", action="store_true",
                  help="skip the tree workloads")
  ap.add_argument("--no-models", action="store_true",
                  help="skip the reference models' training steps")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: 1M params, 10 leaves, 5 rounds, no models")
  add_results_args(ap, "overhead[_gpu].{md,json,png}")
  return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  ap = parser(prog)
  args = ap.parse_args(argv)
  if args.replot_from is not None:
    data = json.loads(args.replot_from.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (args.replot_from.stem + ".png")
    plot(data["rows"], path)
    print(f"wrote {path}")
    return 0
  if args.quick:
    args.sizes, args.leaves, args.rounds, args.no_models = [1], [10], 5, True
  names = args.methods or NAMES
  platform_name = jax.devices()[0].platform
  k = args.steps_per_sample or (1 if platform_name == "cpu" else 20)
  info = machine(k)
  jobs: list[tuple[str, int, int]] = []  # (kind, params, leaves)
  for size in args.sizes:
    if not args.no_trees:
      jobs += [("tree", int(size * 1e6), leaves) for leaves in args.leaves]
    if args.stacked:
      jobs.append(("stacked", int(size * 1e6), args.stacked_leaves))
  workloads = len(jobs) + (0 if args.no_models else len(MODELS))
  rows: list[dict[str, Any]] = []
  with Steps(workloads * -(-len(names) // CHUNK), "chunks of methods") as progress:
    for kind, n, leaves in jobs:
      if kind == "tree":
        rows += measure_trees(n, leaves, names, args.rounds, args.warmup, k,
                              progress)
      else:
        rows += measure_stacked(n, args.layers, leaves, names, args.rounds,
                                args.warmup, k, progress)
    if not args.no_models:
      rows += measure_models(names, args.rounds, args.warmup, k, progress)
  write_results(args.out, stem(platform_name), to_markdown(rows, info),
                {"machine": info, "rows": rows}, lambda path: plot(rows, path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
