"""The application side: ``gradtransforms demo`` and what it shares with the
benchmarks (markdown tables, progress lines, the methods compared).

Needs the ``demo`` extra: ``pip install 'gradtransforms[demo]'``. The
transforms never import this package.
"""

from gradtransforms._extras import require

require("demo", "flax", "matplotlib", "rich", what="gradtransforms.demo")
