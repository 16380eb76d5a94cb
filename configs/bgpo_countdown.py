"""BGPO on Countdown (3 numbers), LLaDA-8B-Instruct."""

from configs import base


def get_config():
  config = base.get_config()
  # BGPO paper (arXiv 2510.11683v3) Table 5 / §4.1 and the DARE recipe (`algorithms.md` §3.7).
  config.objective = "bgpo"
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.prompts_per_step = 16
  config.group_size = 8
  config.updates_per_rollout = 1            # on-policy (off-policy: 2 with micro batches of 8)
  config.optimizer.learning_rate = 5e-7
  config.optimizer.weight_decay = 0.01
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.max_grad_norm = 1.0
  config.rollout.block_length = 32
  config.rollout.temperature = 0.6          # DARE's training temperature (paper: not stated)
  config.eval.block_length = 32
  config.eval.every_steps = 20              # the paper reports the best of checkpoints every 20 steps
  config.checkpoint.every_steps = 20
  config.bgpo.num_mc = 16
  config.bgpo.mode = "on_policy"
  config.task.name = "countdown"
  config.task.prompt_length = 512
  config.num_steps = 560
  config.rollout.gen_length, config.rollout.steps = 256, 128
  config.eval.gen_length, config.eval.steps = 256, 256
  return config
