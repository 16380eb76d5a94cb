"""diffu-GRPO (d1) on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §4.1)."""

from configs import recipes


def get_config():
  config = recipes.d1_llada("diffu_grpo")
  config.prompts_per_step = 16              # 8 GPUs x 6 per device x 2 accumulation / 6 generations
  config.group_size = 6
  config.updates_per_rollout = 12           # mu inner iterations
  # Reference-exact loss: d1 takes a token mean per per-device micro-batch of 6 completions and
  # averages micro-batches (the published LR and max_grad_norm assume it).
  config.diffu_grpo.reference_micro_batch_size = 6
  return config
