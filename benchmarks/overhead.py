"""Overhead of each transform with Adam, as a ratio to Adam alone.

A thin script over ``gradtransforms.bench.overhead`` (also
``gradtransforms bench overhead``); ``--help`` lists the options.

    python benchmarks/overhead.py --quick                    # smoke test, into bench_results/
    python benchmarks/overhead.py --out benchmarks/results   # make bench
    python benchmarks/overhead.py --replot-from benchmarks/results/overhead.json --out benchmarks/results
"""

import sys

from gradtransforms.bench.overhead import main

if __name__ == "__main__":
  sys.exit(main(prog="benchmarks/overhead.py"))
