"""Rollouts: prompt encoding and bucketing, decoding, parallel rewards, the RL batch.

The sampler runs on the training devices, on the policy resharded once per RL step to the
sampling layout (`dmpo_jax.sampling_layout`); this module prepares its inputs and turns its
outputs into the RL batch contract of `dmpo_jax.rl.scoring`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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


def rl_batch(sequences: Any, prompt_mask: Any, rewards: Any, group_ids: Any,
             example_ids: Any) -> dict[str, Any]:
  """The RL batch contract of `dmpo_jax.rl.scoring` from a sampled canvas [B, P + L]: numpy
  arrays from host arrays, jax arrays from device arrays (also inside ``jit``)."""
  xp = jnp if isinstance(sequences, jax.Array) or isinstance(prompt_mask, jax.Array) else np
  b, total = sequences.shape
  p = prompt_mask.shape[1]
  completion = (xp.zeros((b, total), xp.int32) + xp.arange(total, dtype=xp.int32)) >= p
  return {
      "sequences": xp.asarray(sequences, xp.int32),
      "attention_mask": xp.concatenate([xp.asarray(prompt_mask, bool), xp.ones((b, total - p), bool)],
                                       axis=1),
      "prompt_mask": ~completion,
      "completion_mask": completion,
      "rewards": xp.asarray(rewards, xp.float32),
      "group_ids": xp.asarray(group_ids, xp.int32),
      "example_ids": xp.asarray(example_ids, xp.int32),
  }

