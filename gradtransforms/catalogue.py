"""One catalogue of the public transforms, for tests, benchmarks and the demo.

Each :class:`Entry` says how a transform is placed around an optimizer
(``"before"`` it on the gradients, ``"after"`` it on the updates,
``"around"`` it as a wrapper, or ``"optimizer"``: a full optimizer that
takes the place of the Adam it is compared with), a small configuration for tests, the
benchmark configuration, the optax equivalent where one exists, and whether
it takes ``axis_name`` / ``layer_axes``. Adding a transform means adding it
to ``gradtransforms/__init__.py`` and here; ``tests/test_api.py`` fails when
a public transform is missing. The transforms never import this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax

import gradtransforms as gt

Make = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Entry:
  """How to build one public transform.

  ``test(**kw)`` and ``bench(**kw)`` return the bare transform (for
  ``"around"`` entries: a function of the inner optimizer); ``kw`` is passed
  through (``axis_name=...``, ``layer_axes=...``).
  """
  name: str
  placement: str  # "before" | "after" | "around" | "optimizer"
  group: str  # "static" | "adaptive" | "detection"
  test: Make
  bench: Make
  optax_equivalent: Callable[[], Any] | None = None
  axis_name: bool = True
  layer_axes: bool = False
  needs_params: bool = False
  batch_axis: bool = False  # updates carry a leading per-example axis

  def build(self, opt: optax.GradientTransformation, config: str = "test",
            **kw) -> optax.GradientTransformationExtraArgs:
    """The transform placed with ``opt``, as one ExtraArgs optimizer."""
    make = self.test if config == "test" else self.bench
    if self.placement == "optimizer":  # replaces opt (an Adam of the same lr)
      tx = make(**kw)
    elif self.placement == "around":
      tx = make(**kw)(opt)
    elif self.placement == "after":
      tx = optax.chain(opt, make(**kw))
    else:
      tx = optax.chain(make(**kw), opt)
    return optax.with_extra_args_support(tx)

  def build_optax(self, opt: optax.GradientTransformation
                  ) -> optax.GradientTransformation | None:
    """The optax equivalent placed the same way, or None."""
    if self.optax_equivalent is None:
      return None
    if self.placement == "around":
      return self.optax_equivalent()(opt)
    return optax.chain(self.optax_equivalent(), opt)


def _around(factory, **fixed):
  return lambda **kw: (lambda opt: factory(opt, **fixed, **kw))


_ENTRIES = [
    Entry("clip_by_value", "before", "static",
          lambda **kw: gt.clip_by_value(1.0, **kw),
          lambda **kw: gt.clip_by_value(1e-3, **kw),
          lambda: optax.clip(1e-3), axis_name=False),
    Entry("clip_by_global_norm", "before", "static",
          lambda **kw: gt.clip_by_global_norm(1.0, **kw),
          lambda **kw: gt.clip_by_global_norm(1.0, **kw),
          lambda: optax.clip_by_global_norm(1.0)),
    Entry("clip_by_leaf_norm", "before", "static",
          lambda **kw: gt.clip_by_leaf_norm(1.0, **kw),
          lambda **kw: gt.clip_by_leaf_norm(0.1, **kw), layer_axes=True),
    Entry("clip_by_block_rms", "before", "static",
          lambda **kw: gt.clip_by_block_rms(0.5, **kw),
          lambda **kw: gt.clip_by_block_rms(1e-3, **kw),
          lambda: optax.clip_by_block_rms(1e-3), layer_axes=True),
    Entry("adaptive_grad_clip", "before", "static",
          lambda **kw: gt.adaptive_grad_clip(0.05, **kw),
          lambda **kw: gt.adaptive_grad_clip(0.01, **kw),
          lambda: optax.adaptive_grad_clip(0.01), axis_name=False,
          needs_params=True),
    Entry("per_example_clip", "before", "static",
          lambda **kw: gt.per_example_clip(1.0, **kw),
          lambda **kw: gt.per_example_clip(1.0, **kw), batch_axis=True),
    Entry("autoclip", "before", "adaptive",
          lambda **kw: gt.autoclip(50.0, history=8, **kw),
          lambda **kw: gt.autoclip(10.0, history=1000, **kw)),
    Entry("zclip", "before", "adaptive",
          lambda **kw: gt.zclip(warmup_steps=2, max_grad_norm=None, **kw),
          lambda **kw: gt.zclip(**kw)),
    Entry("adagc", "before", "adaptive",
          lambda **kw: gt.adagc(warmup_steps=2, **kw),
          lambda **kw: gt.adagc(**kw), layer_axes=True),
    Entry("quantile_clip", "before", "adaptive",
          lambda **kw: gt.quantile_clip(**kw),
          lambda **kw: gt.quantile_clip(**kw)),
    Entry("spike_clip", "before", "adaptive",
          lambda **kw: gt.spike_clip(threshold=2.0, **kw),
          lambda **kw: gt.spike_clip(**kw)),
    Entry("clippy", "after", "adaptive",
          lambda **kw: gt.clippy(**kw), lambda **kw: gt.clippy(**kw),
          needs_params=True, layer_axes=True),
    Entry("monitor", "before", "detection",
          lambda **kw: gt.monitor(per_leaf=True, **kw),
          lambda **kw: gt.monitor(per_leaf=True, **kw), layer_axes=True),
    Entry("detect_spikes", "before", "detection",
          lambda **kw: gt.detect_spikes(warmup_steps=2, **kw),
          lambda **kw: gt.detect_spikes(**kw), layer_axes=True),
    Entry("guard", "around", "detection",
          _around(gt.guard, on="spike", warmup_steps=2,
                  max_consecutive_errors=2, reset_inner_state=True),
          _around(gt.guard),
          lambda: (lambda opt: optax.apply_if_finite(opt, 10)),
          layer_axes=True),
    Entry("rewind", "around", "detection",
          lambda **kw: (lambda opt: gt.rewind(gt.guard(
              opt, max_consecutive_errors=2, warmup_steps=2, **kw),
              every=2, **kw)),
          lambda **kw: (lambda opt: gt.rewind(gt.guard(opt, **kw), every=100,
                                              **kw)),
          needs_params=True),
    Entry("with_moment_reset", "around", "adaptive",
          _around(gt.with_moment_reset, interval=2),
          _around(gt.with_moment_reset), axis_name=False),
    Entry("spam", "optimizer", "adaptive",
          lambda **kw: gt.spam(1e-3, threshold=2.0, interval=2, warmup_steps=2,
                               **kw),
          lambda **kw: gt.spam(1e-3, **kw), axis_name=False),
]

CATALOGUE: dict[str, Entry] = {e.name: e for e in _ENTRIES}
"""Every public transform, by its public name."""
