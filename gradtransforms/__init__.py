"""gradtransforms: gradient clipping, explosion detection and diagnosis for Optax.

Every transform is a pure ``optax.GradientTransformation``; ``metrics(state)``
reads every figure they keep.
"""

from gradtransforms._metrics import leaf_names, metrics
from gradtransforms.per_example import PerExampleClipState, per_example_clip
from gradtransforms.static import (
    AdaptiveGradClipState,
    ClipByBlockRMSState,
    ClipByGlobalNormState,
    ClipByLeafNormState,
    adaptive_grad_clip,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)

__version__ = "0.1.0"
