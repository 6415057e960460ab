"""Compiled structure of a step: kernels, DRAM bytes and compile time on a
chip that is not there.

XLA compiles "deviceless" for an NVIDIA H100 (the ``jax-cuda12-plugin`` and
``-pjrt`` wheels at jaxlib's version: no GPU, no NVIDIA library) and a TPU
v5e (``libtpu``: no TPU, no network), and the optimized HLO it prints is
what that chip would run. :func:`compile_step` lowers a step against
``ShapeDtypeStruct`` s on device 0 of such a topology (or the host CPU) and
reads the ENTRY computation of the result:

* kernels: on GPU every ENTRY instruction (recursing into ``call`` s) that
  is not bookkeeping (parameter, tuple, get-tuple-element, constant,
  bitcast, ...): in practice fusions and custom calls. On TPU the same
  minus the async HBM/VMEM copies (``copy-start``, ``slice-start``,
  ``ConcatBitcast``; reported as ``dma``) and rank-0 ops on the scalar
  unit (reported as ``scalar_ops``).
* bytes: operands + results of each kernel, a roofline proxy for step time
  (the deviceless GPU executable has no ``cost_analysis``). An operand that
  a fusion only slices counts as the slices it reads (as XLA's own cost
  analysis counts it): a leaf reading its part of a joined vector reads
  that part, not the vector.
* loops: a ``while`` is one kernel (on GPU a host sync) and its own
  operands and results are not bytes: they are its loop carry, updated in
  place. Its trip count is a run-time value, so the kernels and bytes of
  its body and condition are reported apart, for one trip, as
  ``loop_kernels`` and ``loop_bytes`` (``gt.rewind`` 's 0/1-trip loop).

A real H100 gave the same counts as this compile to within 2% (0.1.0 of
this project: 412/412, 518/517, 432/422 kernels). The transforms never
import this module (issue 21). Needs no extra to import; a platform whose
wheel is missing raises :class:`Unavailable` with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import time
from typing import Any, Callable

# Never open a real backend; libtpu: no metadata server, a second process
# may load it (it takes a lockfile), no "unknown accelerator" warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _k, _v in {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
               "TPU_ACCELERATOR_TYPE": "v5litepod-4",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
               "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}.items():
  os.environ.setdefault(_k, _v)

import jax  # noqa: E402

# NVIDIA H100 SXM 80GB as a GpuTargetConfig text proto (openxla/xla's
# h100_sxm.txtpb without the fields this jaxlib rejects).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
runtime_version: { major: 12 minor: 8 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

PLATFORMS = ("h100", "tpu-v5e", "cpu")
NOT_KERNELS = frozenset({"parameter", "tuple", "get-tuple-element", "constant",
                         "bitcast", "after-all", "add-dependency", "opt-barrier",
                         "domain"})
TPU_DMA = frozenset({"copy-start", "copy-done", "slice-start", "slice-done"})
TPU_DMA_CALLS = frozenset({"ConcatBitcast"})
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([^\]]*)\]")


class Unavailable(RuntimeError):
  """The platform cannot be compiled for here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Structure:
  """What one compiled step runs on ``platform``."""
  platform: str
  kernels: int
  bytes: int  # DRAM bytes: operands + results of every kernel
  compile_s: float  # seconds of XLA compile (not tracing or lowering)
  by_op: dict[str, int]
  scalar_ops: int = 0  # TPU: rank-0 ops on the scalar unit (not kernels)
  dma: int = 0  # TPU: async HBM<->VMEM copies started (not kernels)
  loop_kernels: int = 0  # kernels of while bodies and conditions, one trip
  loop_bytes: int = 0  # their bytes, one trip
  hlo: str = dataclasses.field(default="", repr=False)


_devices: dict[str, Any] = {}


def device(platform: str):
  """Device 0 of a compile-only topology for ``platform`` (cached); raises
  :class:`Unavailable` if its plugin is not installed or does not load."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  if platform not in _devices:
    if platform == "cpu":
      _devices[platform] = jax.devices("cpu")[0]
      return _devices[platform]
    from jax.experimental import topologies
    try:
      if platform == "h100":
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1")
      else:
        topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # plugin missing, wrong version, refuses to load
      wheel = ("jax-cuda12-plugin and jax-cuda12-pjrt" if platform == "h100"
               else "libtpu")
      raise Unavailable(
          f"cannot compile for {platform} here: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''} (needs {wheel} at "
          f"jaxlib {jax.lib.__version__}'s version: pip install "
          "'gradtransforms[accel]')") from e
    _devices[platform] = topo.devices[0]
  return _devices[platform]


def unavailable(platform: str) -> str | None:
  """None if ``platform`` can be compiled for here, else the reason."""
  try:
    device(platform)
  except Unavailable as e:
    return str(e)
  return None


@functools.lru_cache(maxsize=32)
def _jitted(fn: Callable, donate_argnums: tuple[int, ...]) -> Any:
  """One ``jax.jit`` of ``fn`` for every platform: its trace is reused
  (a step compiled for an H100 and a TPU is traced once)."""
  return jax.jit(fn, donate_argnums=donate_argnums)


def compile_step(fn: Callable, *args, platform: str = "h100",
                 donate_argnums: tuple[int, ...] = (),
                 keep_hlo: bool = False) -> Structure:
  """Compiles ``jax.jit(fn)`` for ``platform`` at the shapes and dtypes of
  ``args`` (arrays or ``ShapeDtypeStruct`` pytrees) and reads its structure."""
  sharding = jax.sharding.SingleDeviceSharding(device(platform))
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      jax.numpy.shape(a), jax.numpy.result_type(a), sharding=sharding), args)
  lowered = _jitted(fn, donate_argnums).lower(*specs)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  text = compiled.as_text() or ""
  s = structure(text, tpu=platform.startswith("tpu"))
  return dataclasses.replace(s, platform=platform, compile_s=seconds,
                             hlo=text if keep_hlo else "")


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, cur = "", None
  for line in text.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
    elif line.startswith("}"):
      cur = None
    elif cur is not None and " = " in line:
      comps[cur].append(line)
  return comps, entry


def _parse(line: str) -> tuple[str, str, str, list[str]]:
  """(name, result type, opcode, operand names) of one instruction."""
  lhs, rhs = line.split(" = ", 1)
  name = lhs.replace("ROOT", "").strip().lstrip("%")
  if rhs.startswith("("):  # tuple type: skip balanced parentheses
    depth = 0
    for i, ch in enumerate(rhs):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    t, rest = rhs[:i + 1], rhs[i + 1:]
  else:
    t, rest = rhs.split(" ", 1)
  m = re.match(r"\s*([\w\-]+)\((.*?)\)(,|$)", rest)
  if m is None:
    return name, t, rest.split("(", 1)[0].strip(), []
  return name, t, m.group(1), re.findall(r"%([\w.\-]+)", m.group(2))


def _size(t: str) -> int:
  total = 0
  for dt, dims in _ARRAY.findall(t):
    n = 1
    for d in dims.split(","):
      n *= int(d) if d.strip() else 1
    total += n * _BYTES[dt]
  return total


def _sliced(comp: list[str]) -> dict[int, int]:
  """Parameters of a fused computation that it only slices: number ->
  bytes of the slices read (a parameter with any other use is absent)."""
  params: dict[str, int] = {}
  read: dict[str, int] = {}
  other: set[str] = set()
  for line in comp:
    name, t, op, operands = _parse(line)
    m = re.search(r"parameter\((\d+)\)", line)
    if op == "parameter" and m:
      params[name] = int(m.group(1))
      continue
    for i, o in enumerate(operands):
      if o not in params:
        continue
      if op in ("slice", "dynamic-slice") and i == 0:
        read[o] = read.get(o, 0) + _size(t)
      else:
        other.add(o)
  return {params[o]: b for o, b in read.items() if o not in other}


def structure(text: str, tpu: bool = False) -> Structure:
  """Kernels and bytes of an optimized HLO module's ENTRY computation."""
  comps, entry = _computations(text)
  sizes: dict[str, int] = {}
  scalar: dict[str, bool] = {}
  by_op: collections.Counter = collections.Counter()
  n_bytes, scalar_ops, dma = 0, 0, 0
  loop = [0, 0]  # kernels, bytes inside while loops (one trip)

  def walk(comp: str, in_loop: bool = False) -> None:
    nonlocal n_bytes, scalar_ops, dma
    for line in comps[comp]:
      name, t, op, operands = _parse(line)
      sizes[name], scalar[name] = _size(t), re.match(r"^\w+\[\]", t) is not None
      if op == "call":  # command-buffer and other wrappers: what is inside
        walk(re.search(r"to_apply=%?([\w.\-]+)", line).group(1), in_loop)  # type: ignore[union-attr]
        continue
      if op == "while":  # its carry is updated in place; its body apart
        for part in ("condition", "body"):
          walk(re.search(part + r"=%?([\w.\-]+)", line).group(1), True)  # type: ignore[union-attr]
        if not in_loop:
          by_op[op] += 1
        else:
          loop[0] += 1
        continue
      if op in NOT_KERNELS:
        continue
      if tpu and (op in TPU_DMA or any(f'custom_call_target="{c}"' in line
                                       for c in TPU_DMA_CALLS)):
        dma += (op.endswith("-start") or op == "custom-call") and not in_loop
        continue
      if tpu and op.endswith("-done"):  # async collectives: counted at -start
        continue
      if tpu and op != "fusion" and scalar[name] and all(
          scalar.get(o, False) for o in operands):
        scalar_ops += not in_loop
        continue
      called = re.search(r"calls=%?([\w.\-]+)", line) if op == "fusion" else None
      sliced = _sliced(comps.get(called.group(1), [])) if called else {}
      whole = [sizes.get(o, 0) for o in operands]
      b = sizes[name] + sum(min(sliced.get(i, w), w) for i, w in enumerate(whole))
      if in_loop:
        loop[0] += 1
        loop[1] += b
        continue
      by_op[op] += 1
      n_bytes += b

  if entry:
    walk(entry)
  return Structure(platform="", kernels=sum(by_op.values()), bytes=n_bytes,
                   compile_s=0.0, by_op=dict(by_op), scalar_ops=scalar_ops, dma=dma,
                   loop_kernels=loop[0], loop_bytes=loop[1])
