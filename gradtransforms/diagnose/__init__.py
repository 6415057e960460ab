"""``diagnose``: a host-side reading of recorded metrics, in plain language.

It tells three gradient regimes apart and names likely causes only from the
figures that support them:

- **exploding**: a non-finite gradient or loss, sustained exponential growth
  of the norm (over an order of magnitude), norm spikes (``SPIKE_FACTOR`` x
  the recent median), or a first norm that far above the rest, sitting in
  the early layers and not the first fit of a large initial loss. Only then are explosion causes (learning rate,
  initialisation scale, depth amplification, recurrence, bad batches) named.
- **vanishing**: the early layers' gradient norms orders of magnitude below
  the last layers' (the depth profile), the early layers' update-to-parameter
  ratios far below the usual 1e-4..1e-2 while the last layers' are not, or a
  recurrent model whose loss stalls without any explosion.
- **healthy**: neither.

Independently of the regime it reads every clip in the history (roles
``clip_scale``, ``clipped``, ``threshold``): a clip that acts on most steps
with a small scale lowers the effective learning rate; a fixed threshold
that is never reached does nothing.

The pipeline, one module per step, each callable alone:
:func:`series.read` (read the series) -> :func:`faults.find_faults` and
:func:`faults.contained` (a guard's skips and clipped spikes: the run is
read without them when all were contained) -> :func:`regime.measure` and
:func:`regime.find_regime` (find the regime) -> :func:`explain.explain`
(explain it) -> :func:`clips.check_clips` (check the clips) ->
:func:`report.write_report` (write the report).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gradtransforms.diagnose.clips import check_clips
from gradtransforms.diagnose.explain import explain
from gradtransforms.diagnose.faults import (contained, fault_lines,
                                            find_faults, halted, unrecorded,
                                            without)
from gradtransforms.diagnose.findings import (SATURATING_FACTOR, SPIKE_FACTOR,
                                              STALL, TIGHT_ACTIVE, TIGHT_SCALE,
                                              UPDATE_RATIO_FLOOR,
                                              VANISHING_RATIO, ClipFinding,
                                              Diagnosis, Fault)
from gradtransforms.diagnose.regime import find_regime, measure
from gradtransforms.diagnose.report import write_report
from gradtransforms.diagnose.series import depth_profile, read

__all__ = ["diagnose", "Diagnosis", "ClipFinding", "Fault", "depth_profile",
           "VANISHING_RATIO", "SATURATING_FACTOR", "UPDATE_RATIO_FLOOR",
           "STALL", "SPIKE_FACTOR", "TIGHT_ACTIVE", "TIGHT_SCALE"]


def diagnose(history: Any, loss: Sequence[float] | None = None) -> Diagnosis:
  """Reads a run's recorded metrics: exploding, vanishing or healthy, why,
  and what the clips did.

  Args:
    history: a list of ``gt.metrics(state, per_leaf=True)`` dicts, one per
      step (arrays or numbers), or a dict of per-step sequences with the
      same keys. It needs a global norm (``monitor/norm`` or another
      ``*/norm`` figure); per-leaf norms (``gt.monitor(per_leaf=True)``)
      add the depth profile and layer names; update-to-parameter ratios
      (``gt.monitor(update_ratio=True)`` chained after the optimizer) and
      clip scales/thresholds add their findings.
    loss: optional per-step losses (non-finite losses mark blow-up too; a
      stalled loss supports vanishing).

  Returns:
    a :class:`Diagnosis`: the regime and its evidence, first non-finite
    step and layers, exponential growth rate of the norm, spikes, depth
    profile (first / last layer norm ratio and the per-layer factor),
    update ratios, the loss change over the second half, a finding per clip,
    a suggested clip threshold (the 90th percentile of the healthy norms),
    and a report naming likely causes and remedies. Explosion causes
    (learning rate, initialisation scale, depth amplification, recurrence,
    bad batches) are named only for a run that exploded; vanishing ones
    (saturating activations, depth, recurrence) only for one that vanished.
  """
  r = read(history, loss)
  faults = find_faults(history, r)
  is_contained, stopped = contained(r, faults), halted(r, faults)
  whole = r
  if is_contained:  # diagnose the other steps: a skipped NaN is no explosion
    r = read(*without(r, faults))
    r.steps, r.zero_leaves = whole.steps, whole.zero_leaves
    r.first_step, r.norm_key = whole.first_step, whole.norm_key
  f = measure(r)
  if stopped:  # the fault outlived its rewinds: no clip would fix it
    f.suggested = None
  regime, evidence = find_regime(r, f)
  causes, remedies = explain(r, f, regime)
  clips, clip_lines, clip_causes = check_clips(r, f, advise=not is_contained)
  causes += clip_causes
  typical = float(np.median(r.healthy)) if r.healthy.size else None
  lines = fault_lines(faults, is_contained, typical, stopped)
  if any(x.action == "none" for x in faults):
    lines += [f"- {h} records no peak (record_peak=True records it): whether "
              "it acted on these faults is not known"
              for h in unrecorded(whole.s)]
  report = write_report(r, f, regime, evidence, clips, clip_lines, causes,
                        lines, whole,
                        len(faults) if is_contained else 0)
  w = r.weights
  bad_layers = whole.bad_layers or [
      x.layer for x in faults[:1] if x.kind == "non-finite" and x.layer]
  return Diagnosis(
      whole.steps, None if whole.first_bad is None
      else whole.first_step + whole.first_bad, bad_layers, f.growth, f.doubling, f.depth,
      w[0] if w else None, w[-1] if w else None, f.suggested, causes, report,
      regime=regime, evidence=evidence, remedies=remedies,
      layer_factor=f.factor, spike_steps=[r.first_step + t for t in f.spikes], first_update_ratio=f.first_ur,
      last_update_ratio=f.last_ur, loss_change=f.loss_change, dead_layers=f.dead,
      clips=clips, faults=faults, contained=is_contained, halted_by=stopped,
      zero_leaves=whole.zero_leaves)
