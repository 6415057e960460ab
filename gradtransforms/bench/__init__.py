"""Benchmarks, runnable from an installed package: ``gradtransforms bench NAME``.

Each benchmark is a module with ``main(argv=None, prog=None) -> int`` and a
module docstring whose first line describes it. ``benchmarks/*.py`` in the
repository are thin scripts calling the same ``main``. The benchmarks need
the ``demo`` extra (``pip install 'gradtransforms[demo]'``); this module does
not, so ``gradtransforms bench --help`` works on the core install.

Adding a benchmark is one line in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import textwrap
from pathlib import Path
from typing import Callable

BENCHMARKS: dict[str, str] = {
    "overhead": "gradtransforms.bench.overhead",
    "stability": "gradtransforms.bench.stability",
    "sharded_train": "gradtransforms.bench.sharded_train",
    "lm_stability": "gradtransforms.bench.lm_stability",
    "kernels": "gradtransforms.bench.kernels",
}
"""Benchmark name -> module holding its ``main(argv, prog)``."""

DEFAULT_OUT = "bench_results"
"""Where results go unless ``--out`` says otherwise (not committed; ``make
bench`` passes ``--out benchmarks/results``)."""


def write_results(out_dir: Path, stem: str, md: str, payload: dict,
                  plot: Callable[[Path], None]) -> None:
  """Writes ``<stem>.{md,json,png}`` into ``out_dir`` and says so."""
  out_dir.mkdir(parents=True, exist_ok=True)
  out = out_dir / stem
  out.with_suffix(".md").write_text(md)
  out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
  plot(out.with_suffix(".png"))
  print(md)
  wrote = [str(out.with_suffix(e)) for e in (".md", ".json", ".png")
           if out.with_suffix(e).exists()]
  print(f"wrote {', '.join(wrote)}")


def load(name: str):
  """The module of benchmark ``name``."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
  return importlib.import_module(BENCHMARKS[name])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
  """Shows defaults (except None: the help says what then happens), keeps
  the description's line breaks, and never wraps a line inside a name at a
  hyphen (``mlp4-corrupt-batches`` stays one word to copy)."""

  def _split_lines(self, text, width):
    text = " ".join(text.split())
    return textwrap.wrap(text, width, break_on_hyphens=False)

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def _number(kind, minimum, strict):
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value < minimum or (strict and value == minimum):
      raise argparse.ArgumentTypeError(
          f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
    return value
  parse.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"
  return parse


positive_int = _number(int, 0, strict=True)
nonnegative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)


def out_dir(text: str) -> Path:
  """An output folder: may not exist yet (it is created when results are
  written), but must not be a file."""
  path = Path(text)
  if path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
  return path


def existing_file(text: str) -> Path:
  path = Path(text)
  if not path.is_file():
    raise argparse.ArgumentTypeError(f"no such file: {text}")
  return path


def add_results_args(ap: argparse.ArgumentParser, files: str) -> None:
  """``--out`` (the folder for ``files``) and ``--replot-from``, as every
  benchmark that writes results takes them."""
  ap.add_argument("--out", type=out_dir, default=DEFAULT_OUT,
                  help=f"folder for {files}")
  ap.add_argument("--replot-from", type=existing_file, default=None,
                  metavar="JSON", help="only redraw the plot of a results "
                  "JSON written by this benchmark, into --out (default: run the "
                  "benchmark)")
