"""Flax NNX reference models: deep MLP, Elman RNN, LSTM, GRU."""

from gradtransforms.models.mlp import DeepMLP
from gradtransforms.models.rnn import GRU, LSTM, ElmanRNN

__all__ = ["DeepMLP", "ElmanRNN", "GRU", "LSTM"]
