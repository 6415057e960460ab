"""Flax NNX reference models: deep MLP, Elman RNN, LSTM, GRU, transformer LM."""

from gradtransforms.models.mlp import DeepMLP
from gradtransforms.models.rnn import GRU, LSTM, ElmanRNN
from gradtransforms.models.transformer import TransformerLM

__all__ = ["DeepMLP", "ElmanRNN", "GRU", "LSTM", "TransformerLM"]
