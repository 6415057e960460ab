"""Optional dependencies: a clear ImportError naming the extra to install.

The transforms need only jax, optax and numpy. The reference models and
tasks need Flax (``pip install 'gradtransforms[models]'``); the demo and the
benchmarks also need matplotlib and rich (``'gradtransforms[demo]'``).
"""

from __future__ import annotations

import importlib


def require(extra: str, *modules: str, what: str) -> None:
  """Raises ``ModuleNotFoundError`` naming ``extra`` if a module is missing."""
  missing = []
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise ModuleNotFoundError(
        f"{what} needs {', '.join(missing)}, which the core install of "
        f"gradtransforms does not include; install the extra: "
        f"pip install 'gradtransforms[{extra}]'", name=missing[0])
