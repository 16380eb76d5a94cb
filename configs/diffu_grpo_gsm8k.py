"""diffu-GRPO (d1) on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §4.1)."""

from configs import base


def get_config():
  config = base.get_config()
  config.objective = "diffu_grpo"
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.task.name = "gsm8k"
  config.task.prompt_length = 200
  config.prompts_per_step = 16              # 8 GPUs x 6 per device x 2 accumulation / 6 generations
  config.group_size = 6
  config.updates_per_rollout = 12           # mu inner iterations
  config.num_steps = 1000
  config.optimizer.learning_rate = 3e-6
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.max_grad_norm = 0.2
  config.rollout.gen_length, config.rollout.block_length, config.rollout.steps = 256, 32, 128
  config.rollout.temperature = 0.9
  config.eval.gen_length, config.eval.block_length, config.eval.steps = 256, 32, 128
  # Reference-exact loss: d1 takes a token mean per per-device micro-batch of 6 completions and
  # averages micro-batches (the published LR and max_grad_norm assume it); it prompt-masks the
  # left padding too.
  config.diffu_grpo.reference_micro_batch_size = 6
  config.diffu_grpo.mask_prompt_padding = True
  return config
