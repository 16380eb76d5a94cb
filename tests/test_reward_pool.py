"""`RewardPool` with code rewards (`docs/sandbox.md` §5): a bad program never aborts the step or
orphans another call's sandbox, a stuck call's worker goes with everything it started, a
replacement worker never starts on changed code, and timeouts below the sandbox's longest run
are refused when the config loads. Each test watches for left-over sandbox processes and
folders in a private temporary folder."""

import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
import pytest

from tests.helpers import sandbox_attacks, sandbox_users
from dmpo_jax import sandbox
from dmpo_jax.tasks import get_task, reward_pool

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
LANDLOCK = sandbox.SandboxConfig(cpu_time_s=3, wall_time_s=8.0, use_namespaces=False,
                                 audit_hook=False)


@pytest.fixture()
def private_tmp(monkeypatch):
  """A private temporary folder for this process and its workers (so leftovers are visible)."""
  folder = pathlib.Path(tempfile.mkdtemp(prefix="pool_tmp_"))
  os.chmod(folder, 0o755)
  monkeypatch.setenv("TMPDIR", str(folder))
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  monkeypatch.setenv("DMPO_JAX_DATA_DIR", str(FIXTURES))
  yield folder
  sandbox.remove_tree(str(folder))


def leftovers(folder):
  """(processes whose working folder lies in ``folder``, sandbox run folders in it)."""
  processes = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if os.readlink(f"/proc/{pid}/cwd").startswith(str(folder)):
        processes.append(int(pid))
    except OSError:
      pass
  runs = [p for p in folder.rglob("dmpo_*") if p.name.startswith(("dmpo_sandbox_", "dmpo_judge_"))]
  return processes, runs


def no_leftovers(folder, grace_s=3.0):
  deadline = time.monotonic() + grace_s
  while leftovers(folder) != ([], []) and time.monotonic() < deadline:
    time.sleep(0.1)
  return leftovers(folder) == ([], [])


def mbpp_example():
  return get_task("mbpp").load_eval(data_dir=FIXTURES)[0]


def test_one_bad_program_never_aborts_the_step(private_tmp):
  """Real-time signal 40 on the program made run_program raise, RewardPool abort the step and
  kill the other in-flight worker, orphaning its sandbox."""
  example = mbpp_example()
  bad = sandbox_attacks.program_completion("mbpp", example, sandbox_attacks.RT_SIGNAL_TIMER)
  slow_good = sandbox_attacks.fenced("import time\ntime.sleep(1.0)\n" + example["code"])
  pool = reward_pool.RewardPool("mbpp", "fixed", 2, sandbox=LANDLOCK)
  try:
    rewards = pool([bad, slow_good, bad], [example] * 3)
    np.testing.assert_array_equal(rewards, [0.0, 1.0, 0.0])
    assert pool.last_failures == [] and pool.replaced_workers == 0
    assert no_leftovers(private_tmp)
  finally:
    pool.close()


def test_a_raising_reward_lets_the_calls_in_flight_finish(private_tmp):
  """A reward that raises (an example without its tests) propagates only after the other call
  in flight finished: its worker is not killed, its sandbox not orphaned (they were)."""
  example = mbpp_example()
  broken = {k: v for k, v in example.items() if k != "test_list"}
  broken["code"] = "x = 1\n" * 20000  # parsed before the missing tests are noticed
  correct = sandbox_attacks.correct_completion("mbpp", example)
  slow_good = sandbox_attacks.fenced("import time\ntime.sleep(3)\n" + example["code"])
  pool = reward_pool.RewardPool("mbpp", "fixed", 2, sandbox=LANDLOCK)
  try:
    np.testing.assert_array_equal(pool([correct] * 2, [example] * 2), [1.0, 1.0])  # both ready
    with pytest.raises(RuntimeError, match="KeyError"):
      pool([slow_good, "```python\nx = 1\n```"], [example, broken])  # slow call starts first
    assert pool.replaced_workers == 0
    assert leftovers(private_tmp) == ([], [])  # no wait: nothing was cut off
    np.testing.assert_array_equal(pool([slow_good], [example]), [1.0])
  finally:
    pool.close()


def test_a_stuck_call_takes_its_sandbox_with_it(private_tmp):
  """A call past the pool's limit (here below the sandbox's own, as a programmatic caller may
  set) scores 0; its worker is replaced, and its sandbox processes and folders are gone."""
  example = mbpp_example()
  sleeper = sandbox_attacks.program_completion("mbpp", example, "import time\ntime.sleep(60)\n")
  correct = sandbox_attacks.correct_completion("mbpp", example)
  pool = reward_pool.RewardPool("mbpp", "fixed", 1, timeout_s=3.0, sandbox=LANDLOCK)
  try:
    np.testing.assert_array_equal(pool([sleeper, correct], [example] * 2), [0.0, 1.0])
    assert [i for i, _ in pool.last_failures] == [0] and pool.replaced_workers == 1
    assert no_leftovers(private_tmp)
  finally:
    pool.close()
  assert list(private_tmp.iterdir()) == []


def test_a_replacement_worker_never_starts_on_changed_code(private_tmp, monkeypatch):
  """The pool hashes the project's code when it starts; a worker is replaced only if the code
  still hashes the same (here a copy of the package stands for the installed project)."""
  copy = private_tmp / "installed" / "dmpo_jax"
  shutil.copytree(REPO / "dmpo_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
  monkeypatch.setattr(reward_pool, "_PACKAGE", copy)
  example = mbpp_example()
  sleeper = sandbox_attacks.program_completion("mbpp", example, "import time\ntime.sleep(60)\n")
  pool = reward_pool.RewardPool("mbpp", "fixed", 1, timeout_s=2.0, sandbox=LANDLOCK)
  try:
    np.testing.assert_array_equal(pool([sleeper], [example]), [0.0])  # replaced: code unchanged
    with open(copy / "tasks" / "code_tasks.py", "a") as f:
      f.write("\ndef code_reward(*args, **kwargs):\n  return 1.0\n")
    with pytest.raises(RuntimeError, match="code changed"):
      pool([sleeper], [example])
  finally:
    pool.close()


def _config(task, timeout):
  from configs import demo  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  config.task.name = task
  config.task.reward_timeout_s = timeout
  return config


def test_timeouts_below_the_sandbox_run_are_refused_at_config_load():
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  longest = sandbox.SandboxConfig(wall_time_s=10.0).max_duration_s  # the base config's sandbox
  assert longest == 22.0
  for timeout in (3.0, 10.0, 21.9):
    with pytest.raises(loop.ConfigError, match=r"task.reward_timeout_s=.* is below the code "
                                               r"sandbox's longest run, 22 s"):
      loop.validate_config(_config("mbpp", timeout), num_devices=1)
  for timeout in (0.0, 22.0, 60.0):
    loop.validate_config(_config("mbpp", timeout), num_devices=1)
  loop.validate_config(_config("gsm8k", 3.0), num_devices=1)  # text tasks: any positive limit
  config = _config("humaneval", 0.0)
  config.sandbox.wall_time_s = 2.0
  config.task.reward_timeout_s = 5.0
  with pytest.raises(loop.ConfigError, match="below the code sandbox's longest run, 6 s"):
    loop.validate_config(config, num_devices=1)
  config.sandbox.bogus = 1
  with pytest.raises(loop.ConfigError, match=r"unknown sandbox key\(s\) \['bogus'\]"):
    loop.validate_config(config, num_devices=1)


@pytest.mark.slow
def test_non_root_trainer_survives_attacks_through_the_pool():
  """As uid 65534 with an editable install of its own: a program cannot overwrite the main
  trainer's memory through /proc/<ancestor>/mem, cannot append ``code_reward = 1.0`` to the
  installed project and outlive its call so that the replaced worker loads it — in each mode
  (user namespaces, Landlock, unisolated with its write ban)."""
  completed = sandbox_users.run_repo_as_user(
      REPO / "tests" / "helpers" / "untrusted_trainer.py", [REPO, FIXTURES],
      env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  out = json.loads(completed.stdout.splitlines()[-1])
  for mode, seen in out.items():
    assert seen["canary"] == "CANARY-UNTOUCHED" and not seen["code_changed"], (mode, seen)
    assert seen["first"] == [0.0, 0.0] and seen["after"] == [0.0, 1.0], (mode, seen)
    assert seen["replaced"] == 1 and [i for i, _ in seen["failures"]] == [1], (mode, seen)
