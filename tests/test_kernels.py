"""Kernel and DRAM-bytes budgets on an H100 and a TPU v5e, compiled here
without either (issue 21; gradtransforms.bench.compiled).

For every catalogue entry + Adam, per leaf and (where it takes
``layer_axes``) per layer, on each chip:

* kernels at most its reference's + 5%. The reference
  (``budgets.reference_kind``): its optax equivalent; else for a clip
  ``optax.clip_by_global_norm`` + Adam (Adam plus one read of the
  gradients); else, for a figure only recorded, Adam + a recorded global
  norm (XLA fuses it into Adam's own pass); ``with_moment_reset``: Adam;
  ``clippy``: two global-norm clips (it reads the gradients twice);
  ``rewind`` (around a guard): the guard's, ``optax.apply_if_finite``.
  Per leaf the count is measured at 8 and 16 leaves and split into a
  per-leaf slope and a fixed intercept: the slope may not exceed the
  reference's (+5%), and slope and intercept together may not exceed the
  reference's + 5% at 100 leaves (at 16 leaves a fixed cost would weigh
  six times more than at 100). Stacked (6 leaves of 4 layers): the count
  itself.
* bytes at most the floor + 1%: Adam's bytes plus ``budgets.READS[name]``
  reads of the gradients (0 for a figure only recorded or ``optax.clip``,
  which fuse into Adam's pass; 1 for a norm; 2 for adaptive_grad_clip's
  params and gradients norms, for spike_clip's own second moment and for
  rewind's guard and snapshot; 3 for clippy), see
  ``gradtransforms/bench/budgets.py``. A ``while`` loop is one kernel and
  no bytes (its carry is updated in place; its body runs on rare steps
  and is reported apart, ``Structure.loop_bytes``).

Leaves are 255 x 254 float32 (shapes only: nothing is allocated), large
enough that XLA:GPU splits reductions as it does at 50M parameters and not
tile-aligned; bytes also with bfloat16 params, gradients and moments (per
leaf, 8 leaves). Kernels in bfloat16 and at 100/1,000 leaves are in
``gradtransforms bench kernels`` (``benchmarks/results/kernels.md``).
"""

from __future__ import annotations

import functools

import jax
import optax
import pytest

import gradtransforms as gt
from gradtransforms.bench import budgets, compiled
from gradtransforms.catalogue import CATALOGUE

PLATFORMS = ("h100", "tpu-v5e")
PER = 255 * 254
SMALL, LARGE = 8, 16
STACKED = budgets.Workload(6, 6 * 4 * PER, layers=4)
# bytes also for bfloat16 params, gradients and moments (per leaf)
BF16 = budgets.Workload(SMALL, SMALL * PER, dtype="bfloat16")
KERNEL_MARGIN, BYTES_MARGIN = 1.05, 1.01
TARGET_LEAVES = 100

# Over budget today (issue 21 is open for these); strict, so an entry must
# be dropped from this list as soon as its fix lands.
_OTHERS = "over budget; not fixed yet (issue 21 open)"
_MINE = "over budget; not fixed yet (issue 21 item 3)"
OVER: dict[tuple[str, str, str, str], str] = {}


def _over(names, variants, platforms, metrics, reason):
  for n in names:
    for v in variants:
      for p in platforms:
        for m in metrics:
          OVER[(n, v, p, m)] = reason


_over(["detect_spikes"], ["stacked"], ["tpu-v5e"], ["kernels"], _OTHERS)  # below
# guard stacked, TPU: 17 against 13 (its H100 row is within budget, 23
# against 22, since its sums are finished by shape group, _sums.finish; 30
# before)
_over(["guard"], ["stacked"], ["tpu-v5e"], ["kernels"],
      "guard's fixed kernels over only 6 leaves, TPU (issue 21 open)")
# Per-layer clips, 6x4 stacked on TPU: 2 kernels a leaf as the reference,
# whose per-leaf scale is a scalar (TPU's scalar unit, no kernel), plus 3-4
# fixed for the (L,)-vector scales (concatenation, scales, their slices:
# XLA:TPU fuses no reduction epilogue and no sqrt/divide into the leaf's
# loop): 15-16 vs 12 at 6 leaves, 52-53 vs 48 at 24.
_over(["clip_by_leaf_norm", "clip_by_block_rms", "adagc"], ["stacked"],
      ["tpu-v5e"], ["kernels"],
      "per-layer (L,) scales: fixed kernels the scalar reference has not")
# monitor / detect_spikes stacked (6 leaves of 4 layers), TPU: 9 / 11
# against 6 (14 / 18 before the stacked sums went behind a barrier on TPU,
# _norms.stacked_sums, and the detector's attribution became one
# reduction). What is left is fixed (a leaf costs what the reference's
# does: test_per_layer_kernels_grow_as_the_reference_per_leaf): the (S,)
# vector of per-layer sums the state keeps (a concatenation) and the
# detector's per-layer statistics. On an H100: monitor 12 and detect_spikes
# 16 against 15, since each leaf's row partials are finished with those of
# the same shape in one reduction (_sums.finish; 18 and 22 finished leaf by
# leaf). detect_spikes' H100 row is 15 (within budget) since its bools are
# read once in the 4-byte vector too (_read_once.read_once(bools_as_words));
# at 24 layers it is 16 against 15.
_over(["monitor"], ["stacked"], ["tpu-v5e"], ["kernels"], _MINE)
# Entries without layer_axes on the stacked workload (3-D leaves, 6 of 4
# layers), where a few fixed kernels weigh against a reference of 6-21:
# the scalar bookkeeping of autoclip (18 vs 12: its history's sort) and
# zclip (16 vs 12) on TPU; with_moment_reset 10 vs 8 on the H100 (its old
# scalars read once, _read_once; 11 before); rewind 24 vs 22 (H100) and 20
# vs 13 (TPU); per_example_clip 19 vs 16 (H100), 15 vs 14 (TPU).
_over(["autoclip", "zclip"], ["stacked"], ["tpu-v5e"], ["kernels"], _OTHERS)
_over(["with_moment_reset"], ["stacked"], ["h100"], ["kernels"], _OTHERS)
# clip_by_value, 6 x 4 on the H100: 10 vs 8, its state's two scalars
# written each step (a kernel each; passed on unchanged they cost none but
# a restored state's old bound would be reported as the bound in force)
_over(["clip_by_value"], ["stacked"], ["h100"], ["kernels"], _OTHERS)
_over(["rewind", "per_example_clip"], ["stacked"], PLATFORMS, ["kernels"],
      _OTHERS)
# Bytes on 3-D leaves of 4 layers: adaptive_grad_clip's unit norms on
# rank-3 leaves (1.607 / 1.571 against 1.286; 1.339 at 24 layers).
# (spike_clip's H100 row was 1.572 and 23 kernels, its new bound written by
# a kernel of its own and read again by Adam's, until its max excess was
# taken as row partials on GPU: 1.287 and 17.)
_over(["adaptive_grad_clip"], ["stacked"], PLATFORMS, ["bytes"], _OTHERS)


def _cases():
  for name, entry in CATALOGUE.items():
    # stacked: 3-D leaves, per layer where the entry takes layer_axes
    variants = ("per_leaf", "stacked")
    for variant in (*variants, "bf16"):
      for platform in PLATFORMS:
        for metric in ("kernels", "bytes") if variant != "bf16" else ("bytes",):
          key = (name, variant, platform, metric)
          marks = ([pytest.mark.xfail(strict=True, reason=OVER[key])]
                   if key in OVER else [])
          yield pytest.param(*key, id="-".join(key), marks=marks)


@functools.lru_cache(maxsize=None)
def _available(platform: str) -> str | None:
  return compiled.unavailable(platform)


_COMPILED: dict[tuple, tuple[int, int]] = {}
_STEPS: dict[tuple, budgets.Step] = {}


def _measure(what: str, name: str, platform: str, w: budgets.Workload):
  """(kernels, bytes) of ``what`` ("method", "reference", "adam") on ``w``;
  one compile per distinct step (methods share their references and Adam)
  and one trace for both chips."""
  if what == "adam":  # also with_moment_reset's reference
    key: tuple = ("reference", ("adam", None), w)
  elif what == "reference":
    key = ("reference", budgets.reference_key(name), w)
  else:
    key = ("method", name, w)
  if key not in _STEPS:
    _STEPS[key] = (budgets.adam_step(w) if what == "adam" else
                   budgets.reference_step(name, w) if what == "reference" else
                   budgets.method_step(name, w))
  if key + (platform,) not in _COMPILED:
    s = _STEPS[key].compile(platform)
    _COMPILED[key + (platform,)] = s.kernels, s.bytes
  return _COMPILED[key + (platform,)]


def _per_leaf(n: int) -> budgets.Workload:
  return budgets.Workload(n, n * PER)


def _fit(k_small, k_large):
  """(slope, intercept) of kernels at SMALL and LARGE leaves."""
  slope = (k_large - k_small) / (LARGE - SMALL)
  return slope, k_small - SMALL * slope


def _line(what, name, platform):
  """(slope, intercept) of kernels against the number of leaves."""
  return _fit(*(_measure(what, name, platform, _per_leaf(n))[0]
                for n in (SMALL, LARGE)))


def _check_kernels(name, variant, platform):
  label = budgets.reference_label(name)
  if variant == "stacked":
    k = _measure("method", name, platform, STACKED)[0]
    ref = _measure("reference", name, platform, STACKED)[0]
    assert k <= KERNEL_MARGIN * ref, (
        f"{name} (layer_axes=0) on {platform}: {k} kernels, reference "
        f"({label}) {ref}")
    return
  b, a = _line("method", name, platform)
  rb, ra = _line("reference", name, platform)
  at, ref_at = a + TARGET_LEAVES * b, ra + TARGET_LEAVES * rb
  assert b <= KERNEL_MARGIN * rb + 1e-9, (
      f"{name} on {platform}: {b:g} kernels per leaf, reference ({label}) {rb:g}")
  assert at <= KERNEL_MARGIN * ref_at, (
      f"{name} on {platform}: {a:g} fixed + {b:g}/leaf = {at:g} kernels at "
      f"{TARGET_LEAVES} leaves, reference ({label}) {ra:g} + {rb:g}/leaf = {ref_at:g}")


def _check_bytes(name, variant, platform):
  w = {"stacked": STACKED, "bf16": BF16}.get(variant, _per_leaf(SMALL))
  got = _measure("method", name, platform, w)[1]
  adam = _measure("adam", name, platform, w)[1]
  ref = (_measure("reference", name, platform, w)[1]
         if CATALOGUE[name].batch_axis else None)
  floor = budgets.bytes_floor(name, adam, w, ref)
  reads = budgets.READS.get(name, 1)
  assert got <= BYTES_MARGIN * floor, (
      f"{name} ({variant}) on {platform}: {got / adam:.3f}x Adam's bytes, "
      f"floor {floor / adam:.3f} (Adam + {reads} read(s) of the gradients)")


@pytest.mark.parametrize("name,variant,platform,metric", list(_cases()))
def test_budget(name, variant, platform, metric):
  reason = _available(platform)
  if reason:
    pytest.skip(reason)
  (_check_kernels if metric == "kernels" else _check_bytes)(name, variant, platform)


STACKED_MORE = budgets.Workload(12, 12 * 4 * PER, layers=4)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", [n for n, e in CATALOGUE.items() if e.layer_axes])
def test_per_layer_kernels_grow_as_the_reference_per_leaf(name, platform):
  """Per layer costs what per leaf costs: from 6 to 12 stacked leaves
  (``layer_axes=0``) a method adds at most the reference's kernels a leaf
  (+5%); what it has more is fixed (the (S,) vector its state keeps, the
  step's scalar bookkeeping), which ``test_budget``'s stacked count holds.
  Before their per-layer totals were added elementwise (``_norms.total``),
  monitor, detect_spikes and the guard reduced each leaf's ``(L,)`` vector
  in a kernel of its own (H100: guard 4.83 kernels a leaf against
  ``apply_if_finite``'s 3)."""
  reason = _available(platform)
  if reason:
    pytest.skip(reason)
  slope = lambda what: (_measure(what, name, platform, STACKED_MORE)[0]
                        - _measure(what, name, platform, STACKED)[0]) / 6
  assert slope("method") <= KERNEL_MARGIN * slope("reference"), (
      slope("method"), slope("reference"))


def test_structure_counts_a_sliced_operand_as_its_slices():
  """A fusion that only slices an operand reads the slices, not the whole
  operand (a leaf reading its part of a joined vector); an operand it also
  uses whole counts whole."""
  hlo = """HloModule m
%f (p: f32[100], q: f32[8]) -> f32[8] {
  %p = f32[100]{0} parameter(0)
  %q = f32[8]{0} parameter(1)
  %s = f32[8]{0} slice(%p), slice={[8:16]}
  ROOT %n = f32[8]{0} add(%s, %q)
}
%g (p: f32[100], q: f32[8]) -> f32[8] {
  %p = f32[100]{0} parameter(0)
  %q = f32[8]{0} parameter(1)
  %s = f32[8]{0} slice(%p), slice={[8:16]}
  %t = f32[100]{0} negate(%p)
  %u = f32[8]{0} slice(%t), slice={[0:8]}
  ROOT %n = f32[8]{0} add(%s, %u)
}
ENTRY %main (a: f32[100], b: f32[8]) -> (f32[8], f32[8]) {
  %a = f32[100]{0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %x = f32[8]{0} fusion(%a, %b), kind=kLoop, calls=%f
  %y = f32[8]{0} fusion(%a, %b), kind=kLoop, calls=%g
  ROOT %r = (f32[8]{0}, f32[8]{0}) tuple(%x, %y)
}
"""
  s = compiled.structure(hlo)
  assert s.kernels == 2
  assert s.bytes == (32 + 32 + 32) + (32 + 400 + 32)


def test_structure_reads_known_hlo():
  """The counter itself, on a hand-written module: a fusion and a custom
  call are kernels; parameters, tuples and constants are not; bytes are
  operands + results of each kernel; TPU async copies and scalar ops apart."""
  hlo = """HloModule m
%f (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}
ENTRY %main (a: f32[8], s: f32[]) -> (f32[8], f32[]) {
  %a = f32[8]{0} parameter(0)
  %s = f32[] parameter(1)
  %c = f32[] constant(1)
  %x = f32[8]{0} fusion(%a), kind=kLoop, calls=%f
  %cs = (f32[8]{0}, f32[8]{0}, u32[]) copy-start(%x)
  %cd = f32[8]{0} copy-done(%cs)
  %y = f32[8]{0} custom-call(%cd), custom_call_target="foo"
  %t = f32[] add(%s, %c)
  ROOT %r = (f32[8]{0}, f32[]) tuple(%y, %t)
}
"""
  gpu = compiled.structure(hlo)
  assert gpu.by_op == {"fusion": 1, "copy-start": 1, "copy-done": 1,
                       "custom-call": 1, "add": 1}
  assert gpu.bytes == 64 + (68 + 32) + (32 + 68) + 64 + 12
  tpu = compiled.structure(hlo, tpu=True)
  assert (tpu.kernels, tpu.dma, tpu.scalar_ops) == (2, 1, 1)


def test_structure_counts_a_loop_once_and_its_body_apart():
  """A while is one kernel whose carry (updated in place) is no bytes; its
  body's kernels are reported apart, for one trip."""
  hlo = """HloModule m
%body (c: (pred[], f32[8])) -> (pred[], f32[8]) {
  %c = (pred[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%c), index=1
  %n = f32[8]{0} negate(%x)
  %f = pred[] constant(false)
  ROOT %r = (pred[], f32[8]{0}) tuple(%f, %n)
}
%cond (c: (pred[], f32[8])) -> pred[] {
  %c = (pred[], f32[8]{0}) parameter(0)
  ROOT %p = pred[] get-tuple-element(%c), index=0
}
ENTRY %main (a: f32[8], p: pred[]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %p = pred[] parameter(1)
  %t = (pred[], f32[8]{0}) tuple(%p, %a)
  %w = (pred[], f32[8]{0}) while(%t), condition=%cond, body=%body
  ROOT %y = f32[8]{0} get-tuple-element(%w), index=1
}
"""
  s = compiled.structure(hlo)
  assert (s.kernels, s.bytes, s.by_op) == (1, 0, {"while": 1})
  assert (s.loop_kernels, s.loop_bytes) == (1, 64)


def test_unknown_platform_is_a_value_error():
  with pytest.raises(ValueError, match="platform"):
    compiled.device("a100")


def test_methods_sharing_a_reference_key_share_its_step():
  """The compiles above are shared by ``budgets.reference_key``: methods
  with one key must have the very same reference step (same jaxpr)."""
  w = _per_leaf(2)
  by_key: dict = {}
  for name in CATALOGUE:
    step = budgets.reference_step(name, w)
    jaxpr = str(jax.make_jaxpr(step.fn)(*step.args))
    by_key.setdefault(budgets.reference_key(name), set()).add(jaxpr)
  by_key.setdefault(("adam", None), set()).add(
      str(jax.make_jaxpr(budgets.adam_step(w).fn)(*budgets.adam_step(w).args)))
  assert all(len(v) == 1 for v in by_key.values())
  assert len(by_key) < len(CATALOGUE)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_clip_by_value_recorded_peak_is_fused_on_accelerators(platform):
  """``clip_by_value(record_peak=True)`` records ``max |u|``; on an H100 or
  TPU that reduction rides on the optimizer's pass over the gradients, so
  it costs what ``optax.clip`` costs: kernels within 5% (per leaf and at
  100 leaves) and Adam's bytes (floor: 0 reads, + 1%). On CPU the figure is
  a pass of its own and off by default (tests/test_static.py)."""
  reason = _available(platform)
  if reason:
    pytest.skip(reason)

  def line(tx):
    return _fit(*(budgets.tx_step(tx, _per_leaf(n)).compile(platform).kernels
                  for n in (SMALL, LARGE)))
  ours = optax.chain(gt.clip_by_value(1e-3, record_peak=True), budgets.adam())
  ref = optax.chain(optax.clip(1e-3), budgets.adam())
  (b, a), (rb, ra) = line(ours), line(ref)
  assert b <= KERNEL_MARGIN * rb and (
      a + TARGET_LEAVES * b <= KERNEL_MARGIN * (ra + TARGET_LEAVES * rb)), (
      (a, b), (ra, rb))
  w = _per_leaf(SMALL)
  got = budgets.tx_step(ours, w).compile(platform).bytes
  adam = _measure("adam", "clip_by_value", platform, w)[1]
  assert got <= BYTES_MARGIN * adam, got / adam


def test_spam_moment_dtype_adds_no_kernels_on_h100():
  """spam's step scalars stay float32 whatever the moments' dtype: each
  cast to bfloat16 had been an H100 kernel of its own (6 x 24 stacked: 24
  kernels in bfloat16 against 22 in float32, reference 21). The bfloat16
  step compiles to as many kernels as the float32 one."""
  reason = _available("h100")
  if reason:
    pytest.skip(reason)
  f32 = budgets.Workload(6, 6 * 24 * PER, layers=24)
  bf16 = budgets.Workload(6, 6 * 24 * PER, layers=24, dtype="bfloat16")
  k32, k16 = (_measure("method", "spam", "h100", w)[0] for w in (f32, bf16))
  assert k16 <= k32, (k16, k32)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_agc_rank3_units_keep_their_shape(platform):
  """adaptive_grad_clip on rank-3 leaves (its units: slices along axis 0,
  as optax's) keeps each leaf's unit sums in their reduced shape: a TPU
  v5e relaid and reshaped every flat unit vector where the leaf's scale
  ops were traced apart (62 kernels at 6 leaves of 4 x 255 x 254, 2.0x
  Adam's bytes, against optax's 30). Kernels at most optax's
  ``adaptive_grad_clip`` + Adam's (+5%), and no relayout copy or reshape
  kernel on either chip."""
  reason = _available(platform)
  if reason:
    pytest.skip(reason)
  s = budgets.method_step("adaptive_grad_clip", STACKED).compile(platform)
  ref = _measure("reference", "adaptive_grad_clip", platform, STACKED)[0]
  assert s.kernels <= KERNEL_MARGIN * ref, (s.kernels, ref)
  assert not {"copy", "reshape"} & set(s.by_op), s.by_op


# H100 kernels a leaf, as measured (8 -> 16 leaves; Adam alone: 1): the sums
# of squares (and clippy's peaks) are finished by shape group
# (gradtransforms/_sums.py), not by a kernel of their own per leaf; the
# per-leaf clips then also get their Adam loops fused horizontally by XLA.
# Before: 2 for a recorded norm, 3 for a clip (the references' counts).
GROUPED_SLOPE = {"monitor": 1, "detect_spikes": 1, "clip_by_global_norm": 2,
                 "autoclip": 2, "zclip": 2, "quantile_clip": 2, "guard": 2,
                 "clip_by_leaf_norm": 1.125, "clip_by_block_rms": 1.125,
                 "adagc": 1.125, "clippy": 1.0, "rewind": 1.125}


@pytest.mark.parametrize("name", sorted(GROUPED_SLOPE))
def test_h100_sums_cost_no_kernel_of_their_own_per_leaf(name):
  if _available("h100"):
    pytest.skip(_available("h100"))
  slope, _ = _line("method", name, "h100")
  assert slope <= GROUPED_SLOPE[name] + 1e-9, slope
