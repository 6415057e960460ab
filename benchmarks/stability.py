"""Training stability of every method on every exploding scenario.

A thin script over ``gradtransforms.bench.stability`` (also
``gradtransforms bench stability``); ``--help`` lists the options.

    python benchmarks/stability.py --seeds 1 --steps 100    # into bench_results/
    python benchmarks/stability.py --out benchmarks/results # make bench
"""

import sys

from gradtransforms.bench.stability import main

if __name__ == "__main__":
  sys.exit(main(prog="benchmarks/stability.py"))
