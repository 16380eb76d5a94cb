"""diffu-GRPO (d1) and wd1: objectives on d1's one-step likelihood estimate (`docs/algorithms.md`
§1.4, §4.1, §4.3).

One-step estimate: every completion position masked, each real prompt token masked with
probability ``p_mask_prompt``; per-token log π(y_k | ·) at completion positions up to and
including the first EOS. One mask seed per inner iteration k = 0..μ−1 of a rollout, shared by
the old, reference and current evaluations (`RLKeys.iteration` selects it; keys are
`fold_in`-derived, not 4096 global seeds).

diffu-GRPO (A = r − mean_G r, no std):

    ρ_k = exp(logp_θ,k − logp_old,k),   KL_k = exp(ref_k − logp_k) − (ref_k − logp_k) − 1
    L = −(1/Σ_i|c_i|) Σ_i Σ_{k∈c_i} [ min(ρ_k A_i, clip(ρ_k, 1−ε, 1+ε) A_i) − β·KL_k ]

Old and reference per-token log-probs for all μ seeds are computed once per rollout by
``prepare`` (no gradient).

wd1 (ratio-free, no old or reference policy):

    w⁺ = softmax_G(A), w⁻ = softmax_G(−A),  ℓ_i = Σ_{k∈c_i} log π_θ(y_k | ·)
    L = (1/P) Σ_i (w⁻_i − w⁺_i)·ℓ_i          (P = number of groups: weights sum to 1 per group)

with the softmax over the full group (the reference code's per-device softmax is a layout bug).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.diffusion import elbo, masking
from dmpo_jax.rl import advantages as adv
from dmpo_jax.rl import grad as G
from dmpo_jax.rl import scoring
from dmpo_jax.rl.objectives.base import ObjectiveConfig, Prepared, check_positive

_MASK_PURPOSE = "one_step/seed"


@dataclasses.dataclass(frozen=True)
class OneStepConfig(ObjectiveConfig):
  """num_iterations: μ mask seeds per rollout (d1: 12). p_mask_prompt: prompt masking rate (0.15
  in d1's shipped yaml). random_masking: False uses one fixed seed for every iteration and rollout
  (d1's seed 42). include_eos_padding: False = score up to and including the first EOS.
  mask_prompt_padding: also prompt-mask the left-padding positions of the prompt, as the reference
  code does (it cannot tell padding from prompt); False = real prompt tokens only. With the
  key-padding mask on (``model.use_key_padding_mask``) padding is invisible either way."""
  num_iterations: int = 12
  p_mask_prompt: float = 0.15
  random_masking: bool = True
  include_eos_padding: bool = False
  mask_prompt_padding: bool = False

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    if self.num_iterations < 1:
      errors.append(f"num_iterations must be >= 1, got {self.num_iterations}")
    if not 0.0 <= self.p_mask_prompt <= 1.0:
      errors.append(f"p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}")
    return errors

  @property
  def num_seeds(self) -> int:
    return self.num_iterations if self.random_masking else 1


@dataclasses.dataclass(frozen=True)
class DiffuGRPOConfig(OneStepConfig):
  """clip_eps: ε (0.5 in d1). beta: k3 KL coefficient (0.04). log_ratio_clamp: |log-ratio| clamp
  before exp (numerical safety; the fraction clamped is logged). reference_micro_batch_size:
  None = one token mean over the whole update batch; c = d1's normalisation, a token mean per
  micro-batch of c completions (its per-device batch), averaged over micro-batches
  (`grad.loss_normalization`)."""
  clip_eps: float = 0.5
  beta: float = 0.04
  log_ratio_clamp: float = 20.0
  reference_micro_batch_size: Optional[int] = None

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    check_positive(errors, "clip_eps", self.clip_eps)
    check_positive(errors, "beta", self.beta, allow_zero=True)
    check_positive(errors, "log_ratio_clamp", self.log_ratio_clamp)
    check_positive(errors, "reference_micro_batch_size", self.reference_micro_batch_size,
                   allow_none=True)
    return errors


@dataclasses.dataclass(frozen=True)
class WD1Config(OneStepConfig):
  """wd1 (`wd1/train.yaml`: μ = 12, p_mask_prompt 0.15, random masking). pos_only: keep only the
  positive term, L = −(1/P) Σ_i w⁺_i·ℓ_i (the variant wd1's run scripts select)."""
  pos_only: bool = False


# -- pure math ------------------------------------------------------------------------------------

def diffu_grpo_token_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
                          advantages: jax.Array, scored: jax.Array, *, clip_eps: float,
                          beta: float, log_ratio_clamp: float = 20.0
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token diffu-GRPO loss −[min(ρA, clip(ρ)A) − β·KL_k], 0 at unscored positions, [B, T].

  Log-ratios are clamped to ±log_ratio_clamp before exp (fp32). Returns (loss, flags) with flags
  {clipped, clamped, kl} per token.
  """
  logp = logp.astype(jnp.float32)
  a = advantages.astype(jnp.float32)[:, None]
  raw = logp - old_logp.astype(jnp.float32)
  log_ratio = jnp.clip(raw, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * a
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
  surrogate = jnp.minimum(unclipped, clipped)
  ref_minus = jnp.clip(ref_logp.astype(jnp.float32) - logp, -log_ratio_clamp, log_ratio_clamp)
  kl = jnp.exp(ref_minus) - ref_minus - 1.0
  loss = jnp.where(scored, -(surrogate - beta * kl), 0.0)
  flags = {"clipped": scored & (clipped < unclipped), "clamped": scored & (jnp.abs(raw) > log_ratio_clamp),
           "kl": jnp.where(scored, kl, 0.0)}
  return loss, flags


def wd1_sequence_loss(weights_pos: jax.Array, weights_neg: jax.Array,
                      log_likelihood: jax.Array, *, pos_only: bool = False) -> jax.Array:
  """Per-row wd1 loss (w⁻_i − w⁺_i)·ℓ_i, or −w⁺_i·ℓ_i with ``pos_only``, fp32 [B]."""
  negative = jnp.zeros_like(weights_neg) if pos_only else weights_neg
  return (negative - weights_pos).astype(jnp.float32) * log_likelihood.astype(jnp.float32)


# -- model-facing ---------------------------------------------------------------------------------

def _seed_keys(keys: scoring.RLKeys, example_ids: jax.Array, cfg: OneStepConfig) -> jax.Array:
  if not cfg.random_masking:
    return masking.mask_keys(keys.base, 0, example_ids, _MASK_PURPOSE)
  return scoring.example_keys(keys, example_ids, _MASK_PURPOSE)


def _seed_index(keys: scoring.RLKeys, cfg: OneStepConfig) -> jax.Array:
  return jnp.mod(keys.iteration, cfg.num_seeds) if cfg.random_masking else jnp.int32(0)


def _tree(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in ("sequences", "attention_mask", "prompt_mask", "completion_mask")}


def one_step_token_log_probs(model: Any, mb: Mapping[str, jax.Array], keys: jax.Array,
                             seed_index: jax.Array, cfg: OneStepConfig
                             ) -> tuple[jax.Array, jax.Array]:
  """(per-token log π at scored positions (0 elsewhere) [b, T], scored [b, T]) for one seed."""
  eligible = scoring.eligible_positions(mb, model.config.eos_token_id, cfg.include_eos_padding)
  prompt_positions = (mb["prompt_mask"].astype(jnp.bool_) if cfg.mask_prompt_padding
                      else scoring.real_prompt_positions(mb))
  sample = masking.one_step_mask(
      keys, eligible, seed_index, prompt_positions=prompt_positions,
      completion_positions=mb["completion_mask"].astype(jnp.bool_), p_mask_prompt=cfg.p_mask_prompt)
  logp = elbo.masked_token_log_probs(model, mb["sequences"], sample, mb["attention_mask"])
  return logp, sample.scored


def diffu_grpo_prepare(graphdef: Any, params: Any, ref_params: Any,
                       batch: Mapping[str, jax.Array], keys: scoring.RLKeys,
                       cfg: DiffuGRPOConfig) -> Prepared:
  """Mean-centred advantages; old (and, with β > 0, reference) per-token log-probs for every
  mask seed, [B, μ, T] fp32, no gradient."""
  scoring.check_batch(batch)
  a = adv.mean_centered_advantages(batch["rewards"], batch["group_ids"])
  model_old = nnx.merge(graphdef, jax.lax.stop_gradient(params))
  model_ref = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params)) if cfg.beta > 0 else None
  tree = _tree(batch) | {"seed_keys": _seed_keys(keys, batch["example_ids"], cfg)}

  def score(mb):
    def body(carry, k):
      out = {"old_logps": one_step_token_log_probs(model_old, mb, mb["seed_keys"], k, cfg)[0]}
      if model_ref is not None:
        out["ref_logps"] = one_step_token_log_probs(model_ref, mb, mb["seed_keys"], k, cfg)[0]
      return carry, out

    _, out = jax.lax.scan(body, None, jnp.arange(cfg.num_seeds, dtype=jnp.int32))
    return jax.tree.map(lambda x: x.swapaxes(0, 1), out)  # [b, μ, T]

  per_example = {"advantages": a} | G.micro_batch_map(score, tree, cfg.micro_batch_size)
  metrics = {"rewards/zero_std_frac": adv.zero_std_fraction(batch["rewards"], batch["group_ids"]),
             "advantages/abs_mean": jnp.mean(jnp.abs(a))}
  return Prepared(per_example, metrics)


def diffu_grpo_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
                     keys: scoring.RLKeys, cfg: DiffuGRPOConfig) -> tuple[Any, G.LossOutput]:
  """∇ of the token-mean clipped surrogate + k3 KL on seed ``keys.iteration mod μ``."""
  pe = aux.per_example
  k = _seed_index(keys, cfg)
  pick = lambda x: jax.lax.dynamic_index_in_dim(x, k, axis=1, keepdims=False)
  tree = _tree(batch) | {"seed_keys": _seed_keys(keys, batch["example_ids"], cfg),
                         "advantages": pe["advantages"], "old_logps": pick(pe["old_logps"])}
  tree["ref_logps"] = pick(pe["ref_logps"]) if cfg.beta > 0 else tree["old_logps"]
  eos = scoring.model_config(graphdef, params).eos_token_id
  num_tokens = jnp.sum(scoring.eligible_positions(batch, eos, cfg.include_eos_padding), axis=-1)
  tree["row_scale"], tree["row_denominator"] = G.loss_normalization(
      num_tokens, cfg.reference_micro_batch_size, reference_counts=num_tokens)

  def loss_fn(p, mb, _):
    model = nnx.merge(graphdef, p)
    logp, scored = one_step_token_log_probs(model, mb, mb["seed_keys"], k, cfg)
    loss, flags = diffu_grpo_token_loss(logp, mb["old_logps"], mb["ref_logps"], mb["advantages"],
                                        scored, clip_eps=cfg.clip_eps, beta=cfg.beta,
                                        log_ratio_clamp=cfg.log_ratio_clamp)
    metrics = {"d1/clip_frac": G.WeightedMetric.mean_of(flags["clipped"], scored),
               "d1/log_ratio_clamped_frac": G.WeightedMetric.mean_of(flags["clamped"], scored),
               "d1/kl": G.WeightedMetric.mean_of(jax.lax.stop_gradient(flags["kl"]), scored)}
    return jnp.sum(loss * mb["row_scale"][:, None]), metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=None,
                                micro_batch_size=cfg.micro_batch_size,
                                denominator_fn=lambda mb: jnp.sum(mb["row_denominator"]))


def wd1_prepare(graphdef: Any, params: Any, ref_params: Any, batch: Mapping[str, jax.Array],
                keys: scoring.RLKeys, cfg: WD1Config) -> Prepared:
  """Mean-centred advantages and the group softmax weights w⁺, w⁻ (no model evaluation)."""
  del graphdef, params, ref_params, keys
  scoring.check_batch(batch)
  a = adv.mean_centered_advantages(batch["rewards"], batch["group_ids"])
  w_pos, w_neg = adv.wd1_weights(a, batch["group_ids"])
  per_example = {"advantages": a, "weights_pos": w_pos, "weights_neg": w_neg,
                 "inv_group_size": 1.0 / adv.group_count(batch["group_ids"])}
  return Prepared(per_example, {"advantages/abs_mean": jnp.mean(jnp.abs(a))})


def wd1_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
              keys: scoring.RLKeys, cfg: WD1Config) -> tuple[Any, G.LossOutput]:
  """∇ of Σ_i (w⁻_i − w⁺_i)·ℓ_i / P on seed ``keys.iteration mod μ``."""
  pe = aux.per_example
  k = _seed_index(keys, cfg)
  tree = _tree(batch) | {"seed_keys": _seed_keys(keys, batch["example_ids"], cfg),
                         "weights_pos": pe["weights_pos"], "weights_neg": pe["weights_neg"],
                         "inv_group_size": pe["inv_group_size"]}

  def loss_fn(p, mb, _):
    model = nnx.merge(graphdef, p)
    logp, scored = one_step_token_log_probs(model, mb, mb["seed_keys"], k, cfg)
    log_lik = jnp.sum(logp, axis=-1)
    loss = wd1_sequence_loss(mb["weights_pos"], mb["weights_neg"], log_lik, pos_only=cfg.pos_only)
    metrics = {"wd1/nll_per_token": G.WeightedMetric(-jax.lax.stop_gradient(jnp.sum(log_lik)),
                                                     jnp.sum(scored).astype(jnp.float32))}
    return jnp.sum(loss), metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=None,
                                micro_batch_size=cfg.micro_batch_size,
                                denominator_fn=lambda mb: jnp.sum(mb["inv_group_size"]))
