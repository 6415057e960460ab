"""Reports: the summary rows, markdown tables and the results JSON."""

from __future__ import annotations

import numpy as np

from gradtransforms.bench.lm_stability import skip_rules
from gradtransforms.bench.lm_stability.analysis import (
    BLOWUP_BITS, UNIFORM_BITS, lr_sensitivity)
from gradtransforms.bench.lm_stability.train import (
    BURST_STEPS, LR_BUG_FACTOR, LR_BUG_STEPS, REPEATED_BYTE)
from gradtransforms.demo import tables

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
  lost = lambda f: (f"{f.get('steps_lost', f['skipped_after'])} "
                    f"({f.get('steps_undone', 0)} undone, "
                    f"{f.get('rewinds', 0)} rewinds"
                    + (", halted" if f.get("halted") else "") + ")")
  return _table(
      ["method", "fault", "acted at fault", "loss at fault (nats)",
       "recovery (steps)", "final bits/byte (clean)", "vs clean",
       "steps lost = data skipped", "skipped after (clean run)",
       "NaN in params / state", "blamed by the method",
       "layer by per-layer norms"],
      [[f["method"], f["fault"], "yes" if f["acted_at_fault"] else "no",
        _f(f["loss_at_fault"], ".2f"),
        "never" if f["recovery_steps"] is None else str(f["recovery_steps"]),
        f"{_f(f['final_bpb'])} ({_f(f['clean_final_bpb'])})",
        _f(f["delta_bpb"], "+.3f"), lost(f),
        f"{f['skipped_after']} ({f['clean_skipped_after']})",
        f"{yes(not f['params_finite'])} / {yes(not f['state_finite'])}",
        f["blamed_by_method"] or "-", str(f["layer_by_per_layer_norms"])]
       for f in faults], "lllrrrrrrllr")


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
      f"byte {REPEATED_BYTE} repeated; `burst30`: {BURST_STEPS} such batches in a "
      f"row; `lr_x50`: the learning rate x{LR_BUG_FACTOR:g} for {LR_BUG_STEPS} "
      "steps (a schedule bug). Steps lost: updates not in the final params "
      "(skipped, or undone by a rewind); the loop carries on with the next "
      "batch, so as many batches are skipped. Recovery: steps until the 10-step "
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


def to_json(res: dict, rows: list[dict], elapsed: float) -> dict:
  """The results JSON, with the curves the plots need (so ``--replot-from``
  redraws them)."""
  out = {k: v for k, v in res.items() if not k.startswith("_")}
  out["elapsed_s"] = elapsed
  out["summary"] = [dict(r, by_lr={str(k): v for k, v in r["by_lr"].items()})
                    for r in rows]
  out["curves"] = [{"method": m, "lr": lr, "seed": s,
                    "loss": [float(x) for x in v]}
                   for (m, lr, s), v in res["_curves"].items()]
  out["layer_curves"] = {m: {k: np.asarray(v).tolist() for k, v in c.items()}
                         for m, c in res["_layer_curves"].items()}
  return out


def from_json(data: dict) -> dict:
  """``res`` for the plots, from a results JSON written by :func:`to_json`."""
  res = dict(data)
  res["_curves"] = {(c["method"], c["lr"], c["seed"]): np.asarray(c["loss"])
                    for c in data.get("curves", [])}
  res["_layer_curves"] = {m: {k: np.asarray(v) for k, v in c.items()}
                          for m, c in data.get("layer_curves", {}).items()}
  return res
