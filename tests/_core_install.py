"""The start of a subprocess script that behaves as the core install: the
``demo`` extra's packages (flax, matplotlib, rich) cannot be imported."""

BLOCK_EXTRAS = r"""
import importlib.abc, sys
BLOCKED = {"flax", "matplotlib", "rich"}
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""
