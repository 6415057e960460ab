"""LM stability benchmark: a thin script; the code is gradtransforms.bench.lm_stability.

    python benchmarks/lm_stability.py --quick
    python benchmarks/lm_stability.py --out benchmarks/results   # full run
(or ``gradtransforms bench lm_stability ...``)
"""

import sys

from gradtransforms.bench.lm_stability import main

if __name__ == "__main__":
  sys.exit(main())
