"""Shared pytest fixtures.

The offline benchmark data (GSM8K, MATH500, MBPP, countdown, sudoku) is never copied into the repo:
`.ci/run` passes its location in ``DMPO_JAX_DATA_DIR``; by default it is ``../shared/data`` next to
the repository checkout.
"""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("DMPO_JAX_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  path = shared_data_dir()
  if not path.is_dir():
    raise FileNotFoundError(
        f"Benchmark data folder {path} not found: set DMPO_JAX_DATA_DIR to the shared/data folder")
  return path
