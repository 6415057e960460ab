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

from gradtransforms.bench.lm_stability.cli import main, parser

__all__ = ["main", "parser"]
