"""The house rules of issue 26: no module over 300 lines and no function
over 100 in the library and the benchmark scripts."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.joinpath("gradtransforms").rglob("*.py"),
                *ROOT.joinpath("benchmarks").rglob("*.py")])


def test_modules_and_functions_stay_readable():
  too_long = []
  for path in FILES:
    text = path.read_text()
    name = path.relative_to(ROOT)
    if text.count("\n") > 300:
      too_long.append(f"{name}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > 100:
          too_long.append(f"{name}:{node.lineno} {node.name}: {n} lines")
  assert FILES and not too_long, too_long
