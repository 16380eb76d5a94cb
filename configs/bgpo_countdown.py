"""BGPO on Countdown (3 numbers), LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.bgpo_llada()
  config.task.name = "countdown"
  config.task.prompt_length = 512
  config.num_steps = 560
  config.rollout.gen_length, config.rollout.steps = 256, 128
  config.eval.gen_length, config.eval.steps = 256, 256
  return config
