"""The compared methods: gradtransforms, the stacks' skip rules, optax."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import gradtransforms as gt
from gradtransforms.bench.lm_stability import skip_rules

# Every gt.metrics / gt.culprits key read here, in one place: the state
# layout is being refactored, so rename here if a key changes.
KEYS = {
    "guard_bad": "guard/bad",                          # bool, last step
    "guard_culprit": "detect_spikes/culprit",          # gt.culprits: leaf name
    "guard_culprit_step": "detect_spikes/culprit_step",
    "clip_scale": "clip_by_global_norm/scale",         # < 1: clipped
    "zclip_clipped": "zclip/clipped",
    "adagc_clipped": "adagc/clipped",                  # leaves scaled down
    "autoclip_clipped": "autoclip/clipped",
    "spike_clip_clipped": "spike_clip/clipped",
    "rewound": "rewind/rewound",                      # bool, last step
    "rewinds": "rewind/rewinds",
    "rewind_lost": "rewind/lost",                     # steps undone so far
    "rewind_halt": "rewind/halt",
}

REWIND: dict[str, Any] = dict(every=10, patience=5, margin=0.25, max_rewinds=2)
"""``gt.rewind``'s settings here: a snapshot every 10 steps (PaLM went back
~100 steps on runs 1000x longer), a rewind after 5 steps in a row 0.25 nats
above the snapshot window's mean loss, or when the guard halts (5 bad steps
in a row); after 2 rewinds to one snapshot the third halts (params frozen
there). ``-r8``: 8 rewinds allowed, enough to outlast the 20-30-step faults."""


def _metric(state, key: str) -> jax.Array:
  return gt.metrics(state)[KEYS[key]]


def _adagc_clipped(state, norm) -> jax.Array:
  return _metric(state, "adagc_clipped") > 0


def stacked_blocks(name: str, leaf: Any) -> int | None:
  """``layer_axes`` for ``TransformerLM``: every leaf under ``blocks`` holds
  its layers on axis 0, so per-leaf figures and culprits are per layer."""
  return 0 if name.startswith("blocks/") else None


def _baseline_skipped(state, norm) -> jax.Array:
  s = skip_rules.find_states(state)[0]
  if isinstance(s, skip_rules.SkipRuleState):
    return s.skipped
  return ~s.last_finite  # optax.apply_if_finite


@dataclasses.dataclass(frozen=True)
class Method:
  """``build(inner) -> tx``; ``acted(opt_state, raw_norm) -> bool``: did it
  clip or skip this step; ``kind``: "clip", "skip" or "-"."""
  name: str
  build: Callable[[optax.GradientTransformation], optax.GradientTransformation]
  acted: Callable[[Any, jax.Array], jax.Array]
  kind: str

  def costs(self, state, norm) -> dict:
    """Per step: ``skipped`` (this step's update was not applied),
    ``lost``/``rewinds`` (steps undone / rewinds so far), ``halt``."""
    z, f = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
    if self.kind == "rewind":
      m = gt.metrics(state)
      return {"skipped": m[KEYS["guard_bad"]] & ~m[KEYS["rewound"]],
              "lost": m[KEYS["rewind_lost"]],
              "rewinds": m[KEYS["rewinds"]], "halt": m[KEYS["rewind_halt"]]}
    skipped = self.acted(state, norm) if self.kind == "skip" else f
    return {"skipped": skipped, "lost": z, "rewinds": z, "halt": f}


def scale_by_rate() -> optax.GradientTransformationExtraArgs:
  """Multiplies the update by the ``rate=`` passed to ``update``: puts the
  benchmark's learning rate inside a wrapper whose update must be final
  (``gt.rewind``: its snapshot is ``params + update``)."""
  def update(updates, state, params=None, *, rate=None, **extra):
    return jax.tree.map(lambda u: u * rate, updates), state
  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update)


def _rewind(name: str, kw: dict) -> Method:
  return Method(
      name, lambda inner: gt.rewind(
          gt.guard(optax.chain(inner, scale_by_rate()),
                   on=("spike", "loss_spike"), max_consecutive_errors=5,
                   layer_axes=stacked_blocks), **kw),
      lambda s, n: _metric(s, "guard_bad") | _metric(s, "rewound"), "rewind")


def methods(window: int) -> dict[str, Method]:
  """The compared methods; ``window`` is the baselines' rolling window."""
  chain = lambda t: (lambda inner: optax.chain(t, inner))
  rules = skip_rules
  ms = [
      Method("none", lambda inner: inner, lambda s, n: jnp.zeros((), bool), "-"),
      Method("gt.clip_by_global_norm", chain(gt.clip_by_global_norm(1.0)),
             lambda s, n: _metric(s, "clip_scale") < 1.0, "clip"),
      Method("gt.zclip", chain(gt.zclip()),
             lambda s, n: _metric(s, "zclip_clipped"), "clip"),
      Method("gt.adagc", chain(gt.adagc()), _adagc_clipped, "clip"),
      Method("gt.autoclip", chain(gt.autoclip()),
             lambda s, n: _metric(s, "autoclip_clipped"), "clip"),
      Method("gt.spike_clip", chain(gt.spike_clip()),
             lambda s, n: _metric(s, "spike_clip_clipped"), "clip"),
      Method("gt.guard",
             lambda inner: gt.guard(inner, on=("spike", "loss_spike"),
                                    layer_axes=stacked_blocks),
             lambda s, n: _metric(s, "guard_bad"), "skip"),
      # issue 23: a per-layer z-score rule and the stacks' raw mean + k sigma
      Method("gt.guard-layer",
             lambda inner: gt.guard(inner, on=("spike", "loss_spike",
                                               "layer_spike"),
                                    layer_axes=stacked_blocks),
             lambda s, n: _metric(s, "guard_bad"), "skip"),
      Method("gt.guard-sigma",
             lambda inner: gt.guard(inner, on=("spike", "loss_spike",
                                               "norm_sigma"),
                                    layer_axes=stacked_blocks),
             lambda s, n: _metric(s, "guard_bad"), "skip"),
      _rewind("gt.rewind+guard", REWIND),
      _rewind("gt.rewind+guard-r8", dict(REWIND, max_rewinds=8)),
      Method("olmo", lambda inner: rules.olmo_skip_step(inner, window),
             _baseline_skipped, "skip"),
      Method("olmo-pr424",
             lambda inner: rules.olmo_skip_step(inner, window, fixed=True),
             _baseline_skipped, "skip"),
      Method("levanter", lambda inner: rules.levanter_skip_bad_steps(inner, window),
             _baseline_skipped, "skip"),
      Method("maxtext", lambda inner: rules.maxtext_skip_step_on_spikes(inner, window),
             _baseline_skipped, "skip"),
      Method("optax.apply_if_finite",
             lambda inner: optax.apply_if_finite(inner, 10),
             _baseline_skipped, "skip"),
      Method("optax.clip_by_global_norm", chain(optax.clip_by_global_norm(1.0)),
             lambda s, n: n > 1.0, "clip"),
  ]
  return {m.name: m for m in ms}


def base_optimizer() -> optax.GradientTransformation:
  """Adam at learning rate 1 (the rate and schedule are applied afterwards)."""
  return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                     optax.scale(-1.0))
