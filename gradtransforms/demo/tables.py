"""One table helper for the demo and the benchmarks: GitHub markdown for
files, rich for the terminal, from the same header and rows."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(x: Any, spec: str = ".3g") -> str:
  """``x`` formatted with ``spec``; ints in full; ``"-"`` for None and NaN;
  strings as is."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if isinstance(x, str):
    return x
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, int):  # counts and steps: every digit
    return str(x)
  return format(x, spec)


def _align(rows: Sequence[Sequence[Any]], n: int, align: str | None) -> str:
  if align is not None:
    if len(align) != n or set(align) - set("lrc"):
      raise ValueError(f"align must be {n} letters of l/r/c, got {align!r}")
    return align
  # Left for text columns, right for numeric ones.
  def numeric(j):
    vals = [r[j] for r in rows if r[j] is not None and r[j] != "-"]
    return bool(vals) and all(isinstance(v, (int, float)) and
                              not isinstance(v, bool) for v in vals)
  return "".join("r" if numeric(j) else "l" for j in range(n))


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]],
             align: str | None = None, spec: str = ".3g") -> str:
  """A GitHub markdown table.

  Args:
    header: column titles.
    rows: one sequence of cells per row, as long as ``header``. Numbers are
      formatted with ``spec``, None/NaN as ``-``, booleans as yes/no.
    align: one letter per column (``l``, ``r``, ``c``); default: right for
      numeric columns, left otherwise.

  Returns:
    The table, ending in a newline.
  """
  n = len(header)
  for i, r in enumerate(rows):
    if len(r) != n:
      raise ValueError(f"row {i} has {len(r)} cells, header has {n}")
  align = _align(rows, n, align)
  rule = {"l": "---", "r": "---:", "c": ":---:"}
  cell = lambda x: fmt(x, spec).replace("|", r"\|").replace("\n", " ")
  lines = ["| " + " | ".join(cell(h) for h in header) + " |",
           "|" + "|".join(rule[a] for a in align) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def rich_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
               title: str | None = None, align: str | None = None,
               spec: str = ".3g"):
  """The same table as :func:`markdown`, as a ``rich.table.Table``."""
  from rich.table import Table
  align = _align(rows, len(header), align)
  justify = {"l": "left", "r": "right", "c": "center"}
  t = Table(title=title)
  for h, a in zip(header, align):
    t.add_column(h, justify=justify[a], no_wrap=a == "l")  # type: ignore[arg-type]
  for r in rows:
    t.add_row(*(fmt(x, spec) for x in r))
  return t
