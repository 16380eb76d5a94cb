"""What a task changes in a training run goes through `Task` hooks: its data (`run_data`), the
warm-up target (`demonstration`), run settings (`configure`) and the solved-reward threshold of
the ``reward/accuracy`` metric (`solved_reward`)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from dmpo_jax import tasks
from dmpo_jax.rl import step_io
from dmpo_jax.tasks import base, code_tasks, digit_sort


def _config(**overrides):
  config = demo.get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def test_digit_sort_run_data_is_the_seeded_generator_with_a_mixed_warmup_set():
  config = _config(**{"seed": 3, "eval.num_examples": 40, "sft.num_steps": 5,
                      "sft.ascending_fraction": 0.25})
  data = digit_sort.TASK.run_data(config)
  assert data.train == digit_sort.generate_examples(4096, split="train", seed=3)
  assert data.held_out == digit_sort.generate_examples(40, split="test", seed=3, distinct=True)
  want_warmup = digit_sort.generate_examples(4096, split="train", seed=4, ascending_fraction=0.25)
  assert data.warmup == want_warmup
  ascending = np.mean([e["demonstration"] == e["answer"] for e in data.warmup])
  assert abs(ascending - 0.25) < 0.03  # 4096 draws: 3 standard deviations is 0.02
  assert [digit_sort.TASK.demonstration(e) for e in data.warmup[:5]] == [
      e["demonstration"] for e in want_warmup[:5]]
  assert digit_sort.TASK.run_data(_config(**{"sft.num_steps": 0})).warmup == []


def test_default_run_data_reads_the_sources_and_warms_up_on_the_training_set(fixture_data_dir):
  task = tasks.get_task("gsm8k")
  train_file = fixture_data_dir / "gsm8k" / "train.jsonl"
  eval_file = fixture_data_dir / "gsm8k" / "test.jsonl"
  config = _config(**{"task.name": "gsm8k", "task.train_source": str(train_file),
                      "task.eval_source": str(eval_file), "sft.num_steps": 2})
  data = task.run_data(config)
  assert isinstance(data, base.RunData)
  assert data.train == task.load_rows(str(train_file)) and data.warmup is data.train
  assert data.held_out == task.load_rows(str(eval_file))
  assert task.demonstration(data.train[0]) == data.train[0]["answer"]
  config.sft.num_steps = 0
  assert task.run_data(config).warmup == []


def test_code_task_configure_applies_the_sandbox_block_and_text_tasks_ignore_it():
  task = code_tasks.HumanEvalTask()
  config = _config(**{"task.name": "humaneval"})
  config.sandbox.cpu_time_s, config.sandbox.wall_time_s = 3, 7.5
  task.configure(config)
  want = dataclasses.replace(code_tasks.DEFAULT_SANDBOX, **dict(config.sandbox.items()))
  assert task.config == want and task.config.cpu_time_s == 3 and task.config.wall_time_s == 7.5
  gsm8k = tasks.get_task("gsm8k")
  before = dict(vars(gsm8k))
  gsm8k.configure(config)
  assert dict(vars(gsm8k)) == before
  config.sandbox.unknown_key = 1
  with pytest.raises(ValueError, match="unknown sandbox key"):
    task.configure(config)


def test_reward_accuracy_counts_rewards_at_the_tasks_solved_threshold():
  rewards = jnp.asarray([0.0, 0.4, 0.5, 0.9, 1.0, 2.0], jnp.float32)
  group_ids = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
  assert float(step_io.reward_stats(rewards, group_ids)["reward/accuracy"]) == pytest.approx(2 / 6)
  assert float(step_io.reward_stats(rewards, group_ids, solved_reward=0.5)["reward/accuracy"]
               ) == pytest.approx(4 / 6)
  assert all(task.solved_reward == 1.0 for task in map(tasks.get_task, tasks.task_names()))
