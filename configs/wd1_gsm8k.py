"""wd1 on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §4.3).

wd1's shipped run (`wd1/train.yaml`, run scripts): 4 GPUs x 6 completions per device x 2
accumulation steps with 6 generations per prompt (8 prompts per optimizer step), 12 inner
iterations, prompt masking 0.15, and the positive-term-only variant. Each GPU's 6 rows are one
prompt's group, so its per-device softmax is the group softmax used here.
"""

from configs import recipes


def get_config():
  config = recipes.d1_llada("wd1")
  config.prompts_per_step = 8
  config.group_size = 6
  config.updates_per_rollout = 12
  config.wd1.num_iterations = 12         # one mask seed per inner iteration
  config.wd1.include_eos_padding = False  # ℓ sums the tokens up to and including the first EOS
  config.wd1.p_mask_prompt = 0.15       # d1's shipped train.yaml
  config.wd1.pos_only = True            # --trainer_type wll_d1_neg
  return config
