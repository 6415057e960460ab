"""Progress over a known number of items: a rich bar on a terminal, one plain
line per item otherwise (a run piped to a file or a CI log shows where it is)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Steps:
  """``with Steps(n, "runs") as p: p.start("a / b"); ...; p.done()``."""

  def __init__(self, total: int, title: str, stream: TextIO | None = None,
               console=None):
    self.total, self.title = total, title
    self.stream = stream if stream is not None else sys.stdout
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.i = 0
    self._console = console
    self._bar: Any = None

  def __enter__(self) -> "Steps":
    self.t0 = time.perf_counter()
    if self.tty:
      from rich.progress import Progress
      self._bar = Progress(console=self._console, transient=True)
      self._bar.__enter__()
      self._task = self._bar.add_task(self.title, total=self.total)
    return self

  def start(self, what: str) -> None:
    """Says which item runs now."""
    if self._bar is not None:
      self._bar.update(self._task, description=what)
    else:
      print(f"[{self.i + 1}/{self.total} {self.title}, "
            f"{time.perf_counter() - self.t0:.0f}s] {what}",
            file=self.stream, flush=True)

  def done(self) -> None:
    """Marks the current item finished."""
    self.i += 1
    if self._bar is not None:
      self._bar.advance(self._task)

  def __exit__(self, *exc) -> None:
    if self._bar is not None:
      self._bar.__exit__(*exc)

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.t0
