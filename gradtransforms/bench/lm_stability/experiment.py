"""The experiment: sweep, fault runs and timing for every method."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradtransforms as gt
from gradtransforms.bench.lm_stability import skip_rules
from gradtransforms.bench.lm_stability.analysis import (
    diverged, recovery_steps, smooth, spike_score, tree_finite)
from gradtransforms.bench.lm_stability.methods import KEYS, methods
from gradtransforms.bench.lm_stability.train import (
    FAULTS, Config, Runner, make_model, xent)
from gradtransforms.demo.progress import Steps
from gradtransforms.models.transformer import param_count
from gradtransforms.tasks import corpus as corpus_lib

def environment(corpus: corpus_lib.Corpus, cfg: Config, n_params: int) -> dict:
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "cpus": os.cpu_count(), "platform": platform.platform(),
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "python": platform.python_version(), "jax": jax.__version__,
      "optax": optax.__version__, "flax": __import__("flax").__version__,
      "gradtransforms": gt.__version__, "corpus": corpus.describe(),
      "params": n_params, "config": dataclasses.asdict(cfg),
      "baseline_sources": skip_rules.SOURCES,
  }


def evaluate_fn(graphdef, inputs, targets):
  """Held-out bits per byte of ``params`` on fixed windows (jitted once)."""
  @jax.jit
  def ev(params):
    return xent(nnx.merge(graphdef, params)(inputs), targets) / jnp.log(2.0)
  return lambda params: float(ev(params))


def _sweep_row(name, lr, seed, f, final, cfg) -> dict:
  return {"method": name, "lr": lr, "seed": seed, "final_bpb": final,
          "diverged": diverged(f["loss"], final),
          "max_train_bpb": float(np.nanmax(smooth(f["loss"])) / np.log(2)),
          "spike_score": spike_score(f["loss"], cfg.steps // 4),
          "norm_spike_score": spike_score(f["norm"], cfg.steps // 4),
          "acted": int(f["acted"].sum())}


def _blamed(name: str, carry, fault_step: int) -> str | None:
  if "gt.guard" not in name:
    return None
  c = gt.culprits(carry[1], carry[0])
  at = c.get(KEYS["guard_culprit_step"], -1)
  if at < 0:
    return None
  return str(c.get(KEYS["guard_culprit"])) + (
      "" if at == fault_step else f" (at step {at})")


def fault_record(name, fault, f, carry, final, clean, fault_step,
                 fault_layer, steps) -> dict:
  """One fault run against its clean run: what the method did, what it
  cost (steps lost: skipped, or undone by a rewind; the data of those steps
  is skipped, as the loop carries on with the next batches), the outcome."""
  rec = recovery_steps(f["loss"], clean["loss"], fault_step)
  ln = f["layer_norms"]
  growth = ln[fault_step] / np.maximum(ln[fault_step - 1], 1e-30)
  growth = np.where(np.isfinite(growth), growth, np.inf)
  after = slice(fault_step + 1, steps)
  skipped = int(f["skipped"].sum())
  undone = int(f["lost"][-1])
  return {
      "method": name, "fault": fault,
      "acted_at_fault": bool(f["acted"][fault_step]),
      "loss_at_fault": float(f["loss"][fault_step]),
      "recovery_steps": rec, "final_bpb": final,
      "clean_final_bpb": clean["final"],
      "delta_bpb": final - clean["final"],
      "skipped_after": int(f["acted"][after].sum()),
      "clean_skipped_after": int(clean["acted"][after].sum()),
      "steps_skipped": skipped, "steps_undone": undone,
      "rewinds": int(f["rewinds"][-1]), "steps_lost": skipped + undone,
      "clean_steps_lost": int(clean["skipped"].sum() + clean["lost"][-1]),
      "halted": bool(f["halt"][-1]),
      "params_finite": tree_finite(carry[0]),
      "state_finite": tree_finite(carry[1]),
      "blamed_by_method": _blamed(name, carry, fault_step),
      "layer_by_per_layer_norms": int(np.argmax(growth)),
      "injected_layer": fault_layer if fault in ("x1000", "nan", "x1000_small")
      else None,
  }


def _context(cfg: Config) -> dict:
  corpus = corpus_lib.load()
  ev_in, ev_tg = corpus_lib.eval_windows(corpus.held_out, cfg.eval_windows,
                                         cfg.seq_len)
  graphdef, _ = nnx.split(make_model(cfg, 0), nnx.Param)
  return {"corpus": corpus, "train": jnp.asarray(corpus.train),
          "graphdef": graphdef,
          "evaluate": evaluate_fn(graphdef, jnp.asarray(ev_in),
                                  jnp.asarray(ev_tg)),
          "init": {s: nnx.split(make_model(cfg, s), nnx.Param)[1]
                   for s in range(cfg.seeds)},
          "n_params": param_count(make_model(cfg, 0))}


def run_all(args, cfg: Config, prog_cb=None) -> dict:
  ctx = _context(cfg)
  ms = methods(cfg.window)
  names, faults_run = args.methods, getattr(args, "faults", None) or FAULTS
  total = len(names) * (len(cfg.rates) * cfg.seeds + len(faults_run))
  fault_step, fault_layer = cfg.steps // 3, cfg.num_layers // 2
  sweep, faults, layer_curves, curves = [], [], {}, {}
  runners, carries = {}, {}
  with Steps(total, "runs") as prog:
    for name in names:
      t_compile: float | None = time.perf_counter()
      runner = runners[name] = Runner(cfg, ms[name], ctx["graphdef"],
                                      ctx["train"])
      clean = {}
      for lr in cfg.rates:
        for seed in range(cfg.seeds):
          prog.start(f"{name} lr={lr:g} seed={seed}")
          f, carry = runner.run(ctx["init"][seed], lr, seed)
          if t_compile is not None:
            print(f"{name}: first run (incl. compile) "
                  f"{time.perf_counter() - t_compile:.1f}s")
            t_compile = None
          final = ctx["evaluate"](carry[0])
          sweep.append(_sweep_row(name, lr, seed, f, final, cfg))
          curves[(name, lr, seed)] = f["loss"]
          if seed == 0 and lr == cfg.fault_lr:
            clean = dict(f, final=final)
            carries[name] = carry
          prog.done()
      for fault in faults_run:
        prog.start(f"{name} fault={fault}")
        f, carry = runner.run(ctx["init"][0], cfg.fault_lr, 0, fault, fault_step)
        final = ctx["evaluate"](carry[0])
        faults.append(fault_record(name, fault, f, carry, final, clean,
                                   fault_step, fault_layer, cfg.steps))
        if fault == "x1000":
          layer_curves[name] = {"fault": f["layer_norms"],
                                "clean": clean["layer_norms"]}
        prog.done()
      print(f"{name}: done")
    timing = time_methods(runners, carries, cfg.timing_rounds, prog)
  return {"env": environment(ctx["corpus"], cfg, ctx["n_params"]),
          "sweep": sweep, "faults": faults, "timing": timing,
          "fault_step": fault_step, "fault_layer": fault_layer,
          "_curves": curves, "_layer_curves": layer_curves}


def time_methods(runners: dict, carries: dict, rounds: int, prog) -> dict:
  """Seconds per step of each method, interleaved: in each round every method
  runs one chunk; the ratio to ``none`` is taken per round, then the median."""
  prog.start("timing")
  secs: dict[str, list[float]] = {n: [] for n in runners}
  for _ in range(rounds):
    for n, r in runners.items():
      dt, carries[n] = r.time_chunk(carries[n])
      secs[n].append(dt / r.cfg.chunk)
  base = np.array(secs["none"])
  return {n: {"ms_per_step": 1e3 * float(np.median(s)),
              "ratio": float(np.median(np.array(s) / base)),
              "ratio_min": float(np.min(np.array(s) / base)),
              "ratio_max": float(np.max(np.array(s) / base))}
          for n, s in secs.items()}
