"""Shared pytest fixtures.

Two data folders:

* ``fixture_data_dir``: ``tests/fixtures/data``, a few hand-written rows per benchmark file in the
  data-folder layout. Every loader and task is tested on it, on any machine.
* ``benchmark_data_dir``: the full benchmark files (``launch/prepare_data.py`` writes them), named
  by ``DMPO_JAX_DATA_DIR``; `.ci/run` sets it. Without it the checks on the full files are skipped,
  and the skip reason says so.
"""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DATA_DIR = REPO_ROOT / "tests" / "fixtures" / "data"


@pytest.fixture(scope="session")
def fixture_data_dir() -> pathlib.Path:
  return FIXTURE_DATA_DIR


@pytest.fixture(scope="session")
def benchmark_data_dir() -> pathlib.Path:
  value = os.environ.get("DMPO_JAX_DATA_DIR")
  if not value:
    pytest.skip("DMPO_JAX_DATA_DIR is not set: the checks on the full benchmark files did not run "
                "(the loaders are tested on tests/fixtures/data)")
  path = pathlib.Path(value).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"DMPO_JAX_DATA_DIR={value} is not a folder")
  return path
