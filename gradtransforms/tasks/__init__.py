"""Synthetic tasks whose gradients really explode, and a pure training loop."""

from gradtransforms.tasks.synthetic import (Task, addition, corrupted,
                                            deep_regression, temporal_order)
from gradtransforms.tasks.training import make_train_step, train

__all__ = ["Task", "addition", "corrupted", "deep_regression", "make_train_step",
           "temporal_order", "train"]
