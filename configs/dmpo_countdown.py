"""DMPO on Countdown, LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.dmpo_llada()
  config.task.name = "countdown"
  # The individual baseline (App. C.2: Countdown), the recipe's default: per group, layout-free.
  config.eval.gen_length, config.eval.steps = 256, 256  # DMPO eval: 1 token per step
  return config
