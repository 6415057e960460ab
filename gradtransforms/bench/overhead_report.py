"""The overhead benchmark's machine record and markdown tables."""

from __future__ import annotations

import os
import platform
from datetime import date

import jax
import numpy as np
import optax

from gradtransforms.demo import tables

def machine(k: int) -> dict:
  dev = jax.devices()[0]
  return {"date": date.today().isoformat(), "platform": dev.platform,
          "device": dev.device_kind, "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "python": platform.python_version(), "jax": jax.__version__,
          "optax": optax.__version__, "steps_per_sample": k}


def _over(r: dict) -> bool:
  over = r["vs_adam"] > r["target"]
  margin = r.get("optax_margin")
  if margin is not None and "optax_vs_adam" in r:
    over |= r["vs_adam"] > r["optax_vs_adam"] + margin
  return bool(over)


HEADER = ("workload", "method", "Adam ms", "ms", "vs Adam", "target",
          "optax equiv. vs Adam", "kernels", "kernels: optax equiv. / Adam+one read",
          "page faults/step (Adam)", "compile s (Adam)", "note")


def to_markdown(rows: list[dict], info: dict,
                compiles: list[dict] | None = None) -> str:
  if not rows:  # compile times only (--no-trees --no-models)
    return compile_markdown(compiles) if compiles else ""
  k = info.get("steps_per_sample", 1)
  timing = ("one step per sample" if k == 1 else
            f"{k} back-to-back donated steps per sample")
  text = (f"Step time of each method with `optax.adam` / Adam alone, median "
          f"of paired per-round ratios ({timing}). {info['device']} "
          f"({info['platform']}), {info['cpu_count']} cores, jax {info['jax']}, "
          f"optax {info['optax']}, {info['date']}. Kernels: fusions and custom "
          f"calls in the compiled ENTRY computation"
          f"{' (XLA:CPU fusions, not GPU kernels)' if info['platform'] == 'cpu' else ''}"
          f". **over**: above the target.\n\n")
  body = []
  for r in rows:
    ref_k = (f"{r['optax_kernels']} (optax)" if "optax_kernels" in r else
             f"{r['one_read_kernels']} (one read)")
    body.append((r["workload"], r["method"], f"{r['adam_ms']:.2f}",
                 f"{r['ms']:.2f}",
                 f"{r['vs_adam']:.3f}" + (" **over**" if _over(r) else ""),
                 f"{r['target']:.2f}" if np.isfinite(r["target"]) else None,
                 r.get("optax_vs_adam"), r["kernels"], ref_k,
                 f"{r['faults']:.0f} ({r['adam_faults']:.0f})",
                 f"{r['compile_s']:.2f} ({r['adam_compile_s']:.2f})",
                 r.get("layer_axes") if isinstance(r.get("layer_axes"), str)
                 else ("layer_axes=0" if r.get("layer_axes") == 0 else "") +
                 (f" (per leaf: {r['per_leaf_vs_adam']:.3f})"
                  if "per_leaf_vs_adam" in r else "")))
  text += tables.markdown(HEADER, body, align="llrrrrrrrrrl")
  return text + (compile_markdown(compiles) if compiles else "")


def compile_markdown(compiles: list[dict]) -> str:
  """Compile time of each method's step / Adam's, one column per leaf
  count (``overhead_compile.png`` plots it)."""
  leaves = sorted({r["leaves"] for r in compiles})
  methods = list(dict.fromkeys(r["method"] for r in compiles))
  by = {(r["method"], r["leaves"]): r for r in compiles}
  adam = [min(r["adam_compile_s"] for r in compiles if r["leaves"] == n)
          for n in leaves]
  body: list[tuple[str | None, ...]] = [("Adam (s)", *[f"{a:.2f}" for a in adam])]
  for m in methods:
    body.append((m, *[f"{by[m, n]['vs_adam']:.2f}" if (m, n) in by else None
                      for n in leaves]))
  repeats = max((r.get("repeats", 1) for r in compiles), default=1)
  best = f", each the fastest of {repeats} compiles" if repeats > 1 else ""
  return ("\nCompile time of the donated step with Adam / Adam's alone, by "
          "number of leaves (small leaves of 5 shapes; first row: Adam's "
          f"seconds{best}).\n\n" + tables.markdown(
              ("method", *[f"{n} leaves" for n in leaves]), body,
              align="l" + "r" * len(leaves)))
