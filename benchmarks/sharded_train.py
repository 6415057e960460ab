"""Data-parallel training of a reference model with gradtransforms, sharded.

A thin script over ``gradtransforms.bench.sharded_train`` (also
``gradtransforms bench sharded_train``); ``--help`` lists the options.

    python benchmarks/sharded_train.py            # 8 host CPU devices
    python benchmarks/sharded_train.py --steps 200
"""

import sys

from gradtransforms.bench.sharded_train import main

if __name__ == "__main__":
  sys.exit(main(prog="benchmarks/sharded_train.py"))
