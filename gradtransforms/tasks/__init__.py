"""Synthetic tasks whose gradients really explode, and a pure training loop."""

from gradtransforms._extras import require

require("models", "flax", what="gradtransforms.tasks")

from gradtransforms.tasks.synthetic import (  # noqa: E402
    Task, addition, corrupted, deep_regression, temporal_order)
from gradtransforms.tasks.training import make_train_step, train  # noqa: E402

__all__ = ["Task", "addition", "corrupted", "deep_regression", "make_train_step",
           "temporal_order", "train"]
