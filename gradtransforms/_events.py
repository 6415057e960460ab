"""Optional host hook: ``on_event(figures)`` through ``jax.debug.callback``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

# Figures holding a segment index: the hook gets the segment's name instead
# (and the index under "<figure>_index").
_INDEX_FIGURES = ("culprit", "first_nonfinite_leaf")


def emit(on_event: Callable[[dict], Any] | None, flag: jax.Array,
         figures: dict[str, jax.Array], names: Sequence[str] = ()) -> None:
  """Calls ``on_event`` on the host with numpy figures when ``flag`` is True.

  No-op (nothing traced, no host sync) when ``on_event`` is None, which is
  every transform's default. With a hook, the callback runs only on steps
  where ``flag`` holds, inside a ``lax.cond``. Segment indices are turned
  into leaf names (``"blocks/w[3]"``; None for -1) on the host.
  """
  if on_event is None:
    return
  names = tuple(names)

  def call(figs):
    out = {k: np.asarray(v) for k, v in figs.items()}
    for k in _INDEX_FIGURES:
      if k in out:
        i = int(out[k])
        out[k + "_index"] = out[k]
        out[k] = names[i] if 0 <= i < len(names) else None
    on_event(out)

  jax.lax.cond(flag, lambda f: jax.debug.callback(call, f), lambda f: None,
               figures)


def check_hook(on_event: Any) -> None:
  if on_event is not None and not callable(on_event):
    raise TypeError(f"on_event must be callable or None, got {on_event!r}")
