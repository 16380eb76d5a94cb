"""Shared recipes of the published settings (one place for each paper's hyperparameters)."""

from configs import base


def bgpo_llada(objective: str = "bgpo"):
  """Base config with the BGPO paper's LLaDA-8B-Instruct recipe (the task files add lengths)."""
  config = base.get_config()
  # BGPO paper (arXiv 2510.11683v3) Table 5 / §4.1 and the DARE recipe (`docs/algorithms.md` §3.7).
  config.objective = objective
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.prompts_per_step = 16
  config.group_size = 8
  # On-policy: one update per rollout. The paper's off-policy variant: --config.bgpo.mode=off_policy
  # --config.updates_per_rollout=2 --config.minibatches_per_rollout=2 (two mini-batches of 8 prompts).
  config.updates_per_rollout = 1
  config.optimizer.learning_rate = 5e-7
  config.optimizer.weight_decay = 0.01
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.max_grad_norm = 1.0
  config.rollout.block_length = 32
  config.rollout.temperature = 0.6          # DARE's training temperature (paper: not stated)
  config.eval.block_length = 32
  config.eval.every_steps = 20              # the paper reports the best of checkpoints every 20 steps
  config.checkpoint.every_steps = 20
  block = config[objective]
  block.num_mc = 16                         # n_t (Table 5; DARE mc_num)
  block.mode = "on_policy"                  # ℓ_old = ℓ_θ of the same pass: one update per rollout
  block.mask_scheme = "k_stratified"        # DARE's _forward_process_bgpo (one offset, k_i masked)
  block.include_eos_padding = True          # DARE's response mask is all ones: the whole canvas
  block.advantage_eps, block.advantage_std_ddof = 1e-6, 1  # verl GRPO: (r − mean) / (std + 1e-6)
  # DARE divides each MC copy's ELBO term by the padded response length, so d = ℓ_θ/L − ℓ_old/L
  # (`docs/algorithms.md` §3.6 row 2): without it the gradient is L × the paper's runs'.
  block.normalize_by_length = True
  # DARE also PPO-clips (0.2) and dual-clips (3.0) the ratio; on-policy the ratio is 1 and the
  # clips change nothing. The off-policy variant adds --config.bgpo.clip_eps=0.2
  # --config.bgpo.dual_clip=3.0 to follow DARE (the paper's objective has no clip).
  return config


def dmpo_llada():
  """Base config with the DMPO paper's LLaDA-8B-Instruct recipe (the task files add the task)."""
  config = base.get_config()
  # DMPO paper (arXiv 2510.08233v3) App. C.2 and the reference scripts (`docs/algorithms.md` §2.8):
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
  # DMPO's rollout sampler `pd_cache_prefix` (Fast-dLLM prefix cache, no threshold / factor:
  # 2 tokens per step); evaluation stays on the exact sampler (config.eval).
  config.rollout.cache = "prefix"
  config.eval.block_length = 32
  config.checkpoint.every_steps = 13        # ~ every 100 optimizer steps
  # The reference's weights: softmax over the group of coeff·(r/α + ELBO_ref − ELBO_v), summing to 1.
  config.dmpo.alpha, config.dmpo.coeff = 0.04, 1.0
  config.dmpo.weight_scale = "sum1"
  # Antithetic Bernoulli masks, λ = 0.1 + 0.9·U (the code's law), K = 4 for the weight ELBOs
  # (compute_ref_log_prob_elbo_size) and R = 4 per update for the loss (num_replicates).
  config.dmpo.mask_scheme, config.dmpo.lambda_range = "antithetic", (0.1, 1.0)
  config.dmpo.weight_num_mc, config.dmpo.loss_num_mc = 4, 4
  # log_rnd_omit_eos = loss_mask_non_eos = False: weights and loss on the whole canvas.
  config.dmpo.include_eos_padding = True
  # The reference code's loss scale (mean over per-GPU micro-batches of 8 of each micro-batch's
  # summed loss, ½ of the per-prompt mean at G = 16): the published LR and max_grad_norm assume it.
  config.dmpo.reference_micro_batch_size = 8
  # The reference's individual baseline softmaxes ℓ⁻ over the whole group: nothing layout-bound.
  config.dmpo.baseline = "individual"
  # Padding: the reference calls the model without an attention mask, but each GPU's batch holds
  # copies of one prompt, so no row has left padding; here prompts share a padded bucket and the
  # key-padding mask (model.use_key_padding_mask, base.py) gives the same unpadded forward.
  return config


def dmpo_group_baseline(config):
  """The group baseline (Eq. 13) as the paper's runs computed it: the reference subtracts the mean
  weight of each GPU's micro-batch of 8 rows (half a group of 16), not of the group
  (`docs/algorithms.md` §6). ``--config.dmpo.baseline_scope=group`` gives the group mean."""
  config.dmpo.baseline = "group"
  config.dmpo.baseline_scope = "micro_batch"
  return config


def d1_llada(objective: str):
  """Base config with d1's training recipe for LLaDA-8B-Instruct, shared by diffu-GRPO and the
  d1-family baselines built on its code (wd1, SPG): `docs/algorithms.md` §4.1, §4.3, §4.4."""
  config = base.get_config()
  config.objective = objective
  config.model.checkpoint = ""  # set to a LLaDA-8B-Instruct HF folder
  config.model.preset = "llada_8b"
  config.task.name = "gsm8k"
  config.task.prompt_length = 200
  config.num_steps = 1000
  config.optimizer.learning_rate = 3e-6
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.max_grad_norm = 0.2
  config.rollout.gen_length, config.rollout.block_length, config.rollout.steps = 256, 32, 128
  config.rollout.temperature = 0.9
  config.eval.gen_length, config.eval.block_length, config.eval.steps = 256, 32, 128
  # Padding: d1's trainers call the model without an attention mask, but each GPU's batch holds the
  # 6 copies of one prompt (no left padding); the key-padding mask on the shared padded bucket here
  # gives the same forward, so `mask_prompt_padding` (prompt-masking the padding) stays off: with
  # the padding invisible it would change nothing.
  return config
