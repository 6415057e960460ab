"""Flax NNX reference models: deep MLP, Elman RNN, LSTM, GRU, transformer LM."""

from gradtransforms._extras import require

require("models", "flax", what="gradtransforms.models")

from gradtransforms.models.mlp import DeepMLP  # noqa: E402
from gradtransforms.models.rnn import GRU, LSTM, ElmanRNN  # noqa: E402
from gradtransforms.models.transformer import TransformerLM  # noqa: E402

__all__ = ["DeepMLP", "ElmanRNN", "GRU", "LSTM", "TransformerLM"]
