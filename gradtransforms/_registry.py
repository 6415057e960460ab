"""The registry of state classes: their readable name, figures and roles.

Each state class registers the figures ``gt.metrics`` reports (fields or
properties of the state) and the *roles* some of them play, so host-side
readers (``diagnose``, ``culprits``, events) ask for a role
(``"global_norm"``) instead of hard-coding another module's key strings:
renaming a figure updates every reader.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

ROLES: dict[str, str] = {
    "global_norm": "pre-clip global L2 norm of the gradient (scalar)",
    "leaf_norm": "per-leaf (per layer slice) pre-clip L2 norm (PerLeaf)",
    "loss": "the loss passed as value= (scalar)",
    "clip_scale": "scale the clip applied (scalar or PerLeaf; 1 = not clipped)",
    "clipped": "the clip acted at the last step (bool)",
    "threshold": "the bound in force at the last step",
    "clip_peak": "the largest pre-clip |u| an elementwise clip saw at the "
                 "last step (NaN: not recorded, or the update held a NaN)",
    "skip": "the wrapper skipped the last step (bool)",
    "culprit": "segment index blamed at the last event (-1: none)",
    "culprit_step": "step index of that event (-1: none)",
    "first_nonfinite_leaf": "lowest segment index non-finite at the first "
                            "non-finite step (-1: none)",
    "first_nonfinite_step": "step index of the first non-finite gradient",
    "update_ratio": "per-leaf ||update|| / ||param|| (PerLeaf)",
    "rewind": "the wrapper took the params back to its snapshot at the last "
              "step (bool)",
    "rewinds": "rewinds so far (int)",
}


class Info(NamedTuple):
  name: str
  figures: tuple[str, ...]
  roles: Mapping[str, str]  # role -> figure


_REGISTRY: dict[type, Info] = {}


def register(name: str, figures: tuple[str, ...],
             roles: Mapping[str, str] | None = None) -> Callable[[type], type]:
  """Class decorator: ``gt.metrics`` reports ``figures`` (fields or
  properties of the state) as ``"<name>/<figure>"``; ``roles`` maps a role
  of :data:`ROLES` to one of the figures."""
  roles = dict(roles or {})
  for role, fig in roles.items():
    if role not in ROLES or fig not in figures:
      raise ValueError(f"register({name!r}): bad role {role!r} -> {fig!r}")

  def deco(cls: type) -> type:
    _REGISTRY[cls] = Info(name, tuple(figures), roles)
    return cls
  return deco


def lookup(cls: type) -> Info | None:
  return _REGISTRY.get(cls)


def info(cls: type) -> Info:
  """The registration of a registered state class."""
  return _REGISTRY[cls]


def with_role(role: str) -> list[tuple[str, str]]:
  """``(transform name, figure)`` pairs that play ``role``, in registration
  order (monitors first)."""
  if role not in ROLES:
    raise ValueError(f"unknown role {role!r}; choose from {sorted(ROLES)}")
  return [(i.name, i.roles[role]) for i in _REGISTRY.values() if role in i.roles]


def by_name(name: str) -> Info | None:
  """The registration of the state class registered as ``name``."""
  return next((i for i in _REGISTRY.values() if i.name == name), None)
