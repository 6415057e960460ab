"""Command line: arguments, the run, the results files."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from gradtransforms.bench.lm_stability import report
from gradtransforms.bench.lm_stability.experiment import run_all
from gradtransforms.bench.lm_stability.methods import methods
from gradtransforms.bench.lm_stability.plot import plot, plot_layers
from gradtransforms.bench import HelpFormatter, add_results_args
from gradtransforms.bench.lm_stability.train import FAULTS, Config

QUICK: dict[str, Any] = dict(d_model=32, num_layers=2, num_heads=2, seq_len=32, batch=8,
             steps=60, seeds=1, rates=(1e-2, 1.0), fault_lr=1e-2, chunk=30,
             timing_rounds=3, eval_windows=32)
FULL: dict[str, Any] = dict(d_model=64, num_layers=4, num_heads=4, seq_len=64, batch=8,
            steps=200, seeds=2, rates=(1e-3, 3e-3, 1e-2, 1e-1, 1.0),
            fault_lr=1e-2, chunk=50, timing_rounds=3, eval_windows=128)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
  """The benchmark's options (``gradtransforms bench lm_stability --help``)."""
  import gradtransforms.bench.lm_stability as pkg
  ap = argparse.ArgumentParser(prog=prog, description=pkg.__doc__,
                               formatter_class=HelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="tiny run: 0.03M parameters, 2 rates, 1 seed, 60 steps (under 5 "
                       "minutes on 2 cores); default: the full run (0.22M "
                       "parameters, about 30 minutes)")
  add_results_args(ap, "lm_stability.{md,json,png} and "
                   "lm_stability_layers.png")
  ap.add_argument("--steps", type=int, default=None,
                  help=f"steps per run (default {FULL['steps']}, quick "
                       f"{QUICK['steps']})")
  ap.add_argument("--seeds", type=int, default=None,
                  help=f"seeds per rate (default {FULL['seeds']})")
  ap.add_argument("--rates", type=float, nargs="+", default=None,
                  help=f"learning rates (default {list(FULL['rates'])})")
  ap.add_argument("--fault-lr", type=float, default=None,
                  help=f"rate of the fault runs, one of --rates (default "
                       f"{FULL['fault_lr']})")
  ap.add_argument("--methods", nargs="+", default=None,
                  choices=list(methods(128)), metavar="METHOD",
                  help="methods to run (default: all): " + ", ".join(methods(128)))
  ap.add_argument("--faults", nargs="+", default=None, choices=list(FAULTS),
                  metavar="FAULT", help="fault runs (default: all): "
                  + ", ".join(FAULTS))
  ap.add_argument("--window", type=int, default=None,
                  help="baselines' rolling window (default min(128, steps // 4), "
                       "128 in the stacks; faults go in at steps // 3)")
  return ap


def parse_args(argv=None, prog=None) -> tuple[argparse.Namespace, Config]:
  ap = parser(prog)
  args = ap.parse_args(argv)
  base: dict[str, Any] = dict(QUICK if args.quick else FULL)
  for k in ("steps", "seeds", "fault_lr"):
    if getattr(args, k) is not None:
      base[k] = getattr(args, k)
  if args.rates is not None:
    base["rates"] = tuple(args.rates)
  if base["steps"] < 20:
    ap.error(f"--steps must be >= 20, got {base['steps']}")
  if base["seeds"] < 1:
    ap.error(f"--seeds must be >= 1, got {base['seeds']}")
  if any(not (r > 0 and math.isfinite(r)) for r in base["rates"]):
    ap.error(f"--rates must be positive and finite, got {list(base['rates'])}")
  if base["fault_lr"] not in base["rates"]:
    ap.error(f"--fault-lr {base['fault_lr']} must be one of --rates "
             f"{list(base['rates'])} (its clean run is the fault runs' reference)")
  window = args.window if args.window is not None else min(128, base["steps"] // 4)
  if not 4 <= window <= base["steps"]:
    ap.error(f"--window must be in [4, steps], got {window}")
  base["window"] = window
  base["chunk"] = max(d for d in range(1, min(base["chunk"], base["steps"]) + 1)
                      if base["steps"] % d == 0)
  args.methods = args.methods or list(methods(window))
  if "none" not in args.methods:
    args.methods = ["none"] + args.methods  # the reference of every ratio
  return args, Config(**base)


def main(argv=None, prog=None) -> int:
  args, cfg = parse_args(argv, prog)
  out = Path(args.out)
  if args.replot_from is not None:
    res = json.loads(args.replot_from.read_text())
    rows = [dict(r, by_lr={float(k): v for k, v in r["by_lr"].items()})
            for r in res["summary"]]
    out.mkdir(parents=True, exist_ok=True)
    plot(report.from_json(res), rows, out / "lm_stability.png")
    plot_layers(report.from_json(res), out / "lm_stability_layers.png")
    print(f"wrote {out}/lm_stability.png and lm_stability_layers.png")
    return 0
  t0 = time.perf_counter()
  res = run_all(args, cfg)
  elapsed = time.perf_counter() - t0
  rows = report.summarize(res)
  out.mkdir(parents=True, exist_ok=True)
  (out / "lm_stability.md").write_text(report.markdown(res, rows, elapsed))
  (out / "lm_stability.json").write_text(json.dumps(
      report.to_json(res, rows, elapsed), indent=1, default=float))
  plot(res, rows, out / "lm_stability.png")
  plot_layers(res, out / "lm_stability_layers.png")
  print(report.headline_table(rows))
  print(f"\nwrote {out}/lm_stability.{{md,json,png}} and lm_stability_layers.png "
        f"in {elapsed / 60:.1f} minutes")
  return 0
