"""Command line: ``gradtransforms demo``, ``gradtransforms bench NAME``,
``gradtransforms --version`` (also ``python -m gradtransforms ...``).

The demo and the benchmarks need the ``demo`` extra; ``--version`` and the
help (``gradtransforms bench overhead --help`` too) work on the core install.
"""

from __future__ import annotations

import argparse
import sys

from gradtransforms import __version__
from gradtransforms.bench import (BENCHMARKS, HelpFormatter, load,
                                  nonnegative_int, out_dir, positive_int)

# The demo's names, for the help text; tests/test_cli.py checks they match
# gradtransforms.demo.methods (which needs flax to import).
DEMO_SCENARIOS = ("mlp16-init1.6", "mlp16-he", "mlp16-init1.6-layernorm",
                  "mlp16-sigmoid", "mlp16-sigmoid-batchnorm", "mlp4-lr0.2",
                  "mlp4-lr0.02", "mlp4-lr0.02-clip0.05", "mlp4-corrupt-batches",
                  "rnn-T50-rho2", "lstm-T50", "rnn-T50-rho0.5")
DEMO_METHODS = ("none", "clip_by_global_norm", "autoclip", "zclip", "adagc",
                "guard", "clip_by_global_norm+guard")


def _bench_summary() -> str:
  return "\n".join(f"  {name}" for name in BENCHMARKS)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="gradtransforms", formatter_class=HelpFormatter,
      description="Gradient clipping and explosion detection for Optax: the "
      "demo and the benchmarks.")
  ap.add_argument("--version", action="version",
                  version=f"%(prog)s {__version__}")
  sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
  demo = sub.add_parser(
      "demo", formatter_class=HelpFormatter,
      help="compare clipping methods on scenarios that really explode or "
      "vanish (a few minutes on 2 CPU cores)",
      description="Trains every scenario with its methods (every method, or "
      "a few for the vanishing and over-tight-clip scenarios), prints a table "
      "and the diagnosis of the first explosion, of the vanishing runs and of "
      "the over-tight clip, writes curves.png, summary.md and summary.json.")
  demo.add_argument("--steps", type=positive_int, default=300,
                    help="training steps per run")
  demo.add_argument("--seed", type=nonnegative_int, default=0,
                    help="seed of the models and batches")
  demo.add_argument("--out", type=out_dir, default="demo_results",
                    help="folder for curves.png, summary.md, summary.json "
                    "(created when the results are written)")
  demo.add_argument("--scenarios", nargs="+", choices=DEMO_SCENARIOS,
                    default=None, metavar="NAME",
                    help=f"scenarios to run (default: all); choose from "
                    f"{', '.join(DEMO_SCENARIOS)}")
  demo.add_argument("--methods", nargs="+", choices=DEMO_METHODS,
                    default=None, metavar="NAME",
                    help=f"methods to compare on every scenario (default: all, "
                  "a few on the vanishing and clip scenarios); choose from "
                    f"{', '.join(DEMO_METHODS)}")
  bench = sub.add_parser(
      "bench", formatter_class=HelpFormatter,
      help="run a benchmark (gradtransforms bench NAME --help for its options)",
      description="Runs one benchmark; results go to --out (default "
      "bench_results/), never into the repository's benchmarks/results/ "
      "unless asked.\n\nbenchmarks:\n" + _bench_summary(),
      usage="gradtransforms bench [-h] NAME [options]")
  bench.add_argument("name", choices=list(BENCHMARKS), metavar="NAME",
                     help=f"one of {', '.join(BENCHMARKS)}")
  bench.add_argument("args", nargs=argparse.REMAINDER,
                     help="options of the benchmark")
  return ap


def main(argv: list[str] | None = None) -> int:
  ap = parser()
  args = ap.parse_args(argv)
  if args.command == "bench":
    prog = f"gradtransforms bench {args.name}"
    try:
      module = load(args.name)
    except ImportError as e:
      if {"-h", "--help"} & set(args.args):  # help works on the core install
        from gradtransforms._cli_help import offline_help
        print(offline_help(BENCHMARKS[args.name], prog, str(e)), end="")
        return 0
      ap.exit(2, f"gradtransforms bench: {e}\n")
    return int(module.main(args.args, prog=prog) or 0)
  try:
    from gradtransforms.demo import app
  except ImportError as e:
    ap.exit(2, f"gradtransforms demo: {e}\n")
  app.main(args.steps, args.out, args.scenarios, args.methods, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
