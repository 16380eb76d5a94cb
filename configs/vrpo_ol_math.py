"""VRPO-OL (the BGPO paper's baseline) on MATH, LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.bgpo_llada("vrpo_ol_two_pass")
  config.task.name = "math"
  config.task.prompt_length = 512
  config.num_steps = 700
  config.rollout.gen_length, config.rollout.steps = 512, 256
  config.eval.gen_length, config.eval.steps = 512, 512
  config.vrpo_ol_two_pass.num_mc = 4
  return config
