"""Kernels: each method + Adam against its reference, compiled deviceless for
an H100 and a TPU v5e (kernels, DRAM bytes / Adam, compile time / Adam).

References and bytes floors as in :mod:`gradtransforms.bench.budgets`.
Writes ``kernels.{md,json}`` into --out (nothing committed is touched
unless --out says so).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gradtransforms.bench import (DEFAULT_OUT, HelpFormatter, budgets, compiled,
                                  out_dir, positive_int)
from gradtransforms.catalogue import CATALOGUE


def _workloads(args) -> list[budgets.Workload]:
  per = args.per_leaf
  out = []
  for dtype in args.dtypes:
    for n in args.leaves:
      out.append(budgets.Workload(n, n * per, dtype=dtype))
    if args.layers:
      out.append(budgets.Workload(6, 6 * args.layers * per, args.layers, dtype))
  return out


def _row(name, w, platform, adam, refs: dict) -> dict:
  m = budgets.method_step(name, w).compile(platform)
  key = budgets.reference_key(name)  # methods sharing a reference: one compile
  if key not in refs:
    refs[key] = budgets.reference_step(name, w).compile(platform)
  r = refs[key]
  floor = budgets.bytes_floor(name, adam.bytes, w, r.bytes)
  return dict(method=name, platform=platform, leaves=w.leaves, layers=w.layers,
              dtype=w.dtype, kernels=m.kernels, ref_kernels=r.kernels,
              reference=budgets.reference_label(name),
              bytes=round(m.bytes / adam.bytes, 3),
              floor=round(floor / adam.bytes, 3),
              loop_bytes=round(m.loop_bytes / adam.bytes, 3),
              compile=round(m.compile_s / max(adam.compile_s, 1e-9), 2),
              over=bool(m.kernels > 1.05 * r.kernels or m.bytes > 1.01 * floor))


def measure(args) -> list[dict]:
  rows = []
  for platform in args.platforms:
    reason = compiled.unavailable(platform)
    if reason:
      print(f"skip {platform}: {reason}")
      continue
    for w in _workloads(args):
      if platform != "h100" and w.leaves > 100:
        continue  # TPU compiles of 1,000 leaves take minutes each
      adam = budgets.adam_step(w).compile(platform)
      refs = {("adam", None): adam}
      for name in args.methods:
        start = time.perf_counter()
        rows.append(_row(name, w, platform, adam, refs))
        print(f"{platform} {w} {name}: {rows[-1]['kernels']}/"
              f"{rows[-1]['ref_kernels']} ({time.perf_counter() - start:.1f}s)",
              flush=True)
  return rows


def to_markdown(rows: list[dict]) -> str:
  lines = ["| chip | workload | dtype | method | kernels (ref) | bytes / Adam "
           "(floor) | compile / Adam |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    wl = (f"{r['leaves']} leaves" if not r["layers"] else
          f"{r['leaves']} x {r['layers']} layers")
    mark = " **over**" if r["over"] else ""
    lines.append(f"| {r['platform']} | {wl} | {r['dtype']} | {r['method']}{mark} "
                 f"| {r['kernels']} ({r['ref_kernels']}) | {r['bytes']:.3f} "
                 f"({r['floor']:.3f}) | {r['compile']:.2f} |")
  return "\n".join(lines) + "\n"


def parser(prog: str | None = None) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                               formatter_class=HelpFormatter)
  ap.add_argument("--platforms", nargs="+", default=["h100", "tpu-v5e"],
                  choices=["h100", "tpu-v5e", "cpu"], help="chips to compile for")
  ap.add_argument("--methods", nargs="+", default=list(CATALOGUE),
                  choices=list(CATALOGUE), metavar="NAME",
                  help="catalogue methods to measure")
  ap.add_argument("--leaves", nargs="+", type=positive_int, default=[100],
                  help="per-leaf workloads (1,000: H100 only)")
  ap.add_argument("--layers", type=int, default=24,
                  help="stacked workload: 6 leaves of this many layers (0: none)")
  ap.add_argument("--per-leaf", type=positive_int, default=255 * 254,
                  help="elements per leaf (per layer slice)")
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                  choices=["float32", "bfloat16"],
                  help="dtype of params, gradients and Adam's moments")
  ap.add_argument("--out", type=out_dir, default=DEFAULT_OUT,
                  help="folder for kernels.md and kernels.json")
  return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  args = parser(prog).parse_args(argv)
  rows = measure(args)
  md = to_markdown(rows)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "kernels.md").write_text(md)
  (out / "kernels.json").write_text(json.dumps(rows, indent=1))
  print(md)
  print(f"wrote {out / 'kernels.md'}, {out / 'kernels.json'}")
  return 0
