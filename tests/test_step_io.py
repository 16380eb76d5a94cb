"""Host <-> device traffic of the RL step (`dmpo_jax.rl.step_io`), the donated train-state init and
the profiler hook.

The trainer test counts every device-to-host copy (`jax.Array._value`, through which
``np.asarray``, ``jax.device_get``, ``float`` and ``tolist`` fetch a value; on CPU the transfer
guard does not see them) during whole RL steps: exactly two, the completion tokens and the
packed metrics. The same run writes a profiler trace of steps 2..3 that is checked to parse."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as array_lib

from dmpo_jax import metrics as metrics_lib, profiling
from dmpo_jax.rl import loop, rollout, step_io, train_step
from tests.helpers.small_runs import small_config

HERE = pathlib.Path(__file__).resolve().parent


def _reward_stats_by_hand(rewards, group_ids):
  groups = {}
  for r, g in zip(rewards.tolist(), group_ids.tolist()):
    groups.setdefault(g, []).append(r)
  mean = sum(rewards.tolist()) / len(rewards)
  std = (sum((r - mean) ** 2 for r in rewards.tolist()) / len(rewards)) ** 0.5
  return {"reward/mean": mean, "reward/std": std,
          "reward/zero_std_group_fraction": sum(len(set(v)) == 1 for v in groups.values()) / len(groups),
          "reward/accuracy": sum(r >= 1.0 for r in rewards.tolist()) / len(rewards)}


def test_reward_stats_match_a_plain_computation():
  # Unequal groups (sizes 3, 2, 1, 2), labels in any order; groups 7 and 2 have equal rewards.
  rewards = np.asarray([0.5, 0.5, 0.5, 1.0, 0.0, 0.3, 2.0, 2.0], np.float32)
  group_ids = np.asarray([7, 7, 7, 4, 4, 9, 2, 2], np.int32)
  got = jax.device_get(step_io.reward_stats(jnp.asarray(rewards), jnp.asarray(group_ids)))
  want = _reward_stats_by_hand(rewards.astype(np.float64), group_ids)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-6, err_msg=name)
  assert float(got["reward/zero_std_group_fraction"]) == 0.75  # groups 7, 9, 2 of 4


def test_device_batch_minibatches_and_metrics_equal_the_host_computation():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(0)
  b, p, total = 8, 3, 7
  sequences = rng.integers(0, 50, (b, total)).astype(np.int32)
  prompt_mask = rng.random((b, p)) > 0.3
  rows = {"rewards": rng.random(b).astype(np.float32), "group_ids": np.repeat(np.arange(4), 2),
          "example_ids": np.arange(b) + 100, "truncated": np.arange(b) < 3}
  batch, metrics = step_io.device_rl_batch(mesh, jnp.asarray(sequences), jnp.asarray(prompt_mask),
                                           step_io.put_rows(mesh, rows))
  host = rollout.rl_batch(sequences, prompt_mask, rows["rewards"], rows["group_ids"], rows["example_ids"])
  assert batch.keys() == host.keys()
  for name in host:
    assert batch[name].dtype == host[name].dtype, name
    np.testing.assert_array_equal(np.asarray(batch[name]), host[name], err_msg=name)
  assert float(metrics["rollout/truncated_prompts"]) == 3.0
  second = step_io.minibatch(mesh, batch, 1, 2)
  for name in host:
    np.testing.assert_array_equal(np.asarray(second[name]), host[name][4:], err_msg=name)
  updates = [{"train/loss": jnp.float32(1.0), "train/n": jnp.int32(3)},
             {"train/loss": jnp.float32(2.0), "train/n": jnp.int32(5)}]
  step_io.HOST_FETCHES.clear()
  fetched = step_io.fetch_metrics(mesh, updates, {"prepare/x": jnp.float32(0.25), **metrics})
  assert step_io.HOST_FETCHES == {"metrics": 1}
  assert fetched["train/loss"] == 1.5 and fetched["train/n"] == 4.0 and fetched["prepare/x"] == 0.25
  assert fetched["reward/mean"] == pytest.approx(float(np.mean(rows["rewards"])), rel=1e-6)


def test_profile_steps_are_validated():
  assert profiling.parse_steps("") is None
  assert profiling.parse_steps(" 2, 5 ") == (2, 5) and profiling.parse_steps("3") == (3, 3)
  for bad in ("0,2", "3,2", "a,b", "1,2,3", "-1,2"):
    with pytest.raises(ValueError, match="profile_steps"):
      profiling.parse_steps(bad)
  config = small_config(profile_steps="2,9")
  with pytest.raises(loop.ConfigError, match=r"profile_steps='2,9' ends after the last step num_steps=4"):
    loop.validate_config(config, num_devices=1)
  with pytest.raises(loop.ConfigError, match=r"profile_steps='3,x' must be 'a,b'"):
    loop.validate_config(small_config(profile_steps="3,x"), num_devices=1)


@pytest.mark.slow
def test_rl_step_copies_to_host_twice_and_the_profile_trace_is_written(tmp_path, monkeypatch):
  """Every device-to-host copy during RL steps 2 and 3 (no eval, no checkpoint in between) is
  counted: the completion tokens and the packed metrics, nothing else."""
  fetches = []
  value = array_lib.ArrayImpl._value

  def counted(self):
    if self._npy_value is None:
      fetches.append((self.shape, str(self.dtype)))
    return value.fget(self)

  marks = {}
  write = metrics_lib.MetricWriter.write

  def marking(self, step, metrics):
    marks[step] = (len(fetches), dict(step_io.HOST_FETCHES))
    return write(self, step, metrics)

  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(counted))
  monkeypatch.setattr(metrics_lib.MetricWriter, "write", marking)
  config = small_config(**{"num_steps": 3, "eval.every_steps": 0, "checkpoint.every_steps": 100,
                           "profile_steps": "2,3"})
  loop.train(config, str(tmp_path))
  rows = config.prompts_per_step * config.group_size
  for step in (2, 3):
    (before, counts_before), (after, counts_after) = marks[step - 1], marks[step]
    step_fetches = fetches[before:after]
    assert len(step_fetches) == 2, step_fetches
    assert step_fetches[0] == ((rows, config.rollout.gen_length), "int32")  # completion tokens
    (num_metrics,), dtype = step_fetches[1]  # one packed vector of every metric
    assert dtype == "float32" and num_metrics >= 10
    assert {k: n - counts_before.get(k, 0) for k, n in counts_after.items()
            if n != counts_before.get(k, 0)} == {"rows": 1, "metrics": 1}

  traces = sorted((tmp_path / profiling.PROFILE_DIR).rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  events = json.loads(gzip.decompress(
      next(traces[0].parent.glob("perfetto_trace.json.gz")).read_bytes()))["traceEvents"]
  steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == profiling.STEP_NAME)
  assert steps == [2, 3]


def test_trainer_init_donates_the_parameters(tmp_path, monkeypatch):
  """The train-state init takes over the loaded parameters' buffers: the arrays passed in are
  deleted (donated) and the state's parameters live at the same addresses (no second copy)."""
  captured = {}
  state_shardings = train_step.state_shardings

  def capture(init, params, mesh):
    if not captured:
      captured["params"] = params
      captured["pointers"] = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)]
    return state_shardings(init, params, mesh)

  monkeypatch.setattr(train_step, "state_shardings", capture)
  trainer = loop.Trainer(small_config(), tmp_path)
  leaves = jax.tree.leaves(captured["params"])
  assert len(leaves) > 5 and all(x.is_deleted() for x in leaves)
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(trainer.state.params)] == captured["pointers"]
