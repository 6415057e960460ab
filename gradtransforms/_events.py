"""Optional host hook: ``on_event(figures)`` through ``jax.debug.callback``."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def emit(on_event: Callable[[dict], Any] | None, flag: jax.Array,
         figures: dict[str, jax.Array]) -> None:
  """Calls ``on_event`` on the host with numpy figures when ``flag`` is True.

  No-op (nothing traced, no host sync) when ``on_event`` is None, which is
  every transform's default. With a hook, the callback runs only on steps
  where ``flag`` holds, inside a ``lax.cond``.
  """
  if on_event is None:
    return

  def call(figs):
    on_event({k: np.asarray(v) for k, v in figs.items()})

  jax.lax.cond(flag, lambda f: jax.debug.callback(call, f), lambda f: None,
               figures)


def check_hook(on_event: Any) -> None:
  if on_event is not None and not callable(on_event):
    raise TypeError(f"on_event must be callable or None, got {on_event!r}")
