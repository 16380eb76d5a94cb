"""Rollouts: prompt encoding and bucketing, decoding, parallel rewards, the RL batch.

The sampler runs on the training devices, on the policy resharded once per RL step to the
sampling layout (`dmpo_jax.sampling_layout`); this module prepares its inputs and turns its
outputs into the RL batch contract of `dmpo_jax.rl.scoring`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from typing import Any, Sequence

import numpy as np

from dmpo_jax.diffusion import sampler as sampler_lib
from dmpo_jax.tasks import base as task_base


def sampler_config(block: Any, **fixed: Any) -> sampler_lib.SamplerConfig:
  """The `SamplerConfig` of a config block (``config.rollout``): every key that names a
  `SamplerConfig` field is passed on, with the config's "off" values ``threshold`` / ``factor``
  ≤ 0 and ``max_tokens_per_step`` ≤ 0 meaning None; ``fixed`` overrides (e.g. the trace).
  A key that is no sampler field, or a bad value, raises ValueError naming it."""
  fields = {f.name for f in dataclasses.fields(sampler_lib.SamplerConfig)}
  values = dict(block.items()) if hasattr(block, "items") else dict(block)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"unknown sampler key(s) {unknown}; known {sorted(fields)}")
  for name in ("threshold", "factor", "max_tokens_per_step"):
    if name in values and values[name] is not None and values[name] <= 0:
      values[name] = None
  values.update(fixed)
  return sampler_lib.SamplerConfig(**values)


def prompt_token_ids(tokenizer: Any, task: task_base.Task, example: dict, *,
                     evaluation: bool = False) -> list[int]:
  """Token ids of one prompt: the task's (training or evaluation) prompt rendered with the chat
  template and its prefill, or, for tasks with ``use_chat_template = False`` (the demo), the
  user content + prefill encoded directly."""
  spec = task.eval_prompt(example) if evaluation else task.train_prompt(example)
  if getattr(task, "use_chat_template", True):
    return list(tokenizer.encode_chat(spec.messages, prefill=spec.prefill))
  return list(tokenizer.encode(spec.messages[-1]["content"] + spec.prefill))


def encode_prompts(tokenizer: Any, task: task_base.Task, examples: Sequence[dict], *,
                   prompt_length: int, evaluation: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
  """Renders and tokenises prompts into a left-padded bucket of ``prompt_length``.

  Chat-template tasks use ``tokenizer.encode_chat(messages, prefill)``; tasks with
  ``use_chat_template = False`` (the demo) encode the user content + prefill directly. Prompts
  longer than the bucket keep their last ``prompt_length`` tokens (as the reference trainers do);
  the number truncated is returned so the caller can log it.

  Returns (ids int32 [N, P] padded with the pad id, prompt_mask bool [N, P], num_truncated).
  """
  if prompt_length <= 0:
    raise ValueError(f"prompt_length must be positive, got {prompt_length}")
  ids = np.full((len(examples), prompt_length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(examples), prompt_length), bool)
  truncated = 0
  for row, example in enumerate(examples):
    tokens = prompt_token_ids(tokenizer, task, example, evaluation=evaluation)
    if len(tokens) > prompt_length:
      truncated += 1
      tokens = tokens[-prompt_length:]
    ids[row, prompt_length - len(tokens):] = tokens
    mask[row, prompt_length - len(tokens):] = True
  return ids, mask, truncated


def completion_token_ids(sequences: np.ndarray, prompt_length: int,
                         stop_ids: Sequence[int]) -> list[list[int]]:
  """Completion ids per row, cut before the first stop id (EOS / EOT)."""
  out = []
  for row in np.asarray(sequences)[:, prompt_length:]:
    stops = np.flatnonzero(np.isin(row, list(stop_ids)))
    out.append(row[: stops[0] if stops.size else len(row)].tolist())
  return out


def decode_completions(tokenizer: Any, sequences: np.ndarray, prompt_length: int) -> list[str]:
  """Completion text of each row: ids up to the first EOS/EOT, special tokens skipped."""
  stop_ids = [i for i in (tokenizer.eos_token_id, tokenizer.eot_token_id) if i is not None]
  return [tokenizer.decode(ids, skip_special_tokens=True)
          for ids in completion_token_ids(sequences, prompt_length, stop_ids)]


def _total_reward(args) -> float:
  task_name, style, completion, example = args
  return task_base.get_task(task_name).total_reward(completion, example, style)


# Per-call wall limit of a reward (seconds) when none is given: generous for text rewards (they
# take <= 50 ms; math-verify has its own 2 s limit plus a restart after a timeout), and the
# sandbox's wall limit plus a margin for code.
TEXT_REWARD_TIMEOUT_S = 30.0
CODE_REWARD_MARGIN_S = 15.0


def default_reward_timeout(task_name: str) -> float:
  task = task_base.get_task(task_name)
  sandbox_config = getattr(task, "config", None)
  wall = getattr(sandbox_config, "wall_time_s", None)
  return float(wall) + CODE_REWARD_MARGIN_S if wall else TEXT_REWARD_TIMEOUT_S


def _reward_worker(connection, task_name: str, style: str) -> None:
  """Worker loop: own process group (so the pool can kill it with anything it started), killed
  with its parent where the OS allows (PR_SET_PDEATHSIG); answers (index, value, error)."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  try:
    os.setpgrp()
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  task = task_base.get_task(task_name)
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


class _Worker:
  """One reward worker process and the job it is running."""

  def __init__(self, context, task_name: str, style: str):
    self.connection, child = context.Pipe()
    self.process = context.Process(target=_reward_worker, args=(child, task_name, style),
                                   daemon=True)
    self.process.start()
    child.close()
    self.ready = False
    self.job = None  # (index, deadline)

  def kill(self) -> None:
    import os  # pylint: disable=import-outside-toplevel
    import signal  # pylint: disable=import-outside-toplevel
    try:
      os.killpg(self.process.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
      self.process.kill()
    self.process.join(5)
    self.connection.close()


class RewardPool:
  """Computes rewards in parallel worker processes (``num_workers`` = 0: in this process).

  Workers are started with ``spawn`` (safe next to JAX's threads). With workers, every call (the
  total reward of one completion) has a wall-clock limit, ``timeout_s`` (default
  `default_reward_timeout`): a call past it scores 0, its reason is recorded in
  ``last_failures`` (index, reason), and its worker is killed with everything it started and
  replaced. In-process rewards (``num_workers`` = 0, the demo) have no limit. A reward function
  that raises is a bug in the task and propagates with the offending completion in the message.
  """

  def __init__(self, task_name: str, reward_style: str, num_workers: int = 0,
               timeout_s: float | None = None):
    task_base.get_task(task_name)  # fail fast on unknown task names
    task_base.check_reward_style(reward_style)
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    self.task_name, self.reward_style = task_name, reward_style
    self.timeout_s = float(timeout_s) if timeout_s else default_reward_timeout(task_name)
    self.last_failures: list[tuple[int, str]] = []
    self.replaced_workers = 0
    self._context = multiprocessing.get_context("spawn")
    self._workers = [self._new_worker() for _ in range(num_workers)]

  def _new_worker(self) -> _Worker:
    return _Worker(self._context, self.task_name, self.reward_style)

  def __call__(self, completions: Sequence[str], examples: Sequence[dict]) -> np.ndarray:
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    self.last_failures = []
    if not self._workers:
      return np.asarray([_total_reward((self.task_name, self.reward_style, c, e))
                         for c, e in zip(completions, examples)], np.float32)
    return np.asarray(self._run(list(completions), list(examples)), np.float32)

  def _run(self, completions: list, examples: list) -> list:
    import time  # pylint: disable=import-outside-toplevel
    from multiprocessing import connection as mp_connection  # pylint: disable=import-outside-toplevel
    rewards: list = [None] * len(completions)
    queue = list(range(len(completions)))[::-1]
    remaining = len(completions)

    def fail(worker_index: int, reason: str) -> None:
      nonlocal remaining
      worker = self._workers[worker_index]
      if worker.job is not None:
        index = worker.job[0]
        rewards[index] = 0.0
        self.last_failures.append((index, reason))
        remaining -= 1
      worker.kill()
      self._workers[worker_index] = self._new_worker()
      self.replaced_workers += 1

    while remaining:
      for worker in self._workers:
        if worker.ready and worker.job is None and queue:
          index = queue.pop()
          worker.connection.send((index, completions[index], examples[index]))
          worker.job = (index, time.monotonic() + self.timeout_s)
      deadlines = [w.job[1] for w in self._workers if w.job is not None]
      wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
      ready = mp_connection.wait([w.connection for w in self._workers], timeout=wait_s)
      for worker_index, worker in enumerate(list(self._workers)):
        if worker.connection not in ready:
          continue
        try:
          index, value, error = worker.connection.recv()
        except (EOFError, OSError):
          if not worker.ready:
            worker.process.join(5)
            raise RuntimeError(f"a reward worker for task {self.task_name} failed to start "
                               f"(exit code {worker.process.exitcode})") from None
          fail(worker_index, f"reward worker died (exit code {worker.process.exitcode})")
          continue
        if index == "ready":
          worker.ready = True
          continue
        worker.job = None
        if error is not None:
          for other_index, other in enumerate(self._workers):
            if other.job is not None:  # drop in-flight calls so no stale answer reaches a later call
              other.job = None
              other.kill()
              self._workers[other_index] = self._new_worker()
          raise RuntimeError(f"reward of task {self.task_name} (style {self.reward_style}) raised "
                             f"{error} on completion {completions[index][:2000]!r}")
        rewards[index] = value
        remaining -= 1
      now = time.monotonic()
      for worker_index, worker in enumerate(list(self._workers)):
        if worker.job is not None and worker.job[1] <= now:
          fail(worker_index, f"reward call exceeded the {self.timeout_s:g} s wall limit")
    return rewards

  def close(self) -> None:
    for worker in self._workers:
      if worker.process.is_alive():
        try:
          worker.connection.send(None)
        except OSError:
          pass
        worker.process.join(2)
      if worker.process.is_alive():
        worker.kill()
      else:
        worker.connection.close()
    self._workers = []


def rl_batch(sequences: np.ndarray, prompt_mask: np.ndarray, rewards: np.ndarray,
             group_ids: np.ndarray, example_ids: np.ndarray) -> dict[str, np.ndarray]:
  """The RL batch contract of `dmpo_jax.rl.scoring` from a sampled canvas [B, P + L]."""
  b, total = sequences.shape
  p = prompt_mask.shape[1]
  completion = np.zeros((b, total), bool)
  completion[:, p:] = True
  return {
      "sequences": np.asarray(sequences, np.int32),
      "attention_mask": np.concatenate([prompt_mask, np.ones((b, total - p), bool)], axis=1),
      "prompt_mask": ~completion,
      "completion_mask": completion,
      "rewards": np.asarray(rewards, np.float32),
      "group_ids": np.asarray(group_ids, np.int32),
      "example_ids": np.asarray(example_ids, np.int32),
  }


def group_reward_stats(rewards: np.ndarray, group_ids: np.ndarray) -> dict[str, float]:
  """Reward mean/std over the batch and the fraction of groups whose rewards are all equal."""
  groups = {}
  for r, g in zip(rewards, group_ids):
    groups.setdefault(int(g), []).append(float(r))
  zero_std = np.mean([np.std(v) == 0 for v in groups.values()]) if groups else 0.0
  return {"reward/mean": float(np.mean(rewards)), "reward/std": float(np.std(rewards)),
          "reward/zero_std_group_fraction": float(zero_std)}
