"""BGPO on MATH (train) / MATH500 (test), LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.bgpo_llada()
  config.task.name = "math"
  config.task.prompt_length = 512
  config.num_steps = 700
  config.rollout.gen_length, config.rollout.steps = 512, 256
  config.eval.gen_length, config.eval.steps = 512, 512
  return config
