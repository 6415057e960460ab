"""Multi-process training (``jax.distributed`` on localhost, CPU collectives
via gloo): two processes of 4 host devices each train one model sharded
over all 8 under ``jit`` with clip_by_global_norm, adagc, guard and
monitor; a NaN reaches one process's shard only. Both processes must take
the same skip decisions, read the same figures, and end with the params of
a single-process run on 8 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import multiprocess_worker as worker

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(n: int, tmp: Path) -> list[Path]:
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
                 "PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  outs = [tmp / f"proc{i}.npz" for i in range(n)]
  logs = [open(tmp / f"proc{i}.log", "wb") for i in range(n)]
  procs = []
  try:
    for i in range(n):
      procs.append(subprocess.Popen(
          [sys.executable, str(HERE / "multiprocess_worker.py"),
           "--out", str(outs[i]), "--process-id", str(i),
           "--num-processes", str(n), "--port", str(port), "--devices", "4"],
          env=env, stdout=logs[i], stderr=subprocess.STDOUT, cwd=str(tmp)))
    for i, p in enumerate(procs):
      try:
        rc = p.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        rc = None
      if rc != 0:
        logs[i].flush()
        tail = (tmp / f"proc{i}.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"process {i} exited with {rc}:\n{tail}")
  finally:
    for p in procs:  # never leave a process behind
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for f in logs:
      f.close()
  return outs


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices")
def test_two_processes_agree_with_one(tmp_path):
  a, b = (np.load(p) for p in _launch(2, tmp_path))
  for r in (a, b):
    assert int(r["process_count"]) == 2 and int(r["local_devices"]) == 4
    assert list(r["owner"]) == [1]  # the NaN rows live on process 1 only
  # the same decisions and figures, bit for bit, on both processes
  np.testing.assert_array_equal(a["skips"], b["skips"])
  assert list(a["keys"]) == list(b["keys"])
  assert a["figures"].tobytes() == b["figures"].tobytes()
  skips = list(a["skips"])
  assert skips[worker.NAN_STEP] and sum(skips) == 1, skips
  for k in ("w1", "w2", "b"):
    assert a[f"param_{k}"].tobytes() == b[f"param_{k}"].tobytes()

  # the single-process run on 8 devices (this process: see conftest.py)
  skips1, figs1, params1, owner1 = worker.train(jax.devices()[:8])
  assert skips1 == skips and owner1 == {0}
  keys = list(a["keys"])
  ref = np.stack([np.stack([np.asarray(f[k], np.float64).reshape(())
                            for k in keys]) for f in figs1])
  np.testing.assert_allclose(a["figures"], ref, rtol=1e-5, atol=1e-7)
  for k in ("w1", "w2", "b"):  # all-reduce order may differ: to rounding
    np.testing.assert_allclose(a[f"param_{k}"], params1[k], rtol=1e-5,
                               atol=1e-6)
  assert all(np.all(np.isfinite(params1[k])) for k in params1)
