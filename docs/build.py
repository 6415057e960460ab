"""Builds the API reference from the docstrings with pdoc: ``make docs``.

    python docs/build.py [OUT]        # default docs/api/ (not committed)

Documents the public API (``gradtransforms``: every transform, state and
reader), the catalogue, the reference models and tasks. Exits with status 1
if pdoc warns about anything except type annotations it cannot evaluate
(the transforms annotate with optax's recursive ``ArrayTree`` aliases and
module aliases; pdoc then shows the annotation as written).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.render

MODULES = ["gradtransforms", "gradtransforms.catalogue", "gradtransforms.models",
           "gradtransforms.tasks"]
TOLERATED = "Error parsing type annotation"


def build(out: Path) -> list[str]:
  """Writes the HTML into ``out``; returns pdoc's warnings (tolerated ones
  left out)."""
  pdoc.render.configure(docformat="google", math=True, show_source=True,
                        footer_text="gradtransforms API reference")
  # Only the listed modules: the transform modules' functions are documented
  # once, on the package page, where users import them from.
  specs = [MODULES[0], r"!gradtransforms\..*", *MODULES[1:],
           r"!gradtransforms\.(models|tasks)\..*"]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc(*specs, output_directory=out)
  return [str(w.message) for w in caught if TOLERATED not in str(w.message)]


def main(argv: list[str]) -> int:
  out = Path(argv[0] if argv else Path(__file__).parent / "api")
  problems = build(out)
  for p in problems:
    print("warning:", p, file=sys.stderr)
  print(f"wrote {out / 'index.html'}"
        + (f"; {len(problems)} warning(s)" if problems else ""))
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
