"""What ``diagnose`` concludes: its thresholds and result types."""

from __future__ import annotations

import dataclasses

VANISHING_RATIO = 1e-2
"""First / last layer gradient norm below which the profile counts as
vanishing (two orders of magnitude)."""
SATURATING_FACTOR = 0.5
"""Per-layer shrink factor at or below which saturating activations are
named (sigmoid's derivative is at most 0.25; ReLU with He init keeps about
1)."""
UPDATE_RATIO_FLOOR = 1e-5
"""``||u|| / ||p||`` below which a layer's steps count as far below the
usual 1e-4..1e-2 range (an order of magnitude under its bottom)."""
STALL = 0.05
"""Relative loss change over the second half of a run below which the loss
counts as stalled."""
SPIKE_FACTOR = 20.0
"""A norm this many times the median of the 20 steps before it is a spike."""
TIGHT_ACTIVE, TIGHT_SCALE = 0.5, 0.5
"""A clip acting on at least this fraction of steps with a median scale
below this is over-tight."""


@dataclasses.dataclass
class ClipFinding:
  """What :func:`diagnose` read from one clip of the optimizer.

  ``verdict``: ``"over-tight"`` (acts on most steps with a small scale),
  ``"never reached"`` (a fixed threshold that never acted) or ``"ok"``.
  ``median_scale`` is the median factor the clip multiplied the gradient by
  over the healthy steps: for SGD-like optimizers, the effective learning
  rate as a fraction of the nominal one.
  """
  name: str
  verdict: str
  active_fraction: float
  median_scale: float | None
  threshold: float | None  # median bound in force (None: not recorded)
  adaptive: bool  # the threshold moved during the run
  max_norm: float | None  # largest finite pre-clip norm
  # first and last bound of a scheduled threshold (an injected
  # hyperparameter, optax.inject_hyperparams) that moved; None otherwise
  threshold_path: tuple[float, float] | None = None


@dataclasses.dataclass
class Fault:
  """One faulty step :func:`diagnose` found. ``kind``: ``"non-finite"``,
  ``"norm spike"``, ``"loss spike"`` or ``"rewind"`` (a step a rewind took
  back, whose inner figures are the snapshot's); ``action``: ``"skipped"`` (a
  guard's skip flag), ``"rewound"`` (a rewind took the params back to its
  snapshot), ``"clipped"`` (a clip scaled the step down) or ``"none"``; ``by``: the transform that acted; ``layer``: the leaf (layer
  slice) the state blamed, if any; ``norm``: the step's global norm;
  for a rewind, ``back_to`` (the snapshot's step) and ``undone`` (steps
  taken back), where recorded."""
  step: int
  kind: str
  action: str
  layer: str | None
  norm: float | None
  by: str | None = None
  back_to: int | None = None
  undone: int | None = None


@dataclasses.dataclass
class Diagnosis:
  """What :func:`diagnose` found. ``report`` is the plain-language summary;
  ``regime`` is ``"exploding"``, ``"vanishing"`` or ``"healthy"``;
  ``causes`` name the likely causes of that regime (and an over-tight clip),
  each with its remedies; ``evidence`` the figures behind the regime.
  ``faults`` lists the non-finite, spiking or guard-flagged steps;
  ``contained`` says each was skipped or clipped and the run was healthy
  after, in which case the regime is read from the other steps (a skipped
  NaN is not an explosion). ``zero_leaves``: leaves whose gradient was zero
  on every step (zero by construction), left out of the depth profile."""
  steps: int
  first_nonfinite_step: int | None
  first_nonfinite_layers: list[str]
  growth_per_step: float | None  # mean d log||g|| / d step before blow-up
  doubling_steps: float | None
  depth_ratio: float | None  # first-layer / last-layer gradient norm (median)
  first_layer: str | None
  last_layer: str | None
  suggested_clip: float | None
  causes: list[str]
  report: str
  regime: str = "healthy"
  evidence: list[str] = dataclasses.field(default_factory=list)
  remedies: list[str] = dataclasses.field(default_factory=list)
  layer_factor: float | None = None  # per-layer shrink/growth (geometric)
  spike_steps: list[int] = dataclasses.field(default_factory=list)
  first_update_ratio: float | None = None  # median ||u||/||p||, first layer
  last_update_ratio: float | None = None
  loss_change: float | None = None  # relative, over the second half
  dead_layers: list[str] = dataclasses.field(default_factory=list)
  clips: list[ClipFinding] = dataclasses.field(default_factory=list)
  faults: list[Fault] = dataclasses.field(default_factory=list)
  contained: bool = False  # every fault acted on, the run healthy after
  halted_by: str | None = None  # a rewind that stopped the run (halt)
  zero_leaves: list[str] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    return self.report
