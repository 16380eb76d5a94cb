"""wd1 on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §4.3).

wd1's shipped run (`wd1/train.yaml`, run scripts): 4 GPUs x 6 completions per device x 2
accumulation steps with 6 generations per prompt (8 prompts per optimizer step), 12 inner
iterations, prompt masking 0.15 (left padding included), and the positive-term-only variant.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.objective = "wd1"
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.task.name = "gsm8k"
  config.task.prompt_length = 200
  config.prompts_per_step = 8
  config.group_size = 6
  config.updates_per_rollout = 12
  config.num_steps = 1000
  config.optimizer.learning_rate = 3e-6
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.max_grad_norm = 0.2
  config.rollout.gen_length, config.rollout.block_length, config.rollout.steps = 256, 32, 128
  config.rollout.temperature = 0.9
  config.eval.gen_length, config.eval.block_length, config.eval.steps = 256, 32, 128
  config.wd1.num_iterations = 12
  config.wd1.p_mask_prompt = 0.15
  config.wd1.mask_prompt_padding = True
  config.wd1.pos_only = True
  return config
