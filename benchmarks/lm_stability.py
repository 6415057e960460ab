"""LM stability: gradtransforms against the skip rules of big training stacks.

A byte-level ``TransformerLM`` (blocks stacked on a layer axis) learns the
running interpreter's standard-library sources. Three experiments:

1. Learning-rate sweep (rates x methods x seeds): final held-out bits per
   byte, divergence, spike score (OLMo 2: the share of steps at least 7 std
   from the rolling mean of the previous values; window 1000 in the paper,
   here ``steps // 4``, scaled to the run length), and LR sensitivity
   (Wortsman et al. 2023: mean over rates of ``min(L(lr), L_init) - best``).
2. Faults injected at one fixed step into the healthy run at ``--fault-lr``,
   seed 0: x1000 gradient on one stacked layer, a NaN gradient in one
   layer's slice of one leaf, a batch of a single repeated byte. Per method:
   acted (skipped or clipped) at the fault, steps to get back within 1% of
   the clean run's loss, final loss against the clean run, blamed layer,
   steps skipped afterwards (the NaN-poisoning of rolling histories), and
   whether a NaN reached the parameters or the optimizer state.
3. Step-time overhead of each method (ratio to no clipping, interleaved).

Every training step is a pure ``jax.jit`` function over ``nnx.split`` state;
``--chunk`` steps are fused with ``lax.scan``; each method compiles once
(learning rate, fault and seed are arguments). The base optimizer is Adam
(b1 0.9, b2 0.95, no weight decay) at learning rate 1, whose update is
multiplied by ``lr * schedule(t)`` (10% linear warm-up, cosine to 10%) after
the method: every method acts on gradients or gates the whole update, so
this equals Adam at that rate inside the method, with one compile for all
rates.

    python benchmarks/lm_stability.py --quick            # < 5 min, 2 cores
    python benchmarks/lm_stability.py --out benchmarks/results   # full, <= 30 min
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradtransforms as gt
from gradtransforms.models import TransformerLM
from gradtransforms.models.transformer import param_count
from gradtransforms.demo import tables
from gradtransforms.tasks import corpus as corpus_lib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import skip_rules  # noqa: E402

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
}

FAULTS = ("x1000", "nan", "repeat")
FAULT_CODE = {"clean": 0, "x1000": 1, "nan": 2, "repeat": 3}
REPEATED_BYTE = 0          # NUL: never in the corpus, so the batch is novel
UNIFORM_BITS = 8.0         # bits/byte of a uniform guess: the "no learning" loss
BLOWUP_BITS = 12.0         # a 10-step mean training loss above this: blew up
SPIKE_SIGMA = 7.0          # OLMo 2's spike score threshold


# ----------------------------------------------------------------- methods --

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


# ---------------------------------------------------------------- training --

@dataclasses.dataclass(frozen=True)
class Config:
  d_model: int
  num_layers: int
  num_heads: int
  seq_len: int
  batch: int
  steps: int
  seeds: int
  rates: tuple[float, ...]
  fault_lr: float
  chunk: int
  window: int
  timing_rounds: int
  eval_windows: int


def make_model(cfg: Config, seed: int) -> TransformerLM:
  return TransformerLM(256, cfg.d_model, cfg.num_layers, cfg.num_heads,
                       cfg.seq_len, rngs=nnx.Rngs(seed))


def schedule(t: jax.Array, steps: int) -> jax.Array:
  """10% linear warm-up, then cosine from 1 to 0.1."""
  warm = max(steps // 10, 1)
  frac = jnp.clip((t - warm) / max(steps - warm, 1), 0.0, 1.0)
  cos = 0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  return jnp.where(t < warm, (t + 1) / warm, cos)


def xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def layer_norms(grads: Any) -> jax.Array:
  """Per-layer gradient norm of the stacked blocks: for each leaf under
  ``blocks``, the sum of squares over all but the leading layer axis, summed
  over leaves, square-rooted. Shape (num_layers,)."""
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
        for x in jax.tree.leaves(grads["blocks"])]
  return jnp.sqrt(sum(sq))


def _path(path) -> str:
  """``"blocks/attn/query/kernel"`` (an nnx.State path ends in ``.value``)."""
  return "/".join(str(k.key) for k in path if hasattr(k, "key"))


def inject(grads: Any, kind: jax.Array, now: jax.Array, layer: int) -> Any:
  """At ``now``: x1000 on every gradient of block ``layer`` (its slice of
  each stacked leaf; kind 1), or NaN in block ``layer``'s slice of
  ``blocks/mlp_in/kernel`` (kind 2). Other steps pass unchanged."""
  big = jnp.where(now & (kind == 1), 1000.0, 1.0)
  nan = jnp.where(now & (kind == 2), jnp.nan, 1.0)

  def one(path, x):
    name = _path(path)
    if not name.startswith("blocks/"):
      return x
    factor = big * nan if name == "blocks/mlp_in/kernel" else big
    sel = (jnp.arange(x.shape[0]) == layer).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(sel, x * factor, x)

  return jax.tree_util.tree_map_with_path(one, grads)


class Runner:
  """One method's compiled chunk of training steps, shared by all its runs."""

  def __init__(self, cfg: Config, method: Method, graphdef, train: jax.Array):
    self.cfg, self.method, self.train = cfg, method, train
    self.tx = method.build(base_optimizer())
    tx, steps, layer = self.tx, cfg.steps, cfg.num_layers // 2

    def loss_fn(params, x, y):
      return xent(nnx.merge(graphdef, params)(x), y)

    def step(carry, t, lr, kind, fault_step, data_key, data):
      params, opt_state = carry
      x, y = corpus_lib.sample(data, jax.random.fold_in(data_key, t),
                               cfg.batch, cfg.seq_len)
      now = t == fault_step
      rep = now & (kind == 3)
      x = jnp.where(rep, REPEATED_BYTE, x)
      y = jnp.where(rep, REPEATED_BYTE, y)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      grads = inject(grads, kind, now, layer)
      norm = optax.global_norm(grads)
      updates, opt_state = tx.update(grads, opt_state, params, value=loss)
      rate = lr * schedule(t, steps)
      params = jax.tree.map(lambda p, u: p + rate * u, params, updates)
      figs = {"loss": loss, "norm": norm, "layer_norms": layer_norms(grads),
              "acted": method.acted(opt_state, norm)}
      return (params, opt_state), figs

    def chunk(carry, t0, lr, kind, fault_step, data_key, data):
      ts = t0 + jnp.arange(cfg.chunk)
      return jax.lax.scan(
          lambda c, t: step(c, t, lr, kind, fault_step, data_key, data), carry, ts)

    self._chunk = jax.jit(chunk)

  def init(self, params) -> tuple:
    return (params, self.tx.init(params))

  def run(self, params, lr: float, seed: int, fault: str = "clean",
          fault_step: int = -1, on_chunk: Callable[[], None] | None = None):
    """Trains ``cfg.steps`` steps; returns ``(figures, carry)`` with the
    figures as numpy arrays over steps."""
    carry = self.init(params)
    key = jax.random.PRNGKey(1000 + seed)
    figs = []
    for t0 in range(0, self.cfg.steps, self.cfg.chunk):
      carry, f = self._chunk(carry, jnp.int32(t0), jnp.float32(lr),
                             jnp.int32(FAULT_CODE[fault]), jnp.int32(fault_step),
                             key, self.train)
      figs.append(jax.device_get(f))
      if on_chunk:
        on_chunk()
    out = {k: np.concatenate([f[k] for f in figs]) for k in figs[0]}
    return out, carry

  def time_chunk(self, carry) -> tuple[float, tuple]:
    """Seconds for one chunk of steps (compiled already)."""
    t = time.perf_counter()
    carry, f = self._chunk(carry, jnp.int32(0), jnp.float32(1e-3), jnp.int32(0),
                           jnp.int32(-1), jax.random.PRNGKey(0), self.train)
    jax.block_until_ready(f)
    return time.perf_counter() - t, carry


# ---------------------------------------------------------------- analysis --

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


# --------------------------------------------------------------------- CLI --

QUICK = dict(d_model=32, num_layers=2, num_heads=2, seq_len=32, batch=8,
             steps=60, seeds=1, rates=(1e-2, 1.0), fault_lr=1e-2, chunk=30,
             timing_rounds=3, eval_windows=32)
FULL = dict(d_model=64, num_layers=4, num_heads=4, seq_len=64, batch=8,
            steps=200, seeds=2, rates=(1e-3, 3e-3, 1e-2, 1e-1, 1.0),
            fault_lr=1e-2, chunk=50, timing_rounds=3, eval_windows=128)


def parse_args(argv=None) -> tuple[argparse.Namespace, Config]:
  ap = argparse.ArgumentParser(
      description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="tiny run: 0.03M parameters, 2 rates, 1 seed, 60 steps (under 5 "
                       "minutes on 2 cores); default: the full run (0.22M "
                       "parameters, about 30 minutes)")
  ap.add_argument("--out", default=None,
                  help="output folder (default: a new folder "
                       "lm_stability_<date>_<time> in the current directory; "
                       "never benchmarks/results unless named)")
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
  ap.add_argument("--window", type=int, default=None,
                  help="baselines' rolling window (default min(128, steps // 4), "
                       "128 in the stacks; faults go in at steps // 3)")
  args = ap.parse_args(argv)
  base = dict(QUICK if args.quick else FULL)
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
  if args.out is None:
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    args.out = f"lm_stability_{stamp}"
  args.methods = args.methods or list(methods(window))
  if "none" not in args.methods:
    args.methods = ["none"] + args.methods  # the reference of every ratio
  return args, Config(**base)


class Progress:
  """A rich progress bar on a terminal, plain lines otherwise."""

  def __init__(self, total: int):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()
    self.tty = sys.stdout.isatty()
    self.desc = ""
    if self.tty:
      from rich.progress import (BarColumn, MofNCompleteColumn, Progress as P,
                                 TextColumn, TimeElapsedColumn)
      self.bar = P(TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn())
      self.task = self.bar.add_task("", total=total)
      self.bar.start()

  def describe(self, desc: str) -> None:
    self.desc = desc
    if self.tty:
      self.bar.update(self.task, description=desc)

  def advance(self, n: int = 1) -> None:
    self.done += n
    if self.tty:
      self.bar.advance(self.task, n)

  def line(self, msg: str) -> None:
    if self.tty:
      self.bar.console.print(msg)
    else:
      print(f"[{time.perf_counter() - self.t0:6.0f}s {self.done}/{self.total}] "
            f"{msg}", flush=True)

  def close(self) -> None:
    if self.tty:
      self.bar.stop()


# -------------------------------------------------------------- experiment --

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


def run_all(args, cfg: Config, prog_cb=None) -> dict:
  corpus = corpus_lib.load()
  train = jnp.asarray(corpus.train)
  ev_in, ev_tg = corpus_lib.eval_windows(corpus.held_out, cfg.eval_windows,
                                         cfg.seq_len)
  graphdef, _ = nnx.split(make_model(cfg, 0), nnx.Param)
  evaluate = evaluate_fn(graphdef, jnp.asarray(ev_in), jnp.asarray(ev_tg))
  init_params = {s: nnx.split(make_model(cfg, s), nnx.Param)[1]
                 for s in range(cfg.seeds)}
  n_params = param_count(make_model(cfg, 0))
  ms = methods(cfg.window)
  names = args.methods
  chunks = cfg.steps // cfg.chunk
  total = len(names) * (len(cfg.rates) * cfg.seeds + len(FAULTS)) * chunks
  prog = Progress(total)
  fault_step, fault_layer = cfg.steps // 3, cfg.num_layers // 2
  sweep, faults, layer_curves, curves = [], [], {}, {}
  runners, carries = {}, {}
  try:
    for name in names:
      t_compile = time.perf_counter()
      runner = runners[name] = Runner(cfg, ms[name], graphdef, train)
      clean = {}
      for lr in cfg.rates:
        for seed in range(cfg.seeds):
          prog.describe(f"{name} lr={lr:g} seed={seed}")
          f, carry = runner.run(init_params[seed], lr, seed,
                                on_chunk=prog.advance)
          if t_compile is not None:
            prog.line(f"{name}: first run (incl. compile) "
                      f"{time.perf_counter() - t_compile:.1f}s")
            t_compile = None
          final = evaluate(carry[0])
          row = {"method": name, "lr": lr, "seed": seed, "final_bpb": final,
                 "diverged": diverged(f["loss"], final),
                 "max_train_bpb": float(np.nanmax(smooth(f["loss"])) / np.log(2)),
                 "spike_score": spike_score(f["loss"], cfg.steps // 4),
                 "norm_spike_score": spike_score(f["norm"], cfg.steps // 4),
                 "acted": int(f["acted"].sum())}
          sweep.append(row)
          curves[(name, lr, seed)] = f["loss"]
          if seed == 0 and lr == cfg.fault_lr:
            clean = {"loss": f["loss"], "final": final, "acted": f["acted"],
                     "layer_norms": f["layer_norms"]}
            carries[name] = carry
      for fault in FAULTS:
        prog.describe(f"{name} fault={fault}")
        f, carry = runner.run(init_params[0], cfg.fault_lr, 0, fault, fault_step,
                              on_chunk=prog.advance)
        final = evaluate(carry[0])
        rec = recovery_steps(f["loss"], clean["loss"], fault_step)
        ln = f["layer_norms"]
        growth = ln[fault_step] / np.maximum(ln[fault_step - 1], 1e-30)
        growth = np.where(np.isfinite(growth), growth, np.inf)
        blamed = None
        if name.startswith("gt.guard"):
          c = gt.culprits(carry[1], carry[0])
          at = c.get(KEYS["guard_culprit_step"], -1)
          if at >= 0:
            blamed = c.get(KEYS["guard_culprit"]) + (
                "" if at == fault_step else f" (at step {at})")
        after = slice(fault_step + 1, cfg.steps)
        faults.append({
            "method": name, "fault": fault,
            "acted_at_fault": bool(f["acted"][fault_step]),
            "loss_at_fault": float(f["loss"][fault_step]),
            "recovery_steps": rec, "final_bpb": final,
            "clean_final_bpb": clean["final"],
            "delta_bpb": final - clean["final"],
            "skipped_after": int(f["acted"][after].sum()),
            "clean_skipped_after": int(clean["acted"][after].sum()),
            "params_finite": tree_finite(carry[0]),
            "state_finite": tree_finite(carry[1]),
            "blamed_by_method": blamed,
            "layer_by_per_layer_norms": int(np.argmax(growth)),
            "injected_layer": fault_layer if fault != "repeat" else None,
        })
        if fault == "x1000":
          layer_curves[name] = {"fault": ln, "clean": clean["layer_norms"]}
      prog.line(f"{name}: done")
    timing = time_methods(runners, carries, cfg.timing_rounds, prog)
  finally:
    prog.close()
  return {"env": environment(corpus, cfg, n_params), "sweep": sweep,
          "faults": faults, "timing": timing, "fault_step": fault_step,
          "fault_layer": fault_layer, "_curves": curves,
          "_layer_curves": layer_curves}


def time_methods(runners: dict, carries: dict, rounds: int, prog) -> dict:
  """Seconds per step of each method, interleaved: in each round every method
  runs one chunk; the ratio to ``none`` is taken per round, then the median."""
  prog.describe("timing")
  secs = {n: [] for n in runners}
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


# ----------------------------------------------------------------- reports --

def summarize(res: dict) -> list[dict]:
  """Per method: mean/min/max final bits per byte at each rate over seeds,
  diverged runs, spike scores, LR sensitivity per seed."""
  cfg = res["env"]["config"]
  rows = []
  for name in dict.fromkeys(r["method"] for r in res["sweep"]):
    runs = [r for r in res["sweep"] if r["method"] == name]
    by_lr = {}
    for lr in cfg["rates"]:
      v = [r["final_bpb"] for r in runs if r["lr"] == lr]
      by_lr[lr] = {"mean": float(np.mean(v)), "min": float(np.min(v)),
                   "max": float(np.max(v)),
                   "diverged": sum(r["diverged"] for r in runs if r["lr"] == lr)}
    sens = [lr_sensitivity([r["final_bpb"] for r in runs if r["seed"] == s])
            for s in range(cfg["seeds"])]
    stable = [lr for lr in cfg["rates"] if by_lr[lr]["diverged"] == 0]
    best_lr = min(cfg["rates"], key=lambda lr: by_lr[lr]["mean"]
                  if np.isfinite(by_lr[lr]["mean"]) else np.inf)
    rows.append({
        "method": name, "by_lr": by_lr, "best_lr": best_lr,
        "best_bpb": by_lr[best_lr]["mean"],
        "best_spread": (by_lr[best_lr]["max"] - by_lr[best_lr]["min"]
                        if cfg["seeds"] > 1 else None),
        "diverged": sum(r["diverged"] for r in runs), "runs": len(runs),
        "largest_stable_lr": max(stable) if stable else None,
        "spike_score": float(np.mean([r["spike_score"] for r in runs])),
        "norm_spike_score": float(np.mean([r["norm_spike_score"] for r in runs])),
        "lr_sensitivity": float(np.mean(sens)), "lr_sensitivity_seeds": sens,
        "overhead": res["timing"].get(name, {}).get("ratio"),
        "acted_per_run": float(np.mean([r["acted"] for r in runs])),
    })
  return rows


def _f(x, spec=".3f"):
  if x is None:
    return "-"
  if isinstance(x, float) and not np.isfinite(x):
    return "NaN"
  return format(x, spec)


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
  """The project's markdown table (``gradtransforms.demo.tables``), cells
  already formatted here."""
  return tables.markdown(header, rows, align=align).rstrip("\n")


def headline_table(rows: list[dict]) -> str:
  return _table(
      ["method", "best LR", "held-out bits/byte at best LR (seed spread)",
       "diverged runs", "LR sensitivity", "spike score (loss / norm)",
       "steps clipped or skipped per run", "step time vs none"],
      [[r["method"], f"{r['best_lr']:g}",
        f"{_f(r['best_bpb'])} "
        f"(±{_f(r['best_spread'] and r['best_spread'] / 2, '.3f')})",
        f"{r['diverged']}/{r['runs']}", _f(r["lr_sensitivity"]),
        f"{_f(r['spike_score'], '.1%')} / {_f(r['norm_spike_score'], '.1%')}",
        f"{r['acted_per_run']:.1f}", f"{_f(r['overhead'], '.2f')}x"]
       for r in rows], "lrrrrrrr")


def sweep_table(rows: list[dict], rates) -> str:
  def cell(c):
    s = f"{_f(c['mean'])} ({_f(c['min'], '.2f')}-{_f(c['max'], '.2f')})"
    return s + (f" **{c['diverged']} div**" if c["diverged"] else "")
  return _table(["method", *(f"lr {lr:g}" for lr in rates)],
                [[r["method"], *(cell(r["by_lr"][lr]) for lr in rates)]
                 for r in rows], "l" + "r" * len(rates))


def fault_table(faults: list[dict]) -> str:
  yes = lambda bad: "**yes**" if bad else "no"
  return _table(
      ["method", "fault", "acted at fault", "loss at fault (nats)",
       "recovery (steps)", "final bits/byte (clean)",
       "skipped after (clean run)", "NaN in params / state",
       "blamed by the method", "layer by per-layer norms"],
      [[f["method"], f["fault"], "yes" if f["acted_at_fault"] else "no",
        _f(f["loss_at_fault"], ".2f"),
        "never" if f["recovery_steps"] is None else str(f["recovery_steps"]),
        f"{_f(f['final_bpb'])} ({_f(f['clean_final_bpb'])})",
        f"{f['skipped_after']} ({f['clean_skipped_after']})",
        f"{yes(not f['params_finite'])} / {yes(not f['state_finite'])}",
        f["blamed_by_method"] or "-", str(f["layer_by_per_layer_norms"])]
       for f in faults], "lllrrrrllr")


def timing_table(timing: dict) -> str:
  return _table(
      ["method", "ms/step", "ratio to none (min-max over rounds)"],
      [[n, f"{t['ms_per_step']:.1f}",
        f"{t['ratio']:.2f} ({t['ratio_min']:.2f}-{t['ratio_max']:.2f})"]
       for n, t in timing.items()], "lrr")


def markdown(res: dict, rows: list[dict], elapsed: float) -> str:
  env, cfg = res["env"], res["env"]["config"]
  c = env["corpus"]
  lines = [
      "# LM stability benchmark", "",
      f"{env['date']}, {env['machine']}, {env['cpus']} CPUs, backend "
      f"{env['backend']}; Python {env['python']}, jax {env['jax']}, optax "
      f"{env['optax']}, flax {env['flax']}; {elapsed / 60:.1f} minutes.", "",
      f"Corpus: Python {c['python']} standard library, {c['files']} `.py` files, "
      f"{c['bytes']:,} bytes ({c['train_bytes']:,} train, {c['held_out_bytes']:,} "
      f"held out, the last 10% in sorted path order).", "",
      f"Model: `TransformerLM`, d={cfg['d_model']}, {cfg['num_layers']} stacked "
      f"layers, {cfg['num_heads']} heads, {env['params']:,} parameters, tied "
      f"embeddings; batch {cfg['batch']} x {cfg['seq_len']} bytes, "
      f"{cfg['steps']} steps, Adam (0.9, 0.95), 10% warm-up then cosine to 10%; "
      f"{cfg['seeds']} seeds. Held-out bits/byte on {cfg['eval_windows']} fixed "
      f"windows. Baselines' rolling window {cfg['window']} (128 in the stacks, "
      f"scaled to the run length), 6 sigma. Spike score window "
      f"{cfg['steps'] // 4} steps (1000 in OLMo 2, scaled to the run length).",
      "", "## Headline", "", headline_table(rows), "",
      "Best LR: the rate with the lowest mean final held-out bits/byte. "
      f"Diverged: a non-finite loss, a 10-step mean training loss above "
      f"{BLOWUP_BITS:g} bits/byte, or a final held-out loss above {UNIFORM_BITS:g} "
      "(a uniform guess). LR "
      "sensitivity (Wortsman et al. 2023): mean over rates of "
      "`min(L(lr), 8) - min_lr L`, per seed, then the mean. Spike score: share "
      "of steps >= 7 std from the rolling mean (training loss / raw gradient "
      "norm), over all runs. Step time: median ratio to `none`, interleaved.",
      "", "## Learning-rate sweep", "",
      "Final held-out bits/byte, mean over seeds (min-max).", "",
      sweep_table(rows, cfg["rates"]), "",
      "## Faults", "",
      f"Injected at step {res['fault_step']} of {cfg['steps']} into the run at "
      f"LR {cfg['fault_lr']:g}, seed 0 (its clean run is the reference: same "
      f"data): `x1000` multiplies every gradient of layer {res['fault_layer']} "
      f"(its slice of each stacked leaf) by 1000; `nan` makes layer {res['fault_layer']}'s slice of "
      f"`blocks/mlp_in/kernel`'s gradient NaN; `repeat` replaces the batch by "
      f"byte {REPEATED_BYTE} repeated. Recovery: steps until the 10-step "
      "trailing mean of the training loss is within 1% of the clean run's and "
      "stays there; skipped after: steps the method skipped or clipped after "
      "the fault (in the clean run over the same steps). Blamed by the method: "
      "the layer slice `gt.culprits` names for gt.guard (run with "
      "`layer_axes=0` on the stacked blocks); layer by per-layer norms: the "
      "layer whose gradient norm grew most at the fault step, from the "
      "benchmark's own per-layer record.",
      "", fault_table(res["faults"]), "",
      "## Step-time overhead", "", timing_table(res["timing"]), "",
      "## Baselines restated", "",
      *[f"- `{k}`: {v}" for k, v in skip_rules.SOURCES.items()], "",
  ]
  return "\n".join(lines)


def _style(name: str) -> str:
  """Solid lines for gradtransforms (and none), dashed for the baselines."""
  return "-" if name == "none" or name.startswith("gt.") else "--"


def plot(res: dict, rows: list[dict], out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cfg = res["env"]["config"]
  names = [r["method"] for r in rows]
  colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
  fig, axes = plt.subplots(1, 3, figsize=(19, 6))
  ax = axes[0]
  for r, c in zip(rows, colors):
    lrs = cfg["rates"]
    m = [r["by_lr"][lr]["mean"] for lr in lrs]
    lo = [r["by_lr"][lr]["min"] for lr in lrs]
    hi = [r["by_lr"][lr]["max"] for lr in lrs]
    top = UNIFORM_BITS + 0.5
    clip = lambda v: [min(x, top) if np.isfinite(x) else top for x in v]
    ax.plot(lrs, clip(m), "o" + _style(r["method"]), color=c, label=r["method"],
            lw=1.2, ms=4)
    ax.fill_between(lrs, clip(lo), clip(hi), color=c, alpha=0.12)
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final held-out bits/byte (mean, min-max over seeds)")
  ax.set_title(f"final loss vs learning rate (above {UNIFORM_BITS:g}, the "
               f"uniform guess: drawn at {UNIFORM_BITS + 0.5:g})", fontsize=10)
  ax.legend(fontsize=7)
  ax = axes[1]
  for r, c in zip(rows, colors):
    lr = r["largest_stable_lr"]
    if lr is None:
      continue
    loss = res["_curves"][(r["method"], lr, 0)] / np.log(2.0)
    ax.plot(smooth(loss), _style(r["method"]), color=c, lw=1,
            label=f"{r['method']} (lr {lr:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("training bits/byte (10-step mean), seed 0")
  ax.set_title("training loss at each method's largest stable LR", fontsize=10)
  ax.set_ylim(top=UNIFORM_BITS + 0.5)
  ax.legend(fontsize=7)
  ax = axes[2]
  faults = res["faults"]
  grid = np.array([[next((f["delta_bpb"] for f in faults if f["method"] == n
                          and f["fault"] == k), np.nan) for k in FAULTS]
                   for n in names])
  shown = np.where(np.isfinite(grid), grid, np.nan)
  lim = np.nanmax(np.abs(shown)) if np.isfinite(shown).any() else 1.0
  ax.imshow(shown, cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
  for i in range(len(names)):
    for j in range(len(FAULTS)):
      v = grid[i, j]
      ax.text(j, i, "NaN" if not np.isfinite(v) else f"{v:+.3f}", ha="center",
              va="center", fontsize=8)
  ax.set_xticks(range(len(FAULTS)), FAULTS)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_title("fault runs: final bits/byte minus clean run")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def plot_layers(res: dict, out: Path, method: str = "none") -> None:
  """Gradient norm per stacked layer over steps, x1000 fault run (issue 15)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = res["_layer_curves"].get(method)
  if curves is None:
    return
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
  for ax, key in zip(axes, ("clean", "fault")):
    ln = curves[key]
    for layer in range(ln.shape[1]):
      ax.plot(ln[:, layer], lw=1, label=f"layer {layer}" + (
          " (injected)" if key == "fault" and layer == res["fault_layer"] else ""))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{method}: {'clean run' if key == 'clean' else 'x1000 on layer '}"
                 + ("" if key == "clean" else f"{res['fault_layer']} at step "
                    f"{res['fault_step']}"))
    ax.legend(fontsize=8)
  axes[0].set_ylabel("gradient norm of the stacked blocks, per layer")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def to_json(res: dict, rows: list[dict], elapsed: float) -> dict:
  out = {k: v for k, v in res.items() if not k.startswith("_")}
  out["elapsed_s"] = elapsed
  out["summary"] = [dict(r, by_lr={str(k): v for k, v in r["by_lr"].items()})
                    for r in rows]
  return out


def main(argv=None) -> int:
  args, cfg = parse_args(argv)
  out = Path(args.out)
  t0 = time.perf_counter()
  res = run_all(args, cfg)
  elapsed = time.perf_counter() - t0
  rows = summarize(res)
  out.mkdir(parents=True, exist_ok=True)
  (out / "lm_stability.md").write_text(markdown(res, rows, elapsed))
  (out / "lm_stability.json").write_text(json.dumps(
      to_json(res, rows, elapsed), indent=1, default=float))
  plot(res, rows, out / "lm_stability.png")
  plot_layers(res, out / "lm_stability_layers.png")
  print(headline_table(rows))
  print(f"\nwrote {out}/lm_stability.{{md,json,png}} and lm_stability_layers.png "
        f"in {elapsed / 60:.1f} minutes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
