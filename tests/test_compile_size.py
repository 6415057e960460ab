"""XLA:CPU compile size: HLO instructions per leaf (issue 24).

XLA:CPU's compile time grows with the instructions of the optimized module,
fused computations included (about 0.12 ms each on the 2-core CI machine:
a chain of k elementwise ops per leaf compiles in time linear in k, while
splitting the same ops over more kernels costs nothing extra). So the
structure a test can hold is the count of instructions each leaf adds to
the compiled step, against what a leaf adds to Adam's. Compile time itself
is a benchmark figure (``gradtransforms bench overhead --compile-leaves``).
"""

import functools
import hashlib
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from gradtransforms.catalogue import CATALOGUE

ALL = {k: e for k, e in CATALOGUE.items() if not e.batch_axis}

# Issue 24's target: compile time at most 2x Adam's, here as per-leaf HLO.
TARGET = 2.0
# Over the target (strict xfail): a second moment of its own (spike_clip,
# spam: also its reset), inner's output computed twice (guard's
# check="updates"; rewind around a guard).
OVER = {"spike_clip", "guard", "rewind", "spam"}
# What each method measures now (ratio to Adam's per-leaf instructions,
# 8 -> 24 leaves, catalogue's bench configuration), + ~5%: no regression.
# (adaptive_grad_clip 1.66: its leaves read their scales as dynamic slices,
# whose clamps are a few instructions in computations the leaves share.)
RATCHET = {
    "clip_by_value": 1.25, "clip_by_global_norm": 1.40,
    "clip_by_leaf_norm": 1.62, "clip_by_block_rms": 1.68,
    "adaptive_grad_clip": 1.72, "autoclip": 1.40, "zclip": 1.40,
    "adagc": 1.65, "quantile_clip": 1.40, "spike_clip": 2.42,
    "clippy": 1.72, "monitor": 1.27, "detect_spikes": 1.27, "guard": 2.62,
    "rewind": 4.4, "with_moment_reset": 1.28, "spam": 2.57,
}


def _methods(over: set, reason: str) -> list:
  """Every method as a test parameter, a strict xfail for those in
  ``over`` (issue 24 open for them)."""
  return [pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=reason)]
                       if n in over else []) for n in sorted(ALL)]


@functools.lru_cache(maxsize=None)
def _step_text(name: str | None, n: int, value: bool = True,
               donate: bool = True) -> str:
  """Optimized HLO of catalogue method ``name`` + Adam (None: Adam alone)
  on ``n`` leaves of 4 shapes; ``value``: the loss passed as ``value=``.
  Compiled once per arguments for all the tests of this file (most read
  the donated step with a loss at 8 and 24 leaves)."""
  step, params, state = _step_of(name, n, value)
  return jax.jit(step, donate_argnums=(0, 1) if donate else ()).lower(
      params, state, params).compile().as_text()


def _step_of(name: str | None, n: int, value: bool = True):
  """``(step, params, state)``: catalogue method ``name`` + Adam (None:
  Adam alone) on ``n`` leaves of 4 shapes; ``value``: the loss passed as
  ``value=``."""
  params = {f"l{i:02d}": jnp.zeros((4, 3 + i % 4)) for i in range(n)}
  tx = (optax.with_extra_args_support(optax.adam(1e-3)) if name is None
        else ALL[name].build(optax.adam(1e-3), config="bench"))
  kw = {"value": jnp.float32(1.0)} if value else {}

  def step(p, s, g):
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s
  return step, params, tx.init(params)


def _instructions(name: str | None, n: int) -> int:
  text = _step_text(name, n)
  return sum(1 for line in text.splitlines() if " = " in line)


def _per_leaf(name: str | None) -> float:
  return (_instructions(name, 24) - _instructions(name, 8)) / 16


@pytest.fixture(scope="module")
def adam_per_leaf() -> float:
  return _per_leaf(None)


@pytest.fixture(scope="module")
def ratios(adam_per_leaf) -> dict:
  cache: dict = {}

  def get(name):
    if name not in cache:
      cache[name] = _per_leaf(name) / adam_per_leaf
    return cache[name]
  return get


def test_adam_per_leaf_is_its_three_loops(adam_per_leaf):
  """The reference itself: Adam's mu, nu and update loops, about 47
  instructions a leaf (a change of jax/XLA that moves it moves the ratios)."""
  assert 35 <= adam_per_leaf <= 60, adam_per_leaf


@pytest.mark.parametrize("name", _methods(
    OVER, "over 2x Adam's compile size (issue 24)"))
def test_per_leaf_compile_size_within_target(name, ratios):
  assert ratios(name) <= TARGET, ratios(name)


@pytest.mark.parametrize("name", sorted(ALL))
def test_per_leaf_compile_size_does_not_regress(name, ratios):
  assert ratios(name) <= RATCHET[name], ratios(name)


@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms",
                                  "clippy", "zclip", "autoclip"])
def test_clip_decision_is_computed_once_per_leaf(name):
  """A clip scale ``where(c, m / x, 1)`` had its selects copied by XLA:CPU
  into each loop that reads it (Adam's mu, nu and update: 4 ``is-finite`` a
  leaf, a kernel and 14 instructions more); written with the divide as its
  root (``_norms.clip_scale``) the decision is made once: one ``is-finite``
  a leaf (a global clip: one in all)."""
  def finite_checks(n):
    text = _step_text(name, n)
    return len(re.findall(r"\bis-finite\(", text))
  per_leaf = (finite_checks(24) - finite_checks(8)) / 16
  assert per_leaf <= (1 if name.startswith(("clip_by_", "clippy")) else 0), per_leaf


def test_adagc_scales_are_read_not_recomputed_per_leaf():
  """adagc's per-leaf scale vector ``s`` (a select between warm-up and
  per-tensor scales) reaches the leaves' loops as an operand: no loop of
  Adam's recomputes the selects over the whole vector (13 instructions in
  each of mu and nu, 2.4x Adam's per-leaf HLO before)."""
  n = 8
  text = _step_text("adagc", n)
  leaf_loops = [c for c in re.split(r"\n(?=\S)", text)
                if re.match(r"%fused\S* \(param_0\S*: f32\[4,\d\]", c)]
  assert leaf_loops
  assert not any(re.search(rf"f32\[{n}\]\S* select\(", c) for c in leaf_loops)



def test_agc_decides_every_unit_at_once_on_cpu():
  """adaptive_grad_clip on CPU: a leaf adds its two sums of squares and
  nothing more of AGC's, no compare, select or count of its own (all on the
  joined units, once); leaf by leaf these were 2.71x Adam's per-leaf HLO."""
  def ops(n):
    text = _step_text("adaptive_grad_clip", n)
    return {op: len(re.findall(rf" {op}\(", text))
            for op in ("compare", "select", "reduce")}
  few, many = ops(8), ops(24)
  assert many["compare"] == few["compare"], (few, many)
  assert many["select"] == few["select"], (few, many)
  assert many["reduce"] - few["reduce"] == 2 * 16, (few, many)

def _distinct(text: str) -> tuple[int, int]:
  """Fused computations of ``text`` told apart after renaming (what XLA
  compiles once however many leaves share it): how many, and their
  instructions."""
  comps: dict[str, list[str]] = {}
  name = None
  for line in text.splitlines():
    if line.startswith("%"):
      name = line.split()[0]
      comps[name] = []
    elif line.startswith("ENTRY"):
      name = None
    elif name and " = " in line:
      comps[name].append(re.sub(r", metadata=\{[^}]*\}", "", line).strip())
  out = set()
  for body in comps.values():
    ids: dict[str, str] = {}
    out.add("\n".join(re.sub(r"%[\w.\-]+", lambda m: ids.setdefault(
        m.group(0), f"%v{len(ids)}"), line) for line in body))
  return len(out), sum(len(b.splitlines()) for b in out)


# One computation that grows with the leaves (issue 24): rewind's 0/1-trip
# loop body holds every leaf's carry (14 instructions a leaf: each carried
# buffer's get-tuple-element, the snapshot write's and restore's selects,
# the finiteness reductions; at 100 leaves 867 of its 1,442 fusions).
LEAF_SPECIFIC = {"rewind"}


@pytest.mark.parametrize("name", _methods(
    LEAF_SPECIFIC, "a computation that grows per leaf (issue 24)"))
def test_leaves_of_one_shape_share_their_computations(name):
  """Leaves of one shape must compile to the same loops: XLA:CPU compiles
  each distinct fused computation once, so 100 leaves of 5 shapes cost
  Adam ~1 s and 100 shapes ~8 s. A leaf's index baked into its loop (a
  static slice of a per-leaf vector) makes the loop its own: AGC reading
  its joined scales by static slice compiled in 5.3x Adam's time, by
  dynamic slice at a start out of a conditional 1.7x. From 8 to 24 leaves
  of 4 shapes the distinct computations may grow only by what joins the
  leaves (a concatenate of N operands): <= 3 instructions a leaf."""
  def distinct(n):
    return _distinct(_step_text(name, n))
  few, many = distinct(8), distinct(24)
  assert many[0] - few[0] <= 2, (few, many)
  assert (many[1] - few[1]) / 16 <= 3, (few, many)


def test_distinct_tells_a_leaf_index_apart():
  """The measure above is not blind: the same loop over two leaves of one
  shape is one computation, and two if each reads its own static slice."""
  x = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((4, 3))}
  v = jnp.arange(6.0)

  def shared(x, v):
    return jax.tree.map(lambda t: t * v[0] + 1, x)

  def own(x, v):
    return {"a": x["a"] * v[0] + 1, "b": x["b"] * v[3] + 1}
  n_shared = _distinct(jax.jit(shared).lower(x, v).compile().as_text())[0]
  n_own = _distinct(jax.jit(own).lower(x, v).compile().as_text())[0]
  assert n_own == n_shared + 1, (n_shared, n_own)


@pytest.mark.parametrize("anchor", [0, 7, -3, 2**31 - 1, -2**31])
def test_operands_pass_values_through_for_any_step(anchor):
  """``_xla.operands`` (values out of a conditional on CPU) returns them
  unchanged for every step counter, a corrupt negative one included (its
  side never taken returns zeros), and the conditional is really there:
  a conditional with the same value on both sides is folded away."""
  from gradtransforms import _xla
  x = (jnp.arange(3.0) + 1, jnp.asarray(True))
  f = jax.jit(lambda x, t: _xla.operands(x, t))
  out = f(x, jnp.int32(anchor))
  assert out[0].tolist() == [1.0, 2.0, 3.0] and bool(out[1])
  text = f.lower(x, jnp.int32(anchor)).compile().as_text()
  assert "conditional(" in text


@pytest.mark.parametrize("check", ["updates", "gradients"])
def test_guard_traces_its_inner_once(check):
  """The guard runs its inner optimizer in several places (each platform's
  branch of the step and of the output check, a conditional's probe); they
  share one trace (``_xla.traced_once``): tracing the guard of Adam at 100
  leaves took 1.9 s with five traces of Adam, 0.8 with one. The step is
  the same: the updates equal a plain chain's on a finite step."""
  import gradtransforms as gt
  calls = []
  adam = optax.adam(1e-3)

  def update(u, s, p=None):
    calls.append(1)
    return adam.update(u, s, p)
  tx = gt.guard(optax.GradientTransformation(adam.init, update), check=check)
  params = {"a": jnp.ones((3, 2)), "b": jnp.arange(4.0)}
  grads = jax.tree.map(lambda x: 0.1 * x + 0.5, params)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert len(calls) == 1
  want, _ = adam.update(grads, adam.init(params), params)
  chex.assert_trees_all_close(out, want, rtol=1e-6)


# None joins every leaf's figure in one fusion any more: XLA:CPU builds
# such a fusion in O(N^2) at compile time (adagc, donated, did: 26 operands
# at 8 leaves, 79 at 24, until its sums came from _sums.sums, whose stacked
# vector is kept whole, _xla.kept). rewind's widest fusion is its fixed
# bookkeeping (38 operands donated, 26 -> 19 not), not a join of leaves.
_WIDE_JOINS: set[str] = set()


@pytest.mark.parametrize("name", _methods(
    _WIDE_JOINS, "joins every leaf in one fusion (issue 24)"))
def test_no_fusion_reads_every_leaf_figure(name):
  """Compile time linear in the leaves: no XLA:CPU fusion takes one operand
  per leaf, so the widest fusion is as wide at 24 leaves as at 8 (Adam's
  widest: 5; with the donated state the guard's bookkeeping is one fusion
  of 19 operands however many leaves). A reduction of N per-leaf figures
  left to XLA's simplifier became one fusion of N scalar operands, which
  XLA:CPU's fusion pass builds in O(N^2) (clip_by_value: 11x Adam's compile
  time at 1,000 leaves, 1.7x as one vector behind ``_xla.kept``)."""
  def widest(n):
    text = _step_text(name, n)
    return max(text.count(", ", line.index(" fusion("),
                          line.index("), kind=")) + 1
               for line in text.splitlines() if " fusion(" in line)
  few, many = widest(8), widest(24)
  assert many <= few + 2, (few, many)


def _digest(text: str) -> str:
  """A hash of the computations of optimized HLO ``text`` (not the
  module's name or its source locations)."""
  text = re.sub(r", metadata=\{[^}]*\}", "", text[text.index("\n%"):])
  return hashlib.sha256(text.encode()).hexdigest()


# _step_text and _digest in a process without this suite's flags
# (importing this module does not run tests/conftest.py)
_HLO_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from test_compile_size import _digest, _step_text
for name in sys.argv[2:]:
  print(name, _digest(_step_text(name, 8)))
"""


def test_suite_compile_flags_leave_the_optimized_hlo_alone():
  """The suite compiles for the CPU at LLVM -O0 in one codegen module
  (tests/conftest.py) to save time; every structure test reads optimized
  HLO, which must then be exactly what a user's default compile gives. Here
  a process with the default flags and this one compile the same steps
  (source locations aside)."""
  names = ["guard", "clippy", "spam"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
      [sys.executable, "-c", _HLO_SCRIPT, os.path.dirname(__file__), *names],
      env=env, capture_output=True, text=True, check=True).stdout
  theirs = dict(line.split() for line in out.splitlines() if line.strip())
  assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]
  for name in names:
    assert _digest(_step_text(name, 8)) == theirs[name], name


def _trace_calls(name: str | None, n: int) -> int:
  """Python function calls made while tracing the step of :func:`_step_text`
  (``jax.jit(...).trace``, no lowering): a deterministic measure of its
  trace time, which counts in the compile time a user waits for."""
  import cProfile
  import pstats
  step, params, state = _step_of(name, n)
  prof = cProfile.Profile()
  prof.enable()
  jax.jit(step).trace(params, state, params)
  prof.disable()
  return pstats.Stats(prof).total_calls


def _trace_per_leaf(name: str | None) -> float:
  _trace_calls(name, 8)  # jnp's own caches warm
  return (_trace_calls(name, 24) - _trace_calls(name, 8)) / 16


# Per-leaf trace work / Adam's (8 -> 24 leaves of 4 shapes), + ~10%: each
# transform's per-leaf code runs as one jit per leaf shape (_xla.per_leaf),
# not as its jnp ops traced again for every leaf (spam 4.3x Adam's, spike_clip
# 2.9x, AGC 3.9x, clippy 2.1x, guard 5.0x, rewind 5.8x before). The wrappers
# still re-bind their inner optimizer's equations per leaf (_in_place.step).
# clip_by_leaf_norm and clip_by_block_rms trace their GPU form's sums too
# (_norms.leaf_scales: 1.06 -> 1.30 and 1.25 -> 1.54 traced alone, 1.74 for
# block RMS in the suite's order; the XLA:GPU program a kernel a leaf
# smaller, 3 -> 1.1).
TRACE_RATCHET = {
    "clip_by_value": 1.54, "clip_by_global_norm": 1.4,
    "clip_by_leaf_norm": 1.5, "clip_by_block_rms": 1.85,
    "adaptive_grad_clip": 3.25, "autoclip": 1.9, "zclip": 1.49,
    "adagc": 2.05, "quantile_clip": 1.46, "spike_clip": 1.97,
    "clippy": 1.53, "monitor": 1.32, "detect_spikes": 1.6, "guard": 4.64,
    "rewind": 4.5, "with_moment_reset": 1.41, "spam": 1.8,
}


@pytest.fixture(scope="module")
def adam_trace_per_leaf() -> float:
  return _trace_per_leaf(None)


@pytest.mark.parametrize("name", sorted(ALL))
def test_per_leaf_trace_work_does_not_regress(name, adam_trace_per_leaf):
  ratio = _trace_per_leaf(name) / adam_trace_per_leaf
  assert ratio <= TRACE_RATCHET[name], ratio


def test_per_leaf_traces_once_per_shape_and_compiles_the_same():
  """``_xla.per_leaf``: the function's body runs once per leaf shape and
  dtype (not once per leaf), and XLA inlines the calls: the optimized
  program is the one of the function applied directly."""
  from gradtransforms import _xla
  seen = []

  def f(x, s):
    seen.append((x.shape, x.dtype))
    return jnp.where(x > 0, x * s, -x) + 1

  xs = [jnp.zeros((3, 4)), jnp.ones((3, 4)), jnp.zeros((5,)),
        jnp.zeros((3, 4)), jnp.zeros((5,), jnp.bfloat16)]

  def hlo(wrap):
    def step(xs, s):
      g = _xla.per_leaf(f) if wrap else f
      return [g(x, s) for x in xs]
    text = jax.jit(step).lower(xs, jnp.float32(2)).compile().as_text()
    return [re.sub(r"(%[\w\-]+)\.\d+", r"\1",  # names' numbers apart
                   re.sub(r", metadata=\{[^}]*\}", "", line))
            for line in text.splitlines() if " = " in line]
  direct = hlo(False)
  assert len(seen) == 5
  seen.clear()
  assert hlo(True) == direct
  assert len(seen) == 3 and len(set(seen)) == 3
