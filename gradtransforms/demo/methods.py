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

OLD_NAMES = {"global_norm(1)": "clip_by_global_norm",
             "autoclip(p10)": "autoclip", "guard(spike)": "guard",
             "global_norm+guard": "clip_by_global_norm+guard"}
"""Names used in results written before 0.2.0 -> today's names."""

__all__ = ["METHODS", "OLD_NAMES", "SCENARIOS", "build", "run", "summarize"]


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
