"""BGPO on 4x4 Sudoku, LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.bgpo_llada()
  config.task.name = "sudoku"
  config.task.prompt_length = 512
  config.num_steps = 400
  config.rollout.gen_length, config.rollout.steps = 256, 128
  config.eval.gen_length, config.eval.steps = 256, 256
  config.bgpo.num_mc = 32
  return config
