"""The faults of a run and whether they were contained (a ``diagnose`` step).

A *fault* is a step whose gradient norm or loss is non-finite, whose norm
spikes (``SPIKE_FACTOR`` x the recent median), that a guard flagged (role
``skip``) or that a rewind took back (role ``rewind``). It is *contained*
when something acted on it (a guard skipped it, a rewind restored the
params, or a clip scaled a finite spike down) and the run was healthy
after it: every later norm and loss finite, the norm back in its range.
A run whose every fault was contained is diagnosed on its other steps, so
a skipped NaN is not an explosion. The layer is named from what the state
recorded: the detector's ``culprit`` at that step (its index resolved by
the segment names the history holds), else the per-leaf norms.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gradtransforms import _registry
from gradtransforms.diagnose.findings import Fault
from gradtransforms.diagnose.regime import spikes
from gradtransforms.diagnose.series import Series, role_keys, segment_names

CONTAINED_RANGE = 10.0
"""After the last fault the median norm must be within this factor of the
median before the first one for the run to count as healthy after it."""


def _first(s: Mapping[str, np.ndarray], role: str) -> tuple[str | None, Any]:
  keys = role_keys(role, list(s))
  return (keys[0], s[keys[0]]) if keys else (None, None)


def _named_culprits(s: Mapping[str, np.ndarray]) -> dict[int, str]:
  """Step -> blamed leaf, from ``gt.dashboard`` rows
  (``"guard/culprit/<leaf>": step``, present from the first event on)."""
  out: dict[int, str] = {}
  for k, v in s.items():
    head, sep, leaf = k.partition("/culprit/")
    if not sep or "/" in head:
      continue
    for t in range(len(v)):
      if np.isfinite(v[t]) and (t == 0 or not v[t] == v[t - 1]):
        out[t] = leaf
  return out


def _culprits(history: Any, s: Mapping[str, np.ndarray]) -> dict[int, str]:
  """Step -> the segment the detector blamed at that step."""
  key, idx = _first(s, "culprit")
  _, at = _first(s, "culprit_step")
  if key is None or at is None:
    return _named_culprits(s)
  names = segment_names(history, key.partition("/")[0])
  out = {}
  for t in range(len(idx)):
    changed = at[t] >= 0 and (t == 0 or at[t] != at[t - 1])
    i = idx[t]
    if changed and np.isfinite(i) and i >= 0:
      i = int(i)
      out[t] = names[i] if i < len(names) else f"segment {i}"
  return out


def _leaf_at(r: Series, t: int, bad: bool) -> str | None:
  """The leaf the per-leaf norms point at: the first non-finite one, or the
  one that rose most over its own median before ``t``."""
  best, rise = None, 1.0
  for n in r.names:
    v = r.leaves[n]
    if bad:
      if not np.isfinite(v[t]):
        return n
      continue
    past = v[:t][np.isfinite(v[:t]) & (v[:t] > 0)]
    if past.size and np.isfinite(v[t]) and v[t] / np.median(past) > rise:
      best, rise = n, v[t] / np.median(past)
  return best


def _clipped(s: Mapping[str, np.ndarray], t: int) -> str | None:
  """The clip that scaled step ``t`` down, if any. A clip whose peak was
  not recorded at ``t`` (``clip_by_value`` without ``record_peak``: NaN)
  cannot say it did not act, and is not asked."""
  unknown = _no_peak(s, t)
  for role, acted in (("clip_scale", lambda v: v < 1 - 1e-6),
                      ("clipped", lambda v: v > 0)):
    for k in role_keys(role, list(s)):
      if (k.partition("/")[0] not in unknown and np.isfinite(s[k][t])
          and acted(s[k][t])):
        return k.partition("/")[0]
  return None


def _no_peak(s: Mapping[str, np.ndarray], t: int | None = None) -> set[str]:
  """Clips whose peak is NaN at row ``t`` (None: at every row)."""
  return {k.partition("/")[0] for k in role_keys("clip_peak", list(s))
          if np.all(np.isnan(s[k] if t is None else s[k][t]))}


def unrecorded(s: Mapping[str, np.ndarray]) -> list[str]:
  """Clips that recorded no peak on any step (``clip_by_value`` without
  ``record_peak``): whether they acted is not known."""
  return sorted(_no_peak(s))


def _rewound(s: Mapping[str, np.ndarray], head: str, t: int
             ) -> tuple[int | None, int | None]:
  """``(step it went back to, steps undone)`` of a rewind at row ``t``,
  from the rewind's ``rewound_to`` and ``lost`` figures where recorded."""
  to, lost = s.get(f"{head}/rewound_to"), s.get(f"{head}/lost")
  back = int(to[t]) if to is not None and np.isfinite(to[t]) else None
  undone = None
  if lost is not None and np.isfinite(lost[t]):
    undone = int(lost[t] - (lost[t - 1] if t and np.isfinite(lost[t - 1])
                            else 0))
  return back, undone


def halted(r: Series, faults: list[Fault]) -> str | None:
  """The rewind that stopped the run (its sticky ``halt`` set at the end:
  the fault outlived its rewinds), if any."""
  for head in {f.by for f in faults if f.action == "rewound"}:
    h = r.s.get(f"{head}/halt")
    if h is not None and len(h) and h[-1] > 0:
      return head
  return None


def find_faults(history: Any, r: Series) -> list[Fault]:
  """Every fault of the run, in step order (steps as the optimizer counts
  them: ``r.first_step`` + row)."""
  s, norm = r.s, r.norm
  bad = ~np.isfinite(norm)
  if r.loss is not None:
    bad |= ~np.isfinite(r.loss)
  skip_key, skip = _first(s, "skip")
  flagged = (skip > 0) if skip is not None else np.zeros(r.steps, bool)
  # gt.rewind (role "rewind", registered where it is built): a step that
  # took the params back to a snapshot acted on its fault too.
  rew_key, rew = (_first(s, "rewind") if "rewind" in _registry.ROLES
                  else (None, None))
  rewound = (rew > 0) if rew is not None else np.zeros(r.steps, bool)
  spiked = set(spikes(norm, r.steps))
  blamed = _culprits(history, s)
  out = []
  for t in sorted(set(np.flatnonzero(bad | flagged | rewound)) | spiked):
    t = int(t)
    kind = ("non-finite" if bad[t] else "norm spike"
            if t in spiked or t in blamed else "loss spike")
    if rewound[t] and not (r.loss is not None and not np.isfinite(r.loss[t])):
      kind = "rewind"  # the inner figures of this row are the snapshot's
    back = undone = None
    if rew_key is not None and rewound[t]:  # the stronger action first
      by: str | None = rew_key.partition("/")[0]
      action = "rewound"
      back, undone = _rewound(s, by, t)
    elif skip_key is not None and flagged[t]:
      by, action = skip_key.partition("/")[0], "skipped"
    else:
      by = None if bad[t] else _clipped(s, t)
      action = "clipped" if by else "none"
    layer = blamed.get(t) or (_leaf_at(r, t, bool(bad[t])) if r.names else None)
    if kind == "rewind":
      layer = None
    out.append(Fault(r.first_step + t, kind, action, layer, float(norm[t]),
                     by, back, undone))
  return out


def contained(r: Series, faults: list[Fault]) -> bool:
  """Every fault acted on, and the run healthy after the last one."""
  if (not faults or any(f.action == "none" for f in faults)
      or halted(r, faults)):
    return False
  first, last = (faults[0].step - r.first_step,
                 faults[-1].step - r.first_step)
  after = r.norm[last + 1:]
  if not after.size or not np.all(np.isfinite(after)):
    return False
  if r.loss is not None and not np.all(np.isfinite(r.loss[last + 1:])):
    return False
  before = r.norm[:first][np.isfinite(r.norm[:first]) & (r.norm[:first] > 0)]
  return not (before.size and
              np.median(after) > CONTAINED_RANGE * np.median(before))


def without(r: Series, faults: list[Fault]) -> tuple[dict[str, np.ndarray],
                                                      np.ndarray | None]:
  """The history's series and losses with the fault steps taken out."""
  drop = [f.step - r.first_step for f in faults]
  s = {k: np.delete(v, drop) for k, v in r.s.items()}
  return s, None if r.loss is None else np.delete(r.loss, drop)


def fault_lines(faults: list[Fault], is_contained: bool, typical: float | None,
                stopped: str | None = None) -> list[str]:
  """Report lines: each fault (up to 5), then whether they were contained;
  none where nothing acted on any fault (an unguarded, unclipped run: the
  regime's own lines say it all)."""
  if all(f.action == "none" for f in faults):
    return []
  lines = []
  for f in faults[:5]:
    what = {"non-finite": "non-finite gradient", "norm spike": "norm spike",
            "loss spike": "loss spike",
            "rewind": "a rewind's trigger (a guard's halt or the loss)"
            }[f.kind]
    if f.kind == "norm spike" and typical and f.norm is not None:
      what += f" ({f.norm:.3g}, x{f.norm / typical:.0f} the median)"
    where = f" in {f.layer}" if f.layer else ""
    acted = {"skipped": f"skipped by {f.by}", "clipped": f"clipped by {f.by}",
             "rewound": f"rewound by {f.by} (params back to its snapshot"
                        + (f" of step {f.back_to}" if f.back_to is not None
                           else "")
                        + (f", {f.undone} steps undone" if f.undone else "")
                        + ")",
             "none": "nothing acted on it"}[f.action]
    lines.append(f"- fault at step {f.step}: {what}{where}; {acted}")
  if len(faults) > 5:
    lines.append(f"- ... and {len(faults) - 5} more faults")
  rewinds = [f for f in faults if f.action == "rewound"]
  if rewinds:
    lines.append(f"- {len(rewinds)} rewind(s), at step(s) "
                 f"{', '.join(str(f.step) for f in rewinds[:5])}")
  if stopped:
    lines.append(
        f"- {stopped} stopped the run (halt): the fault outlived its rewinds, "
        "so it comes back with the same data or schedule (a data stream that "
        "stays corrupt, a schedule tied to the step): look at the batches and "
        "the schedule around the rewound steps; clipping would not fix it")
  if is_contained:
    n = ("the fault was" if len(faults) == 1
         else f"all {len(faults)} faults were")
    lines.append(f"- contained: {n} acted on and the run was healthy after "
                 "(finite, norm in its range); the diagnosis below reads the "
                 "other steps")
  return lines
