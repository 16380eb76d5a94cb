"""BGPO on code (train on the DARE code set; evaluate HumanEval / MBPP), LLaDA-8B-Instruct."""

from configs import recipes


def get_config():
  config = recipes.bgpo_llada()
  config.task.name = "mbpp"
  config.task.prompt_length = 1024
  config.num_steps = 560                    # 5 epochs x 112 steps
  config.rollout.gen_length, config.rollout.steps = 512, 512
  config.eval.gen_length, config.eval.steps = 512, 512
  config.bgpo.num_mc = 16
  return config
