"""A byte-level corpus every machine has offline: the Python standard library.

The running interpreter's own ``.py`` sources under
``sysconfig.get_paths()["stdlib"]`` (installed packages excluded), read as
bytes and concatenated in sorted path order; the last ``held_out`` fraction
is a fixed held-out split (for Python 3.11 it starts in the ``test/``
sources). The corpus differs between Python versions, so :class:`Corpus`
records the version, file count and size for the results.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gradtransforms import _checks

# Installed (third-party) code is machine-dependent: never part of the corpus.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and held-out bytes (``uint8`` numpy arrays) and where they came from."""
  train: np.ndarray
  held_out: np.ndarray
  root: str
  files: int
  python: str

  @property
  def bytes(self) -> int:
    return int(self.train.size + self.held_out.size)

  def describe(self) -> dict:
    """The facts a result needs to be reproduced: source, version, sizes."""
    return {"root": self.root, "python": self.python, "files": self.files,
            "bytes": self.bytes, "train_bytes": int(self.train.size),
            "held_out_bytes": int(self.held_out.size)}


def source_files(root: str | os.PathLike, limit: int | None = None
                 ) -> list[Path]:
  """``.py`` files under ``root`` in sorted path order, skipping
  :data:`EXCLUDED_DIRS`; the first ``limit`` of them if given."""
  root = Path(root)
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
  found.sort(key=lambda p: p.relative_to(root).as_posix())
  return found if limit is None else found[:limit]


def load(root: str | os.PathLike | None = None, held_out: float = 0.1,
         limit: int | None = None) -> Corpus:
  """Reads the corpus; ``root`` defaults to this interpreter's stdlib.

  Args:
    root: folder to read (default ``sysconfig.get_paths()["stdlib"]``).
    held_out: fraction in (0, 1) of the bytes, at the end, held out.
    limit: read only the first ``limit`` files (for tests).
  """
  _checks.in_range("held_out", held_out, 0.0, 1.0, lo_open=True, hi_open=True)
  root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
  files = source_files(root, limit)
  if not files:
    raise ValueError(f"no .py files under {root}")
  data = np.frombuffer(b"".join(p.read_bytes() for p in files), np.uint8)
  cut = int(round(data.size * (1 - held_out)))
  return Corpus(data[:cut].copy(), data[cut:].copy(), str(root), len(files),
                platform.python_version())


def sample(data: jax.Array, key: jax.Array, batch: int, seq_len: int
           ) -> tuple[jax.Array, jax.Array]:
  """A batch of random windows of ``data`` (pure, jittable).

  Returns ``(inputs, targets)``, each ``(batch, seq_len)`` int32, with
  ``targets`` the inputs shifted by one byte. Window starts are uniform in
  ``[0, len(data) - seq_len - 1]``, so every window lies inside ``data``.
  """
  n = data.shape[0]
  if n < seq_len + 1:
    raise ValueError(f"data has {n} bytes, fewer than seq_len + 1 = {seq_len + 1}")
  starts = jax.random.randint(key, (batch,), 0, n - seq_len)
  windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (seq_len + 1,))
                     )(starts).astype(jnp.int32)
  return windows[:, :-1], windows[:, 1:]


def eval_windows(data: np.ndarray, count: int, seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``count`` evenly spaced, fixed windows of ``data`` (a deterministic
  held-out set): ``(inputs, targets)``, each ``(count, seq_len)`` int32."""
  count = _checks.integer("count", count, minimum=1)
  if data.size < seq_len + 1:
    raise ValueError(f"data has {data.size} bytes, fewer than seq_len + 1")
  starts = np.linspace(0, data.size - seq_len - 1, count).astype(np.int64)
  w = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return w[:, :-1], w[:, 1:]
