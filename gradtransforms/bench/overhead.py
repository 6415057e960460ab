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
Compile time: every row records its step's compile time next to Adam's;
``--compile-leaves`` also compiles Adam and every method on trees of that
many small leaves and plots compile time against the leaf count
(``overhead_compile.png``; the figures go into the JSON's ``compile``).

Modules: ``overhead_steps`` (methods, workloads, the compiled step),
``overhead_timing`` (rounds, rows, compile times), ``overhead_report``
(machine record, tables), ``overhead_plot`` (the plots).

Writes ``overhead.{md,json,png}`` and ``overhead_compile.png``
(``overhead_gpu.*`` on a GPU) into --out.
"""

from __future__ import annotations

from gradtransforms._extras import require

require("demo", "flax", "matplotlib", "rich", what="gradtransforms bench")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from gradtransforms.bench import (HelpFormatter, add_results_args,  # noqa: E402
                                  positive_float, positive_int, write_results)
from gradtransforms.bench.overhead_plot import plot, plot_compile  # noqa: E402
from gradtransforms.demo.progress import Steps  # noqa: E402
from gradtransforms.bench.overhead_report import (machine,  # noqa: E402
                                                  to_markdown)
from gradtransforms.catalogue import CATALOGUE  # noqa: E402
from gradtransforms.bench.overhead_steps import (CHUNK, MODELS,  # noqa: E402
                                                 REFERENCE, build,
                                                 count_kernels)
from gradtransforms.bench.overhead_timing import (compile_times,  # noqa: E402
                                                  measure_models,
                                                  measure_stacked,
                                                  measure_trees)

# the methods (as overhead_steps.NAMES; here too so that --help needs no extra)
NAMES = ["one_read"] + [n for n, e in CATALOGUE.items() if not e.batch_axis]

__all__ = ["NAMES", "REFERENCE", "build", "count_kernels", "main", "parser",
           "plot", "plot_compile", "to_markdown"]


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
  ap.add_argument("--compile-leaves", type=positive_int, nargs="*",
                  default=[10, 100, 500, 1000], metavar="N",
                  help="leaf counts of the compile-time-vs-leaves plot (none: "
                  "skip it)")
  ap.add_argument("--compile-repeats", type=positive_int, default=1,
                  metavar="R", help="compile each step R times and keep the "
                  "fastest (method and Adam interleaved)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: 1M params, 10 leaves, 5 rounds, no models, "
                  "compile times at 10 and 20 leaves")
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
    if data.get("compile"):
      path = args.out / (args.replot_from.stem + "_compile.png")
      plot_compile(data["compile"], path)
      print(f"wrote {path}")
    return 0
  if args.quick:
    args.sizes, args.leaves, args.rounds, args.no_models = [1], [10], 5, True
    args.compile_leaves = [10, 20]
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
  compiles: list[dict[str, Any]] = []
  with Steps(workloads * -(-len(names) // CHUNK) + len(args.compile_leaves),
             "chunks of methods") as progress:
    for kind, n, leaves in jobs:
      if kind == "tree":
        rows += measure_trees(n, leaves, names, args.rounds, args.warmup, k,
                              progress)
      else:
        rows += measure_stacked(n, args.layers, leaves, names, args.rounds,
                                args.warmup, k, progress)
    if not args.no_models:
      rows += measure_models(names, args.rounds, args.warmup, k, progress)
    for leaves in args.compile_leaves:
      compiles += compile_times(names, leaves, progress,
                                args.compile_repeats)
  name = stem(platform_name)

  def plots(path):
    if rows:  # none with --no-trees --no-models: compile times alone
      plot(rows, path)
    if compiles:
      plot_compile(compiles, path.with_name(name + "_compile.png"))
  write_results(args.out, name, to_markdown(rows, info, compiles),
                {"machine": info, "rows": rows, "compile": compiles}, plots)
  return 0


if __name__ == "__main__":
  sys.exit(main())
