"""Rewards in worker processes, each call under a wall limit (`docs/tasks.md` §9.2, `docs/sandbox.md` §5).

A call past its limit scores 0 and its worker is killed (with everything it started: the
sandbox processes die with it through their parent-death signal) and replaced. What keeps a
misbehaving program from changing what the next worker runs: the program never sees the project
(`docs/sandbox.md` §4), and before starting a replacement the pool checks that the project's
code still hashes as it did when the pool started. One call that raises never kills another
call's worker: the calls in flight finish first, then the error propagates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dmpo_jax import sandbox as sandbox_lib
from dmpo_jax.tasks import base as task_base, timeout_pool
# A code task's sandbox settings (`_CodeTask.configure` applies them, `config_errors` checks them).
from dmpo_jax.tasks.code_tasks import SANDBOX_KEYS, sandbox_from_config, task_sandbox  # noqa: F401

# Per-call wall limit when none is given: generous for text rewards (they take <= 50 ms;
# math-verify has its own 2 s limit and a restart after a timeout), and for code the sandbox's
# longest run (`SandboxConfig.max_duration_s`) plus a margin for the worker's own work.
TEXT_REWARD_TIMEOUT_S = 30.0
CODE_REWARD_MARGIN_S = 5.0
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # dmpo_jax/


def default_reward_timeout(task_name: str,
                           sandbox: Optional[sandbox_lib.SandboxConfig] = None) -> float:
  sandbox = sandbox or task_sandbox(task_base.get_task(task_name))
  return sandbox.max_duration_s + CODE_REWARD_MARGIN_S if sandbox else TEXT_REWARD_TIMEOUT_S


def config_errors(config: Any) -> List[str]:
  """Config-load checks of the reward settings: ``config.sandbox`` is valid, and a code task's
  ``task.reward_timeout_s`` (0 = default) is not below the sandbox's longest run, which would
  kill calls mid-run."""
  try:
    task = task_base.get_task(config.task.name)
  except KeyError:
    return []  # reported by the task-name check
  try:
    sandbox = sandbox_from_config(config, task)
  except (TypeError, ValueError) as e:
    return [f"sandbox: {e}"]
  timeout = config.task.get("reward_timeout_s", 0.0)
  if sandbox is not None and timeout and timeout < sandbox.max_duration_s:
    return [f"task.reward_timeout_s={timeout:g} is below the code sandbox's longest run, "
            f"{sandbox.max_duration_s:g} s (2 x sandbox.wall_time_s={sandbox.wall_time_s:g} for "
            f"the run and its cleanup, + {sandbox_lib.limits.KILL_MARGIN_S:g} s): use 0 (the "
            f"default, {default_reward_timeout(config.task.name, sandbox):g} s) or at least "
            f"{sandbox.max_duration_s:g}"]
  return []


def code_digest(package: Optional[pathlib.Path] = None) -> Dict[str, str]:
  """sha256 of every ``.py`` file of the package (default: this project's), by relative path."""
  package = package or _PACKAGE
  return {str(path.relative_to(package)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(package.rglob("*.py"))}


def _total_reward(args) -> float:
  task_name, style, completion, example = args
  return task_base.get_task(task_name).total_reward(completion, example, style)


def _reward_worker(connection, task_name: str, style: str,
                   sandbox: Optional[sandbox_lib.SandboxConfig], temp_root: str) -> None:
  """Worker loop: own process group, killed with its parent where the OS allows
  (PR_SET_PDEATHSIG), not dumpable when not root; answers (index, value, error)."""
  import signal  # pylint: disable=import-outside-toplevel
  try:
    os.setpgrp()
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  task = task_base.get_task(task_name)
  if sandbox is not None:
    if os.geteuid() != 0:
      sandbox_lib.protect_process()
    task.config = dataclasses.replace(sandbox, temp_root=temp_root)
  connection.send(("ready", None, None))
  while True:
    try:
      job = connection.recv()
    except (EOFError, OSError):
      return
    if job is None:
      return
    index, completion, example = job
    try:
      connection.send((index, float(task.total_reward(completion, example, style)), None))
    except Exception as e:  # pylint: disable=broad-except
      connection.send((index, None, f"{type(e).__name__}: {e}"))


class _RewardWorker(timeout_pool.SpawnedWorker):
  """A `_reward_worker` process and its host folder for sandbox runs (removed when it is killed)."""

  def __init__(self, task_name: str, style: str, sandbox: Optional[sandbox_lib.SandboxConfig],
               folder: str):
    self.folder = folder
    super().__init__(_reward_worker, (task_name, style, sandbox, folder))

  def kill(self) -> None:
    super().kill()
    # Its sandbox processes die with it (parent-death signal); what they left goes now.
    for _ in range(20):
      if sandbox_lib.remove_tree(self.folder):
        break
      time.sleep(0.05)
    else:
      sandbox_lib.REAPER.add(self.folder)


class RewardPool:
  """Computes rewards in parallel worker processes (``num_workers`` = 0: in this process).

  Workers are started with ``spawn`` (safe next to JAX's threads) and run by the
  `timeout_pool.TimeoutPool`. With workers, every call (the total reward of one completion) has a
  wall-clock limit, ``timeout_s`` (default `default_reward_timeout`; `config_errors` refuses a
  code task's below ``sandbox.max_duration_s`` at config load): a call past it scores 0, its
  reason is recorded in ``last_failures`` (index, reason), and its worker is killed (its sandbox
  processes with it, their folders removed) and replaced, after the project's code is checked
  unchanged. In-process rewards (``num_workers`` = 0, the demo) have no limit. A reward function
  that raises is a bug in the task: the other calls in flight finish, then it propagates with the
  offending completion.

  For a code task, ``sandbox`` (default: the task's) is used by the workers and by this
  process's task (in-process rewards, evaluation); the sandbox's mode is logged once and
  `sandbox.SandboxRefused` raised when it isolates nothing and that was not allowed; a non-root
  process is made not dumpable.
  """

  def __init__(self, task_name: str, reward_style: str, num_workers: int = 0,
               timeout_s: float | None = None,
               sandbox: Optional[sandbox_lib.SandboxConfig] = None):
    task = task_base.get_task(task_name)  # fail fast on unknown task names
    task_base.check_reward_style(reward_style)
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    self.task_name, self.reward_style = task_name, reward_style
    self.sandbox = sandbox or task_sandbox(task)
    self._digest: Optional[Dict[str, str]] = None
    if self.sandbox is not None:
      task.config = self.sandbox
      sandbox_lib.check(self.sandbox)
      if os.geteuid() != 0:
        sandbox_lib.protect_process()
      self._digest = code_digest()
    self.timeout_s = float(timeout_s) if timeout_s else default_reward_timeout(task_name,
                                                                               self.sandbox)
    self.last_failures: list[tuple[int, str]] = []
    self._root = tempfile.mkdtemp(prefix="dmpo_rewards_") if num_workers else None
    if self._root:
      os.chmod(self._root, 0o711)  # a dropped uid reaches its own run folder inside
    self._closed = False
    self._pool = (timeout_pool.TimeoutPool(self._new_worker, num_workers) if num_workers
                  else None)

  @property
  def replaced_workers(self) -> int:
    return self._pool.replaced_workers if self._pool else 0

  def _new_worker(self, slot: int) -> _RewardWorker:
    if self._digest is not None:
      changed = sorted(set(self._digest.items()) ^ set(code_digest().items()))
      if changed:
        raise RuntimeError(
            f"the project's code changed while the reward pool ran ({sorted({p for p, _ in changed})[:5]}); "
            "refusing to start a reward worker on it")
    folder = os.path.join(self._root, f"worker{slot}")
    sandbox_lib.remove_tree(folder)
    os.mkdir(folder, 0o711)
    return _RewardWorker(self.task_name, self.reward_style, self.sandbox, folder)

  def __call__(self, completions: Sequence[str], examples: Sequence[dict]) -> np.ndarray:
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    self.last_failures = []
    if self._closed:
      raise RuntimeError(f"the reward pool of task {self.task_name} is closed")
    if self._pool is None:
      return np.asarray([_total_reward((self.task_name, self.reward_style, c, e))
                         for c, e in zip(completions, examples)], np.float32)
    return np.asarray(self._run(list(completions), list(examples)), np.float32)

  def _run(self, completions: list, examples: list) -> list:
    errors = []  # (index, value, message) answers of calls that raised, in arrival order

    def raised(answer) -> bool:
      if answer[2] is not None:
        errors.append(answer)
      return answer[2] is not None

    try:
      results = self._pool.run([(i, c, e) for i, (c, e) in enumerate(zip(completions, examples))],
                               self.timeout_s, stop_on=raised)
    except timeout_pool.WorkerStartError as e:
      raise RuntimeError(f"a reward worker for task {self.task_name} failed to start "
                         f"(exit code {e.exit_code})") from None
    for index, status, exit_code in self._pool.last_failures:
      self.last_failures.append((index, f"reward call exceeded the {self.timeout_s:g} s wall limit"
                                 if status == timeout_pool.TIMEOUT else
                                 f"reward worker died (exit code {exit_code})"))
    if errors:
      index, _, message = errors[0]
      raise RuntimeError(f"reward of task {self.task_name} (style {self.reward_style}) raised "
                         f"{message} on completion {completions[index][:2000]!r}")
    return [answer[1] if status == timeout_pool.OK else 0.0 for status, answer in results]

  def close(self) -> None:
    self._closed = True
    if self._pool is not None:
      self._pool.close()
    if self._root:
      sandbox_lib.remove_tree(self._root)
