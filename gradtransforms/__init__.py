"""gradtransforms: gradient clipping, explosion detection and diagnosis for Optax.

Every transform is a pure ``optax.GradientTransformation``; ``metrics(state)``
reads every figure they keep.
"""

from gradtransforms._dashboard import dashboard
from gradtransforms._reading import culprits, leaf_names, metrics
from gradtransforms.adagc import AdaGCState, adagc
from gradtransforms.autoclip import AutoClipState, autoclip
from gradtransforms.clippy import ClippyState, clippy
from gradtransforms.agc import AdaptiveGradClipState, adaptive_grad_clip
from gradtransforms.detect import DetectSpikesState, detect_spikes
from gradtransforms.diagnose import Diagnosis, diagnose
from gradtransforms.guard import GuardState, guard
from gradtransforms.monitor import MonitorState, monitor
from gradtransforms.per_example import PerExampleClipState, per_example_clip
from gradtransforms.quantile import QuantileClipState, quantile_clip
from gradtransforms.clipping import (
    ClipByBlockRMSState,
    ClipByGlobalNormState,
    ClipByLeafNormState,
    ClipByValueState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)
from gradtransforms.moment_reset import MomentResetState, with_moment_reset
from gradtransforms.spam import SpamState, spam
from gradtransforms.rewind import RewindState, rewind
from gradtransforms.spike_clip import SpikeClipState, spike_clip
from gradtransforms.zclip import ZClipState, zclip

__version__ = "0.2.0"
"""The version, in this one place: ``pyproject.toml`` reads it (dynamic
version), ``gradtransforms --version`` prints it, the README changelog
describes it."""

__all__ = [
    # static clipping
    "clip_by_value", "clip_by_global_norm", "clip_by_leaf_norm",
    "clip_by_block_rms", "adaptive_grad_clip", "per_example_clip",
    # adaptive clipping
    "autoclip", "zclip", "adagc", "spike_clip", "with_moment_reset", "spam",
    "clippy",
    "quantile_clip",
    # detection, guards, diagnosis
    "monitor", "detect_spikes", "guard", "rewind", "culprits", "diagnose", "Diagnosis",
    # reading figures
    "metrics", "dashboard", "leaf_names",
    # states
    "AdaGCState", "AdaptiveGradClipState", "AutoClipState", "ClipByBlockRMSState",
    "ClipByGlobalNormState", "ClipByLeafNormState", "ClipByValueState", "ClippyState",
    "DetectSpikesState", "GuardState", "MomentResetState", "MonitorState",
    "PerExampleClipState", "QuantileClipState", "RewindState", "SpamState",
    "SpikeClipState", "ZClipState",
]
