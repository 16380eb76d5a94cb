"""Sandbox attacks (`tasks.md` §6.3): each scores 0 with a reason, in bounded time, and leaves the
machine as it was. The OS-level layers are also checked with the audit hook switched off."""

import dataclasses
import os
import pathlib
import time

import pytest

from dmpo_jax.tasks import get_task, sandbox

CONFIG = sandbox.SandboxConfig(cpu_time_s=1, wall_time_s=2.5, memory_bytes=512 << 20,
                               file_size_bytes=256 << 10)
NO_HOOK = sandbox.SandboxConfig(cpu_time_s=1, wall_time_s=2.5, memory_bytes=512 << 20,
                                file_size_bytes=256 << 10, audit_hook=False)
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture()
def canary(tmp_path_factory):
  folder = pathlib.Path("/tmp") / f"dmpo_canary_{os.getpid()}"
  folder.mkdir(exist_ok=True)
  (folder / "keep.txt").write_text("keep")
  os.chmod(folder, 0o777)  # world-writable on purpose: only the sandbox may stop the attack
  os.chmod(folder / "keep.txt", 0o666)
  yield folder
  for child in folder.iterdir():
    child.unlink()
  folder.rmdir()


def run_bounded(source, config=CONFIG, bound=12.0):
  start = time.monotonic()
  result = sandbox.run_program(source, config)
  assert time.monotonic() - start < bound, result
  return result


def assert_zero(result, *statuses):
  assert not result.passed, result
  assert result.reason, result
  if statuses:
    assert result.status in statuses, result


def test_correct_program_passes_as_nobody():
  result = run_bounded("import collections.abc, os, resource\nassert sum(range(4)) == 6\n"
                       "print(os.getuid(), resource.getrlimit(resource.RLIMIT_NPROC))\n")
  assert result.passed, result
  if os.geteuid() == 0:
    assert result.protections["dropped_privileges"]
    assert result.output.split()[0] == str(sandbox.NOBODY_UID)


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_infinite_loop_and_sleep(config):
  assert_zero(run_bounded("while True:\n  pass\n", config), "timeout")
  assert_zero(run_bounded("import time\ntime.sleep(60)\n", config), "timeout")


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_fork_bomb_and_threads(config):
  before = len(os.listdir("/proc"))
  result = run_bounded("import os\nwhile True:\n  os.fork()\n", config)
  assert_zero(result, "forbidden" if config.audit_hook else "failed")
  if not config.audit_hook:
    assert "BlockingIOError" in result.reason or "Resource temporarily" in result.reason
  assert_zero(run_bounded("import threading\nthreading.Thread(target=print).start()\n", config))
  assert len(os.listdir("/proc")) <= before + 5  # no leftover processes


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_memory_bomb(config):
  # A larger CPU budget here: zeroing pages is CPU time, and on a loaded machine the 1 s limit of
  # the other attacks could fire before the address-space limit this test is about.
  config = dataclasses.replace(config, cpu_time_s=5, wall_time_s=8.0)
  assert_zero(run_bounded("x = bytearray(2 << 30)\n", config), "memory_limit")
  assert_zero(run_bounded("x = []\nwhile True:\n  x.append(bytearray(10**8))\n", config), "memory_limit")


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_shell_and_subprocess(config, canary):
  target = canary / "pwned"
  result = run_bounded(f"import os\nassert os.system('touch {target}') == 0\n", config)
  assert_zero(result)
  result = run_bounded(f"import subprocess\nsubprocess.run(['touch', '{target}'])\n", config)
  assert_zero(result)
  assert not target.exists()


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_files_outside_the_folder(config, canary):
  keep = canary / "keep.txt"
  assert_zero(run_bounded(f"import os\nos.remove('{keep}')\n", config))
  assert_zero(run_bounded(f"open('{canary / 'new.txt'}', 'w').write('x')\n", config))
  assert_zero(run_bounded(f"import shutil\nshutil.rmtree('{REPO / 'tests'}')\n", config))
  assert_zero(run_bounded(f"open('{REPO / 'pwned.txt'}', 'w').write('x')\n", config))
  assert keep.read_text() == "keep" and sorted(p.name for p in canary.iterdir()) == ["keep.txt"]
  assert (REPO / "tests" / "conftest.py").exists() and not (REPO / "pwned.txt").exists()
  # Its own folder is writable.
  assert run_bounded("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n",
                     config).passed


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_closed_stdout_and_early_exit(config):
  assert_zero(run_bounded("import os\nos.close(1)\n", config))
  assert_zero(run_bounded("import os\nos.closerange(0, 4096)\n", config), "no_result")
  assert_zero(run_bounded("import sys\nsys.exit(0)\nassert False\n", config))
  assert_zero(run_bounded("import os\nos._exit(0)\n", config), "no_result")


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_endless_output(config):
  result = run_bounded("while True:\n  print('x' * 1000)\n", config)
  assert_zero(result, "output_limit")
  assert len(result.output) <= 2000


def test_network_is_blocked():
  result = run_bounded("import socket\ns = socket.socket()\ns.settimeout(2)\n"
                       "s.connect(('1.1.1.1', 80))\n", NO_HOOK)
  assert_zero(result)
  assert_zero(run_bounded("import socket\nsocket.create_connection(('1.1.1.1', 80), 2)\n"),
              "forbidden")


def test_parallel_workers_and_code_reward():
  sources = ["assert 1 + 1 == 2\n", "while True: pass\n", "assert False\n", "x = 1\n"]
  start = time.monotonic()
  results = sandbox.run_programs(sources, CONFIG, max_workers=4)
  assert time.monotonic() - start < 8.0
  assert [r.passed for r in results] == [True, False, False, True]
  task = get_task("humaneval")
  example = task.lookup("HumanEval/0")
  good = "```python\n" + example["prompt"] + example["canonical_solution"] + "\n```"
  bad = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
  (_, reward), = task.reward_functions("fixed")
  assert reward(good, example) == 1.0 and reward(bad, example) == 0.0
  assert reward("no code here", example) == 0.0
