"""Step 6 of ``diagnose``: write the report, in plain language."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gradtransforms.diagnose.findings import UPDATE_RATIO_FLOOR, ClipFinding
from gradtransforms.diagnose.regime import Figures
from gradtransforms.diagnose.series import Series


def _more(names: list[str], n: int = 4) -> str:
  return ", ".join(names[:n]) + (f" and {len(names) - n} more"
                                 if len(names) > n else "")


def _headline(regime: str, evidence: list[str], clips: list[ClipFinding]
              ) -> str:
  over = any(c.verdict == "over-tight" for c in clips)
  headline = {"exploding": "EXPLODING", "vanishing": "VANISHING",
              "healthy": "healthy gradients (no explosion, no vanishing)"
              + (", but the clip below starves the steps" if over else "")
              }[regime]
  return f"- regime: {headline}" + (f" ({'; '.join(evidence)})"
                                    if evidence else "")


def _figure_lines(r: Series, f: Figures, regime: str,
                  clips: list[ClipFinding]) -> list[str]:
  lines = []
  w = r.weights
  if r.first_bad is not None:
    where = f" in {_more(r.bad_layers)}" if r.bad_layers else ""
    lines.append(f"- first non-finite gradient at step "
                 f"{r.first_step + r.first_bad}{where}")
  else:
    lines.append("- no non-finite gradient")
  if f.growth is not None:
    lines.append(f"- norm growth: x{np.exp(f.growth):.3f} per step over the "
                 f"last {f.window} healthy steps")
  if f.depth is not None:
    per = (f"; x{f.factor:.2g} per layer over {len(w)} layers"
           if f.factor is not None and len(w) > 2 and not f.recurrent else "")
    lines.append(f"- depth profile: ||{w[0]}|| / ||{w[-1]}|| = "
                 f"{f.depth:.3g} (median over healthy steps{per})")
  if f.dead:
    lines.append(f"- zero gradient over the second half in {_more(f.dead)}"
                 ": saturated (tanh/sigmoid) or dead (ReLU) units; these "
                 "layers no longer learn")
  if f.first_ur is not None and f.last_ur is not None:
    lines.append(f"- update/param ratio: {f.first_ur:.2g} in {w[0]}, "
                 f"{f.last_ur:.2g} in {w[-1]} (usual: 1e-4 to 1e-2)")
    if regime != "vanishing" and max(f.first_ur, f.last_ur) < UPDATE_RATIO_FLOOR:
      over = any(c.verdict == "over-tight" for c in clips)
      lines.append("- steps are tiny in every layer: " + (
          "the over-tight clip below shrinks them" if over else
          "the learning rate is too small for these weights"))
  if f.loss_change is not None:
    lines.append(f"- loss: {100 * f.loss_change:+.1f}% over the second half"
                 + (" (stalled)" if f.stalled else ""))
  if f.suggested is not None and regime == "exploding":
    lines.append(f"- suggested clip: gt.clip_by_global_norm({f.suggested:.3g}) "
                 "(90th percentile of healthy norms), or gt.zclip()")
  return lines


def write_report(r: Series, f: Figures, regime: str, evidence: list[str],
                 clips: list[ClipFinding], clip_lines: list[str],
                 causes: list[str], fault_lines: Sequence[str] = (),
                 whole: Series | None = None, contained_faults: int = 0
                 ) -> str:
  """Step 6: the plain-language report. ``whole``: the run with its
  ``contained_faults``, where ``r`` is read without them."""
  head = _headline(regime, evidence, clips)
  if contained_faults:
    n = contained_faults
    head += f"; {'a fault' if n == 1 else f'{n} faults'} contained"
  span = (f"steps {r.first_step} to {r.first_step + r.steps - 1}; "
          if r.first_step else "")
  lines = [f"Gradient diagnosis over {r.steps} steps ({span}{r.norm_key}):",
           head]
  lines += fault_lines
  figures = _figure_lines(r, f, regime, clips)
  if whole is not None and whole is not r and whole.first_bad is not None:
    figures[0] = (f"- first non-finite gradient at step "
                  f"{whole.first_step + whole.first_bad} (contained)")
  lines += figures
  if r.zero_leaves:
    lines.append(f"- left out of the depth profile: {_more(r.zero_leaves, 3)}"
                 " (zero gradient on every step: zero by construction)")
  lines += clip_lines
  lines += [f"- likely cause: {c}" for c in causes]
  if regime == "healthy" and not causes:
    lines.append("- no explosion pattern found, no vanishing gradient")
  return "\n".join(lines)
