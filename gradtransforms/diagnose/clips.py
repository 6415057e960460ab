"""Step 5 of ``diagnose``: check the clips.

Independently of the regime it reads every clip in the history (roles
``clip_scale``, ``clipped``, ``threshold``): a clip that acts on most steps
with a small scale lowers the effective learning rate; a fixed threshold
that is never reached does nothing. A clip that records neither a scale
nor its peak (``clip_by_value`` without ``record_peak``) is not judged.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gradtransforms import _registry
from gradtransforms.diagnose.findings import (TIGHT_ACTIVE, TIGHT_SCALE,
                                              ClipFinding)
from gradtransforms.diagnose.regime import Figures
from gradtransforms.diagnose.series import Series


THRESHOLD_ARGS = ("max_norm", "max_abs", "threshold", "clipping")
"""Constructor arguments that are a clip's bound: under
``optax.inject_hyperparams`` ``gt.metrics`` reports their current value
each step (``"clip_by_global_norm/max_norm"``), read as the threshold in
force where the state records none."""


def _by_instance(s: Mapping[str, np.ndarray], end: int
                 ) -> dict[str, dict[str, Any]]:
  """Transform instance (key head) -> its clip series by role."""
  heads: dict[str, dict[str, Any]] = {}
  for role in ("clip_scale", "threshold", "clipped", "global_norm",
               "clip_peak"):
    for name, fig in _registry.with_role(role):
      for k in s:
        head, _, rest = k.partition("/")
        if head.split("@")[0] != name:
          continue
        if rest == fig:
          heads.setdefault(head, {})[role] = s[k][:end]
        elif role == "clip_scale" and rest.startswith(fig + "/"):
          heads.setdefault(head, {}).setdefault("leaf_scales", []).append(
              s[k][:end])
  for head, f in heads.items():  # an injected (scheduled) bound, per step
    for hp in THRESHOLD_ARGS:
      if "threshold" not in f and f"{head}/{hp}" in s:
        f["threshold"] = s[f"{head}/{hp}"][:end]
        f["scheduled"] = True
  return heads


def _finding(head: str, f: dict[str, Any], pre_norm: np.ndarray
             ) -> ClipFinding | None:
  norm = f.get("global_norm", pre_norm)
  thr = f.get("threshold")
  if "clip_scale" in f:
    scale = f["clip_scale"]
  elif "leaf_scales" in f:
    scale = np.nanmedian(np.stack(f["leaf_scales"], 1), axis=1)
  elif thr is not None and "global_norm" in f:
    with np.errstate(divide="ignore", invalid="ignore"):
      scale = np.minimum(1.0, thr / norm)
  else:
    scale = None
  ok = np.isfinite(norm)
  if scale is not None:
    ok &= np.isfinite(scale)
  elif "clip_peak" in f:  # a step whose peak was not recorded says nothing
    ok &= np.isfinite(f["clip_peak"])
  if not ok.any():
    return None
  if scale is not None:
    active = scale[ok] < 1 - 1e-6
  else:
    active = f["clipped"][ok] > 0 if "clipped" in f else np.zeros(ok.sum(), bool)
  if thr is None and scale is not None and "clip_scale" in f and active.any():
    thr = norm * scale  # the bound a norm clip scaled down to
    thr = np.where(scale < 1 - 1e-6, thr, np.nan)
  thr_ok = thr[ok][np.isfinite(thr[ok])] if thr is not None else np.array([])
  threshold = float(np.median(thr_ok)) if thr_ok.size else None
  adaptive = bool(thr_ok.size and np.ptp(thr_ok) > 1e-3 * abs(np.median(thr_ok)))
  median_scale = float(np.median(scale[ok])) if scale is not None else None
  frac = float(active.mean())
  if (frac >= TIGHT_ACTIVE and median_scale is not None
      and median_scale < TIGHT_SCALE):
    verdict = "over-tight"
  elif not active.any() and not adaptive:
    verdict = "never reached"
  else:
    verdict = "ok"
  finite_norm = norm[ok][np.isfinite(norm[ok])]
  bound = f.get("threshold")
  path = None
  if bound is not None and adaptive and f.get("scheduled"):
    b = bound[np.isfinite(bound)]
    path = (float(b[0]), float(b[-1])) if b.size else None
  return ClipFinding(head, verdict, frac, median_scale, threshold, adaptive,
                     float(finite_norm.max()) if finite_norm.size else None,
                     path)


def clip_findings(s: Mapping[str, np.ndarray], end: int, pre_norm: np.ndarray
                  ) -> list[ClipFinding]:
  """One finding per transform instance recording a clip scale or a
  threshold. The scale is read (``clip_scale``; per-leaf scales: their
  median over leaves at each step) or derived as ``min(1, threshold /
  norm)``; the instance's own pre-clip norm is used where it records one."""
  heads = _by_instance(s, end)
  found = []
  for head in sorted(heads):
    if not ({"clip_scale", "leaf_scales", "threshold"} & set(heads[head])):
      continue
    c = _finding(head, heads[head], pre_norm[:end])
    if c is not None:
      found.append(c)
  return found


def _fix(c: ClipFinding, fell: float | None, suggested: float | None) -> str:
  if c.adaptive:
    return ("loosen it (a higher percentile for gt.autoclip, a higher z "
            "for gt.zclip)")
  if fell is not None and fell > 10:
    return (f"but the pre-clip norm fell {fell:.3g}x over the run, so the "
            "clip may be holding back an explosion (init scale, depth): "
            "fix that first, then set the threshold from the settled norms "
            "or use an adaptive clip (gt.zclip(), gt.autoclip())")
  return (f"use gt.clip_by_global_norm({suggested:.3g}) (90th percentile "
          "of the pre-clip norms) " if suggested is not None else "") + (
          "or an adaptive clip that follows the norms (gt.zclip(), "
          "gt.autoclip())")


def check_clips(r: Series, f: Figures, advise: bool = True
                ) -> tuple[list[ClipFinding], list[str], list[str]]:
  """Step 5: ``(findings, report lines, causes)`` of the run's clips.
  ``advise=False``: no threshold advice for a clip that was never reached
  (a run whose faults were contained needs none)."""
  clips = clip_findings(r.s, r.end, r.norm)
  # How far the pre-clip norm fell over the run (first against last 10%):
  # a clip acting on norms that fall by orders of magnitude may be holding
  # back an explosion rather than starving healthy training.
  fell = None
  if len(r.healthy) >= 10:
    w10 = max(len(r.healthy) // 10, 1)
    fell = float(np.median(r.healthy[:w10]) / np.median(r.healthy[-w10:]))
  lines, causes = [], []
  suggested = f.suggested
  for c in clips:
    thr = f" (threshold {c.threshold:.3g})" if c.threshold is not None else ""
    if c.threshold_path is not None:
      thr = (f" (threshold {c.threshold_path[0]:.3g} -> "
             f"{c.threshold_path[1]:.3g}, median {c.threshold:.3g})")
    if c.verdict == "over-tight":
      assert c.median_scale is not None
      causes.append(
          f"over-tight clipping: {c.name}{thr} scaled the gradient on "
          f"{100 * c.active_fraction:.0f}% of the steps, by a median "
          f"{c.median_scale:.2g}: the effective learning rate is ~"
          f"{c.median_scale:.2g} of the nominal (for SGD-like optimizers; "
          f"Adam-like ones undo a steady scale); {_fix(c, fell, suggested)}")
      lines.append(f"- clip {c.name}: over-tight, effective learning rate "
                   f"~{c.median_scale:.2g} of the nominal")
    elif c.verdict == "never reached":
      most = f", largest pre-clip norm {c.max_norm:.3g}" if c.max_norm else ""
      sug = (f"; a threshold near {suggested:.3g} (90th percentile of the "
             "pre-clip norms) would bound the largest 10% of steps, or use "
             "gt.zclip() for spikes only" if suggested is not None and advise
             else "")
      lines.append(f"- clip {c.name}{thr}: never reached in {r.end} steps"
                   f"{most}; it does nothing{sug}")
    else:
      sc = (f", median scale {c.median_scale:.2g}" if c.median_scale is not None
            else "")
      lines.append(f"- clip {c.name}{thr}: active on "
                   f"{100 * c.active_fraction:.0f}% of the steps{sc}")
  return clips, lines, causes
