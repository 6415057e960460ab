"""The methods the demo and the stability benchmark compare, built from
:data:`gradtransforms.catalogue.CATALOGUE`.

A method is a sequence of catalogue entries (with overrides of their
benchmark configuration) applied around the scenario's base optimizer in
order: ``"before"`` entries are chained in front of it, ``"after"`` ones
behind it, ``"around"`` ones wrap it. Names are catalogue names, joined by
``+`` (no shell quoting needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optax

from gradtransforms.catalogue import CATALOGUE
from gradtransforms.tasks.scenarios import SCENARIOS, summarize
from gradtransforms.tasks.training import train

_GUARD = {"on": ("spike", "loss_spike"), "warmup_steps": 5}

METHODS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "none": (),
    "clip_by_global_norm": (("clip_by_global_norm", {}),),
    "autoclip": (("autoclip", {}),),
    "zclip": (("zclip", {}),),
    "adagc": (("adagc", {"warmup_steps": 20}),),
    "guard": (("guard", _GUARD),),
    "clip_by_global_norm+guard": (("clip_by_global_norm", {}),
                                  ("guard", _GUARD)),
}
"""Method name -> catalogue entries with overrides of their ``bench`` config:
``clip_by_global_norm(1.0)``, ``autoclip(10.0, history=1000)``, ``zclip()``,
``adagc(warmup_steps=20)``, ``guard(on=("spike", "loss_spike"),
warmup_steps=5)``."""

FOCUS: dict[str, tuple[str, ...]] = {
    "mlp16-sigmoid": ("none",),
    "mlp16-sigmoid-batchnorm": ("none",),
    "mlp4-lr0.02": ("none", "autoclip", "zclip"),
    "mlp4-lr0.02-clip0.05": ("none",),
    "rnn-T50-rho0.5": ("none",),
}
"""Scenario -> the methods run on it unless methods are named: the vanishing
and over-tight-clip scenarios are about the model or the clip, not about
comparing every method, so they run few (cheap) cells. Other scenarios run
every method."""

__all__ = ["FOCUS", "METHODS", "SCENARIOS", "build", "pairs",
           "run", "summarize"]


def pairs(scenarios: list[str] | None = None, methods: list[str] | None = None
          ) -> list[tuple[str, str]]:
  """The (scenario, method) cells to run, in order: every named scenario
  (default: all) with every named method; with no methods named, each
  scenario's :data:`FOCUS` (default: every method)."""
  scenarios = list(scenarios or SCENARIOS)
  for name, known in ((scenarios, SCENARIOS), (methods or [], METHODS)):
    for n in name:
      if n not in known:
        raise ValueError(f"unknown name {n!r}; choose from {list(known)}")
  return [(s, m) for s in scenarios
          for m in (methods or FOCUS.get(s, tuple(METHODS)))]


def build(method: str, opt: optax.GradientTransformation
          ) -> optax.GradientTransformation:
  """Method ``method`` placed around the base optimizer ``opt``."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
  tx = opt
  for name, overrides in METHODS[method]:
    entry = CATALOGUE[name]
    make = entry.bench(**overrides)
    if entry.placement == "around":
      tx = make(tx)
    elif entry.placement == "after":
      tx = optax.chain(tx, make)
    else:
      tx = optax.chain(make, tx)
  return tx


def run(scenario: str, method: str, steps: int = 300, batch_size: int = 64,
        seed: int = 0) -> dict[str, np.ndarray]:
  """One training run of ``method`` on ``scenario``; the per-step figures
  (``loss``, ``monitor/norm``, ...)."""
  if scenario not in SCENARIOS:
    raise ValueError(f"unknown scenario {scenario!r}; choose from {list(SCENARIOS)}")
  sc = SCENARIOS[scenario]
  history, _ = train(sc.make_model(seed), build(method, sc.optimizer()),
                     sc.task, steps, batch_size, seed)
  return history
