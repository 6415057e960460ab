"""A byte-level decoder-only transformer with its blocks stacked on a layer axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gradtransforms import _checks


class Block(nnx.Module):
  """One pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    # keep_rngs=False: no dropout, so the stacked state holds no RNG keys.
    self.attn = nnx.MultiHeadAttention(
        num_heads, d_model, kernel_init=init, decode=False, keep_rngs=False,
        rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, kernel_init=init,
                             rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, kernel_init=init,
                              rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only LM: pre-LN, causal self-attention, learned positions.

  The ``num_layers`` blocks are one module whose every weight has a leading
  layer axis (made with ``nnx.vmap`` over split RNG keys, applied with
  ``nnx.scan``), the layout MaxText and Levanter use: a per-leaf figure of
  ``blocks`` covers all layers at once, and per-layer figures are reductions
  over all but axis 0. ``unroll`` (default: all layers) unrolls the scan,
  which on CPU ran 20-35% faster than a rolled loop with identical results;
  the parameters stay stacked either way.

  Args:
    vocab_size: tokens (256 for bytes).
    d_model: width, divisible by ``num_heads``.
    num_layers: stacked blocks, >= 1.
    num_heads: attention heads.
    max_len: longest sequence (the position table's size).
    mlp_ratio: MLP hidden width over ``d_model`` (default 4).
    tie_embeddings: read logits out with the token embedding (default) or
      with a separate, untied ``head``.
    unroll: scan unroll factor; None: ``num_layers`` (fully unrolled).
    rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``).
  """

  def __init__(self, vocab_size: int = 256, d_model: int = 128,
               num_layers: int = 4, num_heads: int = 4, max_len: int = 128,
               mlp_ratio: int = 4, tie_embeddings: bool = True, *,
               unroll: int | None = None, rngs: nnx.Rngs | None = None):
    vocab_size = _checks.integer("vocab_size", vocab_size, minimum=1)
    d_model = _checks.integer("d_model", d_model, minimum=1)
    num_layers = _checks.integer("num_layers", num_layers, minimum=1)
    num_heads = _checks.integer("num_heads", num_heads, minimum=1)
    self.max_len = _checks.integer("max_len", max_len, minimum=1)
    mlp_ratio = _checks.integer("mlp_ratio", mlp_ratio, minimum=1)
    if d_model % num_heads:
      raise ValueError(f"d_model ({d_model}) must be divisible by num_heads "
                       f"({num_heads})")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.num_layers = num_layers
    self.unroll = num_layers if unroll is None else _checks.integer(
        "unroll", unroll, minimum=1)
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=init, rngs=rngs)
    self.pos = nnx.Param(init(rngs.params(), (self.max_len, d_model)))

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_blocks(r: nnx.Rngs) -> Block:
      return Block(d_model, num_heads, mlp_ratio, rngs=r)

    self.blocks = make_blocks(rngs)
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = None if tie_embeddings else nnx.Linear(
        d_model, vocab_size, use_bias=False, kernel_init=init, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``tokens`` (batch, T) integers, T <= max_len -> logits (batch, T, vocab)."""
    T = tokens.shape[-1]
    if T > self.max_len:
      raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
    x = self.embed(tokens) + self.pos[...][:T]
    mask = nnx.make_causal_mask(tokens)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, unroll=self.unroll)
    def through(block: Block, h: jax.Array) -> jax.Array:
      return block(h, mask)

    x = self.ln_f(through(self.blocks, x))
    return self.embed.attend(x) if self.head is None else self.head(x)


def param_count(model: nnx.Module) -> int:
  """Number of scalar parameters (``nnx.Param`` entries) of ``model``."""
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param)))
