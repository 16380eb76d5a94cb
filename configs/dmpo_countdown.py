"""DMPO on Countdown, LLaDA-8B-Instruct."""

from configs import base


def get_config():
  config = base.get_config()
  # DMPO paper (arXiv 2510.08233v3) App. C.2 and the reference scripts (`algorithms.md` §2.8):
  # N = 16, 8 prompts per optimizer step, F = 8, R = 4 loss masks, K = 4 weight masks, alpha 0.04.
  config.objective = "dmpo"
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.prompts_per_step = 8
  config.group_size = 16
  config.updates_per_rollout = 8            # F: buffer reuse
  config.num_steps = 500                    # 500 rollouts x F = 4,000 gradient updates
  config.optimizer.learning_rate = 3e-6
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.max_grad_norm = 0.2
  config.task.prompt_length = 200
  config.rollout.gen_length, config.rollout.block_length, config.rollout.steps = 256, 32, 128
  config.rollout.temperature = 0.2
  config.rollout.use_prefix_cache = True    # Fast-dLLM prefix cache, 2 tokens per step
  config.eval.block_length = 32
  config.checkpoint.every_steps = 13        # ~ every 100 optimizer steps
  config.task.name = "countdown"
  config.eval.gen_length, config.eval.steps = 256, 256  # DMPO eval: 1 token per step
  return config
