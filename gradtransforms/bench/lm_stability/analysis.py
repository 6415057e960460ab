"""Reading the runs: divergence, spike score, LR sensitivity, recovery."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

UNIFORM_BITS = 8.0         # bits/byte of a uniform guess: the "no learning" loss
BLOWUP_BITS = 12.0         # a 10-step mean training loss above this: blew up
SPIKE_SIGMA = 7.0          # OLMo 2's spike score threshold


def diverged(loss: np.ndarray, final_bpb: float) -> bool:
  """A run diverged if its loss went non-finite, its 10-step mean training
  loss ever rose above ``BLOWUP_BITS`` bits/byte (1.5x a uniform guess), or
  its final held-out loss is worse than a uniform guess."""
  if not np.isfinite(loss).all() or not np.isfinite(final_bpb):
    return True
  return bool(smooth(loss).max() / np.log(2) > BLOWUP_BITS
              or final_bpb > UNIFORM_BITS)


def spike_score(x: np.ndarray, window: int, sigma: float = SPIKE_SIGMA) -> float:
  """OLMo 2's spike score: share of steps ``t >= window`` whose value is at
  least ``sigma`` std away from the mean of the previous ``window`` values
  (non-finite values count as spikes and are left out of the statistics)."""
  hits, n = 0, 0
  for t in range(window, len(x)):
    past = x[t - window:t]
    past = past[np.isfinite(past)]
    n += 1
    if not np.isfinite(x[t]):
      hits += 1
    elif past.size > 1 and abs(x[t] - past.mean()) >= sigma * past.std():
      hits += 1
  return hits / n if n else float("nan")


def lr_sensitivity(finals: list[float]) -> float:
  """Wortsman et al. (2023): ``mean_lr(min(L(lr), L_init) - min_lr L(lr))``
  with non-finite losses taken as ``L_init`` (uniform bits/byte)."""
  v = np.array([min(f, UNIFORM_BITS) if np.isfinite(f) else UNIFORM_BITS
                for f in finals])
  return float(np.mean(v - v.min()))


def smooth(x: np.ndarray, k: int = 10) -> np.ndarray:
  """Trailing mean over ``k`` steps (NaN stays NaN)."""
  c = np.cumsum(np.insert(x.astype(np.float64), 0, 0.0))
  out = np.empty(len(x))
  for t in range(len(x)):
    lo = max(0, t - k + 1)
    out[t] = (c[t + 1] - c[lo]) / (t + 1 - lo)
  return out


def recovery_steps(loss: np.ndarray, clean: np.ndarray, start: int,
                   tol: float = 0.01) -> int | None:
  """Steps after ``start`` until the fault run's smoothed loss is within
  ``tol`` (relative) of the clean run's and stays there to the end; None if
  it never does (both runs see the same batches). The loss of step ``start``
  itself is the clean run's in both: a fault batch's own loss is not a
  consequence of the fault."""
  loss = np.array(loss, np.float64)
  loss[start] = clean[start]
  a, b = smooth(loss), smooth(clean)
  ok = np.isfinite(a) & (np.abs(a - b) <= tol * np.abs(b))
  if not ok[-1]:
    return None
  bad = np.nonzero(~ok[start:])[0]
  return 0 if bad.size == 0 else int(bad[-1] + 1)


def tree_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return bool(all(bool(jnp.all(jnp.isfinite(x))) for x in leaves))
