"""DMPO on 4x4 Sudoku, LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.dmpo_llada()
  config.task.name = "sudoku"
  config.eval.gen_length, config.eval.steps = 256, 256  # DMPO eval: 1 token per step
  return config
