"""Issue 23, defect 6: one true install path, the version in one place, a
benchmark's --help on the core install."""

import re
import subprocess
import sys
from pathlib import Path

import gradtransforms as gt
from _core_install import BLOCK_EXTRAS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()

_BLOCK = BLOCK_EXTRAS + r"""
from gradtransforms.__main__ import main
try:
  rc = main(sys.argv[1:])
except SystemExit as e:
  rc = e.code
assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
print("RC", rc)
"""


def _blocked(*argv):
  out = subprocess.run([sys.executable, "-c", _BLOCK, *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout, out.stderr


def test_version_is_in_one_place_and_true():
  assert gt.__version__ == "0.2.0"
  assert 'dynamic = ["version"]' in PYPROJECT
  assert 'version = { attr = "gradtransforms.__version__" }' in PYPROJECT
  assert not re.search(r'^version\s*=\s*"', PYPROJECT, re.M)  # not written twice
  changelog = README[README.index("## Changelog"):]
  first = re.search(r"^### (\S+)", changelog, re.M).group(1)
  assert first == gt.__version__  # the newest entry describes this version
  out = subprocess.run([sys.executable, "-m", "gradtransforms", "--version"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == f"gradtransforms {gt.__version__}"


def test_install_path_is_a_checkout_or_a_wheel_not_a_placeholder():
  install = README[README.index("## Install"):README.index("## Quick start")]
  assert "pip install ." in install and "python -m build" in install
  assert "git+https://" not in README
  assert "github.com/gradtransforms" not in README + PYPROJECT
  for wheel in re.findall(r"gradtransforms-([\d.]+)-py3", install):
    assert wheel == gt.__version__


def test_bench_help_works_without_the_demo_extra():
  out, _ = _blocked("bench", "overhead", "--help")
  assert out.startswith("usage: gradtransforms bench overhead")
  for option in ("--quick", "--sizes", "--stacked", "--out", "--replot-from"):
    assert option in out
  assert "gradtransforms[demo]" in out and out.rstrip().endswith("RC 0")
  # a parser whose choices need the extra: its description, and what to install
  out, _ = _blocked("bench", "stability", "-h")
  assert "usage: gradtransforms bench stability" in out
  assert "gradtransforms[demo]" in out and "RC 0" in out
  # running (not help) still says which extra to install, as a usage error
  out, err = _blocked("bench", "overhead", "--quick")
  assert "RC 2" in out and "gradtransforms[demo]" in err
