"""Host <-> device traffic of one RL step (`docs/architecture.md` §2).

The rollout stays on the device from the sampler to the last update: the RL batch is built from
the sampler's output on the device (`device_rl_batch`), the per-example arrays of ``prepare`` are
never copied out, and mini-batches are cut on the device (`minibatch`). Per step, a process
copies to the devices only what the host made (its prompts; its rewards, group and example ids),
as global arrays built from its own rows (`put_rows`: `jax.make_array_from_process_local_data`),
and copies back exactly twice:

1. its own completion tokens, which its reward workers score (`fetch_local_rows`:
   `multihost_utils.global_array_to_host_local_array`, only this process's shards, no
   all-gather);
2. every metric of the step, packed on the device into one float32 vector (`fetch_metrics`).

`HOST_FETCHES` counts the fetches by purpose (tests and `benchmarks/host_transfers.py` read it).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dmpo_jax import sharding
from dmpo_jax.rl import advantages, rollout

HOST_FETCHES: collections.Counter = collections.Counter()


def put_rows(mesh: jax.sharding.Mesh, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
  """This process's rows -> global device arrays split over the batch mesh axes (dim 0)."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)),
                                                    np.asarray(v))
          for k, v in arrays.items()}


def fetch_local_rows(array: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
  """This process's rows of a batch-split global array, on the host (one copy of its own shards;
  the rows `put_rows` placed from this process)."""
  local = multihost_utils.global_array_to_host_local_array(
      array, mesh, sharding.batch_sharding(mesh, array.ndim).spec)
  HOST_FETCHES["rows"] += 1
  return np.asarray(jax.device_get(local))


def reward_stats(rewards: jax.Array, group_ids: jax.Array, solved_reward: float = 1.0
                 ) -> dict[str, jax.Array]:
  """Reward mean / std (ddof 0) over the global batch, the fraction of rewards >=
  ``solved_reward`` (the task's `Task.solved_reward`), and the fraction of groups whose rewards
  are all equal (max == min, exact)."""
  rewards = rewards.astype(jnp.float32)
  all_equal = advantages.group_max(rewards, group_ids) == -advantages.group_max(-rewards, group_ids)
  counts = advantages.group_count(group_ids)  # each row adds 1 / |its group|: groups, not rows
  return {"reward/mean": jnp.mean(rewards), "reward/std": jnp.std(rewards),
          "reward/zero_std_group_fraction": jnp.sum(all_equal / counts) / jnp.sum(1.0 / counts),
          "reward/accuracy": jnp.mean((rewards >= solved_reward).astype(jnp.float32))}


def device_rl_batch(mesh: jax.sharding.Mesh, sequences: jax.Array, prompt_mask: jax.Array,
                    rows: Mapping[str, jax.Array], solved_reward: float = 1.0
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The RL batch (`rollout.rl_batch`) built on the device from the sampler's output, split over
  the batch axes as the compiled train step expects, and the rollout's metrics
  (`reward_stats` with ``solved_reward``).

  ``rows``: global arrays of rewards, group_ids, example_ids and truncated (prompts cut to the
  bucket: their sum over rows is the count).
  """
  return _device_rl_batch(mesh, float(solved_reward), sequences, prompt_mask, dict(rows))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _device_rl_batch(mesh, solved_reward, sequences, prompt_mask, rows):
  batch = rollout.rl_batch(sequences, prompt_mask, rows["rewards"], rows["group_ids"],
                           rows["example_ids"])
  batch = {k: jax.lax.with_sharding_constraint(v, sharding.batch_sharding(mesh, v.ndim))
           for k, v in batch.items()}
  metrics = reward_stats(batch["rewards"], batch["group_ids"], solved_reward)
  metrics["rollout/truncated_prompts"] = jnp.sum(rows["truncated"]).astype(jnp.float32)
  return batch, metrics


def minibatch(mesh: jax.sharding.Mesh, tree: Any, index: int, count: int) -> Any:
  """Rows ``[index * n / count, (index + 1) * n / count)`` of every array of ``tree`` (global
  order), split over the batch axes (the layout the compiled train step expects); ``count=1``
  only fixes the layout."""
  return _minibatch(mesh, index, count, tree)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _minibatch(mesh, index, count, tree):
  def cut(v):
    rows = v.shape[0] // count
    part = jax.lax.slice_in_dim(v, index * rows, (index + 1) * rows, axis=0)
    return jax.lax.with_sharding_constraint(part, sharding.batch_sharding(mesh, v.ndim))
  return jax.tree.map(cut, tree)


def fetch_metrics(mesh: jax.sharding.Mesh, update_metrics: Sequence[Mapping[str, jax.Array]],
                  other_metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """One device-to-host copy of every metric of a step: each update metric averaged over the
  step's updates, plus ``other_metrics``; returns Python floats by name."""
  names, vector = _pack_metrics(mesh, tuple(dict(m) for m in update_metrics), dict(other_metrics))
  HOST_FETCHES["metrics"] += 1
  values = np.asarray(jax.device_get(vector))
  return dict(zip(names, (float(v) for v in values)))


def _pack_metrics(mesh, update_metrics, other_metrics):
  names = sorted(update_metrics[0]) + sorted(other_metrics) if update_metrics else sorted(other_metrics)
  return names, _pack(mesh, update_metrics, other_metrics)


@functools.partial(jax.jit, static_argnums=0)
def _pack(mesh, update_metrics, other_metrics):
  values = []
  if update_metrics:
    for name in sorted(update_metrics[0]):
      values.append(jnp.mean(jnp.stack([jnp.asarray(m[name], jnp.float32) for m in update_metrics])))
  values += [jnp.asarray(other_metrics[name], jnp.float32) for name in sorted(other_metrics)]
  packed = jnp.stack([v.reshape(()) for v in values])
  return jax.lax.with_sharding_constraint(packed, sharding.replicated(mesh))
