"""Command line: ``gradtransforms demo`` (also ``python -m gradtransforms demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="gradtransforms")
  sub = ap.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="compare clipping methods on exploding "
                        "scenarios (about 2 minutes on 2 CPU cores)")
  demo.add_argument("--steps", type=int, default=300)
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--out", default="demo_results")
  demo.add_argument("--scenarios", nargs="+", default=None)
  demo.add_argument("--methods", nargs="+", default=None)
  args = ap.parse_args(argv)
  if args.command == "demo":
    from gradtransforms import demo as demo_mod
    from gradtransforms.tasks.scenarios import METHODS, SCENARIOS
    for name, known in ((args.scenarios, SCENARIOS), (args.methods, METHODS)):
      for n in name or ():
        if n not in known:
          ap.error(f"unknown name {n!r}; choose from {sorted(known)}")
    demo_mod.main(args.steps, args.out, args.scenarios, args.methods, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
