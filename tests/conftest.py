"""Shared pytest fixtures, and two guards on the whole suite.

Two data folders:

* ``fixture_data_dir``: ``tests/fixtures/data``, a few hand-written rows per benchmark file in the
  data-folder layout. Every loader and task is tested on it, on any machine.
* ``benchmark_data_dir``: the full benchmark files (``launch/prepare_data.py`` writes them), named
  by ``DMPO_JAX_DATA_DIR``; `.ci/run` sets it. Without it the checks on the full files are skipped,
  and the skip reason says so.

Guards:

* Nothing compiles at import: collecting a test module that compiles an XLA program (a module-level
  ``jax.jit`` call, ``jax.random.key``, a dtype cast on the device) is a collection error naming
  the module. Build such values in a fixture or on first use (`tests/helpers/objective_setup.py`).
* No test writes into the repository: after each test module, ``git status`` (untracked and
  ignored files included, ``__pycache__`` excluded) must show no line it did not show before the
  module, or the module's last test errors with the paths. Tests write under ``tmp_path``; hypothesis keeps
  no example database (it would write ``.hypothesis/`` into the working folder).

* One import style: every module under ``tests/`` is imported as ``tests.<name>`` (shared helpers
  as ``from tests.helpers import hf_fixtures``), never a second time under a bare name after a
  ``sys.path`` insert; collection stops otherwise.
"""

import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import hypothesis
import hypothesis.configuration
import jax
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DATA_DIR = REPO_ROOT / "tests" / "fixtures" / "data"

# Hypothesis writes its example database and caches (charmaps, constants) under
# ``<working folder>/.hypothesis``: keep none of it, and put the caches in a temporary folder.
hypothesis.settings.register_profile("no_database", database=None)
hypothesis.settings.load_profile("no_database")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="hypothesis_")
hypothesis.configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)

# -- nothing compiles at import ------------------------------------------------------------------

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _count_compiles(event: str, duration_secs: float, **_) -> None:
  del duration_secs
  if event == _COMPILE_EVENT:
    _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """Fails the collection of a test module whose import compiled an XLA program."""
  before = _compiles[0]
  outcome = yield
  compiled = _compiles[0] - before
  report = outcome.get_result()
  if isinstance(collector, pytest.Module) and compiled and report.outcome == "passed":
    report.outcome = "failed"
    report.longrepr = (f"{collector.nodeid}: importing it compiled {compiled} XLA program(s); "
                       "build jitted values in a fixture or on first use, not at import")


def pytest_collection_finish(session):
  """Stops the run when a module under tests/ was imported under a second, bare name."""
  del session
  tests_dir = REPO_ROOT / "tests"
  bare = sorted(name for name, module in list(sys.modules.items())
                if getattr(module, "__file__", None) and not name.startswith("tests")
                and pathlib.Path(module.__file__).resolve().is_relative_to(tests_dir))
  if bare:
    raise pytest.UsageError(f"modules under tests/ imported by a bare name: {bare}; import them "
                            "as tests.<name> (helpers: from tests.helpers import <name>)")


# -- no test writes into the repository -----------------------------------------------------------


def _repository_state():
  """``git status`` lines (tracked changes, untracked and ignored files) without byte code; None
  outside a git checkout."""
  if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
    return None
  result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    return None
  return {line for line in result.stdout.splitlines()
          if "__pycache__/" not in line and not line.endswith(".pyc")}


@pytest.fixture(autouse=True, scope="module")
def _no_writes_into_the_repository():
  before = _repository_state()
  yield
  after = _repository_state()
  # New lines only: a line that went away is a commit or a clean-up made meanwhile.
  changed = sorted(after - before) if before is not None and after is not None else []
  if changed:
    pytest.fail("the tests of this module changed the repository (write under tmp_path): "
                + "; ".join(changed[:10]), pytrace=False)


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
