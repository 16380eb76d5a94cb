"""SPG (EUBO) on GSM8K, LLaDA-8B-Instruct (`docs/algorithms.md` §1.5, §4.4).

SPG's shipped GSM8K run: 8 GPUs x 6 completions per device x 2 accumulation steps with 6
generations per prompt (16 prompts per optimizer step), block_random masks with num_t = 2,
EUBO beta 1.5, 4 inner iterations, prompt masking 0.15, and d1's training settings.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.objective = "spg"
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.task.name = "gsm8k"
  config.task.prompt_length = 200
  config.prompts_per_step = 16
  config.group_size = 6
  config.updates_per_rollout = 4            # NUM_ITER of SPG's GSM8K script
  config.num_steps = 1000
  config.optimizer.learning_rate = 3e-6
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.max_grad_norm = 0.2
  config.rollout.gen_length, config.rollout.block_length, config.rollout.steps = 256, 32, 128
  config.rollout.temperature = 0.9
  config.eval.gen_length, config.eval.block_length, config.eval.steps = 256, 32, 128
  config.spg.num_mc = 2
  config.spg.block_length = 32
  config.spg.negative_estimator = "eubo"
  config.spg.eubo_beta = 1.5
  # Reference-exact settings: SPG's prompt-masking law and per-micro-batch Σ|c| normalisation.
  config.spg.p_mask_prompt = 0.15
  config.spg.reference_prompt_masking = True
  config.spg.reference_micro_batch_size = 6
  return config
