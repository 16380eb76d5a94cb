"""SPG (EUBO) on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §1.5, §4.4).

SPG's shipped GSM8K run: 8 GPUs x 6 completions per device x 2 accumulation steps with 6
generations per prompt (16 prompts per optimizer step), block_random masks with num_t = 2,
EUBO beta 1.5, 4 inner iterations, prompt masking 0.15, and d1's training settings.
"""

from configs import recipes


def get_config():
  config = recipes.d1_llada("spg")
  config.prompts_per_step = 16
  config.group_size = 6
  config.updates_per_rollout = 4            # NUM_ITER of SPG's GSM8K script
  config.spg.num_mc = 2                     # --num_t 2
  config.spg.block_length = 32              # block_random over the sampler's blocks of 32
  config.spg.min_t, config.spg.max_t = 0.0, 1.0  # --min_t 0 --max_t 1
  config.spg.negative_estimator = "eubo"    # the spg_eubo scripts
  config.spg.eubo_beta = 1.5                # GSM8K's eubo_beta
  config.spg.include_eos_padding = False    # valid tokens: up to and including the first EOS
  # Reference-exact settings: SPG's prompt-masking law and per-micro-batch sum-|c| normalisation.
  config.spg.p_mask_prompt = 0.15
  config.spg.reference_prompt_masking = True
  config.spg.reference_micro_batch_size = 6
  return config
