"""diffu-GRPO (d1) on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §4.1)."""

from configs import recipes


def get_config():
  config = recipes.d1_llada("diffu_grpo")
  config.prompts_per_step = 16              # 8 GPUs x 6 per device x 2 accumulation / 6 generations
  config.group_size = 6
  config.updates_per_rollout = 12           # mu inner iterations
  config.diffu_grpo.num_iterations = 12     # one mask seed per inner iteration (mask_seeds)
  config.diffu_grpo.p_mask_prompt = 0.15    # d1's shipped train.yaml (dataclass default 0.3)
  config.diffu_grpo.clip_eps, config.diffu_grpo.beta = 0.5, 0.04  # epsilon and the k3 KL weight
  config.diffu_grpo.include_eos_padding = False  # tokens up to and including the first EOS
  # Reference-exact loss: d1 takes a token mean per per-device micro-batch of 6 completions and
  # averages micro-batches (the published LR and max_grad_norm assume it).
  config.diffu_grpo.reference_micro_batch_size = 6
  return config
