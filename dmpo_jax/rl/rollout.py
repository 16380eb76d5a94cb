"""Rollouts: the RL batch from the sampler's output.

The sampler runs on the training devices, on the policy resharded once per RL step to the
sampling layout (`dmpo_jax.sampling_layout`); its inputs are encoded by `dmpo_jax.inference.prompts`
(re-exported here with the rollout sampler settings, `inference.sampler_configs.sampler_config`)
and this module turns its outputs into the RL batch contract of `dmpo_jax.rl.scoring`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Prompt encoding / completion decoding and the sampler settings, where the RL code finds them.
# pylint: disable=unused-import
from dmpo_jax.inference.prompts import (  # noqa: F401
    completion_token_ids, decode_completions, encode_prompts, prompt_token_ids)
from dmpo_jax.inference.sampler_configs import sampler_config  # noqa: F401
# pylint: enable=unused-import


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

