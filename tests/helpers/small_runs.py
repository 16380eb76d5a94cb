"""The demo config at test size, and readers of a finished run's outputs (shared by the trainer,
precision, step-I/O and multi-process tests)."""

import json

from configs import demo
from dmpo_jax import checkpointing

# The demo at test size: DMPO without a weight baseline (so updates are non-zero even when every
# reward is 0), two updates per rollout, 4 RL steps, small eval, no warm-up.
SMALL = {"objective": "dmpo", "dmpo.baseline": "none", "updates_per_rollout": 2,
         "sft.num_steps": 0, "num_steps": 4, "prompts_per_step": 4, "group_size": 4,
         "eval.every_steps": 4, "eval.num_examples": 16, "eval.batch_size": 16,
         "checkpoint.every_steps": 2, "progress_bar": False}


def small_config(**overrides):
  config = demo.get_config()
  for key, value in {**SMALL, **overrides}.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def small_config_flags(**overrides):
  """The same config as command-line overrides of configs/demo.py."""
  return [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]


def metrics_without_times(workdir):
  """The rows of ``metrics.jsonl`` without the timing fields (these differ between runs)."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.startswith(("time/", "rollout/tokens_per_second"))}
          for r in rows]


def final_params(workdir):
  """The train state of the run's latest checkpoint."""
  ckpt = checkpointing.TrainCheckpointer(workdir / "checkpoints")
  restored = ckpt.restore()
  ckpt.close()
  return restored.state
