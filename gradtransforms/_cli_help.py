"""A benchmark's ``--help`` on the core install (without the ``demo`` extra).

A benchmark module needs the ``demo`` extra to import (it raises an
``ImportError`` naming the extra at its top), but its options are plain
``argparse`` over core names. :func:`offline_help` builds the help from the
module's source without importing it: it runs the module's top-level
imports, constants and function definitions one statement at a time,
skipping each that needs a missing package, then calls its ``parser(prog)``.
Where the parser itself needs the extra (its choices come from the demo),
it gives the module's description and says what to install.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

_KEEP = (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign,
         ast.FunctionDef)


def offline_help(module: str, prog: str, missing: str) -> str:
  """The help text of benchmark ``module``, built without importing it;
  ``missing``: the ImportError's message, shown at the end."""
  spec = importlib.util.find_spec(module)
  if spec is None or spec.origin is None:
    raise ImportError(missing)
  tree = ast.parse(Path(spec.origin).read_text())
  doc = ast.get_docstring(tree) or ""
  ns: dict[str, Any] = {"__name__": f"{module}.<help>", "__doc__": doc}
  for node in tree.body:
    if not isinstance(node, _KEEP):
      continue  # a call such as require(...), a class needing the extra
    try:
      exec(compile(ast.Module([node], []), spec.origin, "exec"), ns)
    except Exception:  # noqa: BLE001 - a statement needing the extra
      continue
  note = f"\nRunning it needs the demo extra: {missing}\n"
  try:
    return ns["parser"](prog).format_help() + note
  except Exception:  # noqa: BLE001 - the parser's choices need the extra
    return f"usage: {prog} [options]\n\n{doc}\n{note}"
