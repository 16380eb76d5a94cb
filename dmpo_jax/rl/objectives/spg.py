"""SPG, Sandwiched Policy Gradient (`docs/algorithms.md` §1.5, §4.4).

A = r − mean_G r (no std). Block-wise masks (SPG ``block_random``), ``num_mc`` draws per
iteration, fresh per inner iteration. Sequence scores (c = valid completion positions, M_j =
scored positions of draw j, t_j = |M_j|/|c|):

    ℓ⁺_i = (1/n) Σ_j (1/|M_j|) Σ_{d∈M_j} log π_θ(y_d | ·)                 (ELBO-type)
    P̄_d  = (1/n) Σ_j 1[d∈M_j] π_θ(y_d | ·)^β / t_j
    EUBO_i = (1/β) · mean_{d : P̄_d > 0} log P̄_d                         (upper bound)
    ℓ⁻_i = EUBO (``eubo``), w·EUBO + (1−w)·ℓ⁺ (``mix``), ℓ⁺ (``elbo``) or 0 (``zero``)
    ℓ_i = ℓ⁺_i if A_i > 0 else ℓ⁻_i
    L = Σ_i (−A_i·ℓ_i·|c_i|) / Σ_i |c_i|

ℓ⁺ is a sum of per-sample terms; the EUBO is a log of an MC mean per token, made exact with
constant memory by the two-pass method (§5.2): pass 1 (no grad) accumulates log P̄ [B, T] in
log space (fp32 logsumexp), pass 2 accumulates per sample
∂EUBO/∂log π_jd = π_jd^β / (t_j·n·P̄_d·N_i) (N_i = #{d : P̄_d > 0}), every factor ≤ 1.
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
from dmpo_jax.rl.objectives.base import ObjectiveConfig, Prepared, check_choice, check_positive

NEGATIVE_ESTIMATORS = ("eubo", "mix", "elbo", "zero")
_MASK_PURPOSE = "spg/block"


@dataclasses.dataclass(frozen=True)
class SPGConfig(ObjectiveConfig):
  """num_mc: num_t draws (2 in SPG's scripts). block_length: the sampler's block (32).
  min_t / max_t: range of the in-block mask fraction. negative_estimator: eubo / mix / elbo /
  zero. eubo_beta: β (1.5 GSM8K/MATH, 2.0 Countdown, 1.0 Sudoku). mix_weight: w of ``mix``.
  p_mask_prompt: optional extra masking of clean positions (0.15 in SPG's published runs).
  reference_prompt_masking: SPG's ``forward_process`` law for that extra masking (the chosen
  block's unselected positions are never prompt-masked; prompt-masked earlier completion
  positions are scored and counted in t_j; `masking.spg_block_mask`). include_eos_padding:
  False = score up to and including the first EOS. reference_micro_batch_size: None = one
  Σ|c| normalisation over the update batch; c = SPG's, Σ|c| per micro-batch of c completions,
  averaged over micro-batches (`grad.loss_normalization`)."""
  num_mc: int = 2
  block_length: int = 32
  min_t: float = 0.0
  max_t: float = 1.0
  negative_estimator: str = "eubo"
  eubo_beta: float = 1.5
  mix_weight: float = 0.5
  p_mask_prompt: float = 0.0
  reference_prompt_masking: bool = False
  include_eos_padding: bool = False
  reference_micro_batch_size: Optional[int] = None

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    if self.num_mc < 1:
      errors.append(f"num_mc must be >= 1, got {self.num_mc}")
    if self.block_length < 1:
      errors.append(f"block_length must be >= 1, got {self.block_length}")
    if not 0.0 <= self.min_t <= self.max_t <= 1.0:
      errors.append(f"need 0 <= min_t <= max_t <= 1, got ({self.min_t}, {self.max_t})")
    check_choice(errors, "negative_estimator", self.negative_estimator, NEGATIVE_ESTIMATORS)
    check_positive(errors, "eubo_beta", self.eubo_beta)
    if not 0.0 <= self.mix_weight <= 1.0:
      errors.append(f"mix_weight must be in [0, 1], got {self.mix_weight}")
    if not 0.0 <= self.p_mask_prompt <= 1.0:
      errors.append(f"p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}")
    check_positive(errors, "reference_micro_batch_size", self.reference_micro_batch_size,
                   allow_none=True)
    return errors


# -- pure math ------------------------------------------------------------------------------------

def eubo_log_mean_update(log_total: jax.Array, token_log_probs: jax.Array, scored: jax.Array,
                         ratio: jax.Array, beta: float) -> jax.Array:
  """log Σ_j 1[d∈M_j]·π_jd^β/t_j accumulated in log space: logaddexp(log_total, β·logπ − log t)."""
  log_t = jnp.log(jnp.maximum(ratio.astype(jnp.float32), 1e-30))[:, None]
  contribution = jnp.where(scored, beta * token_log_probs.astype(jnp.float32) - log_t, -jnp.inf)
  return jnp.logaddexp(log_total, contribution)


def eubo_from_log_total(log_total: jax.Array, num_samples: int,
                        beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(EUBO [B], log P̄ [B, T] (0 where P̄ = 0), N_i = #{d : P̄_d > 0} [B]) from the log total."""
  covered = jnp.isfinite(log_total)
  log_mean = jnp.where(covered, log_total - jnp.log(float(num_samples)), 0.0)
  count = jnp.sum(covered, axis=-1).astype(jnp.float32)
  eubo = jnp.sum(log_mean, axis=-1) / (beta * jnp.maximum(count, 1.0))
  return eubo, log_mean, count


def spg_sequence_loss(advantages: jax.Array, positive_score: jax.Array,
                      negative_score: jax.Array, completion_length: jax.Array) -> jax.Array:
  """Per-row −A_i·ℓ_i·|c_i| with ℓ_i = positive_score if A_i > 0 else negative_score, fp32 [B]."""
  a = advantages.astype(jnp.float32)
  score = jnp.where(a > 0, positive_score, negative_score)
  return -a * score * completion_length.astype(jnp.float32)


# -- model-facing ---------------------------------------------------------------------------------

def _tree(batch: Mapping[str, jax.Array], keys: scoring.RLKeys) -> dict[str, jax.Array]:
  tree = {k: batch[k] for k in ("sequences", "attention_mask", "prompt_mask", "completion_mask")}
  tree["mask_keys"] = scoring.example_keys(keys, batch["example_ids"], _MASK_PURPOSE,
                                           per_iteration=True)
  return tree


def _sample(model: Any, mb: Mapping[str, jax.Array], j: jax.Array,
            cfg: SPGConfig) -> tuple[jax.Array, masking.MaskSample]:
  eligible = scoring.eligible_positions(mb, model.config.eos_token_id, cfg.include_eos_padding)
  sample = masking.spg_block_mask(
      mb["mask_keys"], eligible, j, completion_positions=mb["completion_mask"].astype(jnp.bool_),
      block_length=cfg.block_length, min_t=cfg.min_t, max_t=cfg.max_t,
      prompt_positions=scoring.real_prompt_positions(mb), p_mask_prompt=cfg.p_mask_prompt,
      reference_prompt_masking=cfg.reference_prompt_masking)
  logp = elbo.masked_token_log_probs(model, mb["sequences"], sample, mb["attention_mask"])
  return logp, sample


def spg_prepare(graphdef: Any, params: Any, ref_params: Any, batch: Mapping[str, jax.Array],
                keys: scoring.RLKeys, cfg: SPGConfig) -> Prepared:
  """Mean-centred advantages and the valid completion lengths |c_i| (no model evaluation)."""
  del ref_params, keys
  scoring.check_batch(batch)
  a = adv.mean_centered_advantages(batch["rewards"], batch["group_ids"])
  eos = scoring.model_config(graphdef, params).eos_token_id
  length = jnp.sum(scoring.eligible_positions(batch, eos, cfg.include_eos_padding), axis=-1)
  per_example = {"advantages": a, "completion_length": length.astype(jnp.float32)}
  metrics = {"advantages/abs_mean": jnp.mean(jnp.abs(a)),
             "spg/positive_frac": jnp.mean((a > 0).astype(jnp.float32))}
  return Prepared(per_example, metrics)


def spg_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
              keys: scoring.RLKeys, cfg: SPGConfig) -> tuple[Any, G.LossOutput]:
  """∇ of the SPG loss on the masks of inner iteration ``keys.iteration`` (two-pass EUBO)."""
  pe = aux.per_example
  n, beta = cfg.num_mc, cfg.eubo_beta
  row_scale, row_denominator = G.loss_normalization(
      pe["completion_length"], cfg.reference_micro_batch_size,
      reference_counts=pe["completion_length"])
  tree = _tree(batch, keys) | {"advantages": pe["advantages"], "row_scale": row_scale,
                               "row_denominator": row_denominator,
                               "completion_length": pe["completion_length"]}
  needs_eubo = cfg.negative_estimator in ("eubo", "mix")
  if needs_eubo:
    model0 = nnx.merge(graphdef, jax.lax.stop_gradient(params))

    def pass1(mb):
      def body(log_total, j):
        logp, sample = _sample(model0, mb, j, cfg)
        return eubo_log_mean_update(log_total, logp, sample.scored, sample.ratio, beta), None

      init = jnp.full(mb["sequences"].shape, -jnp.inf, jnp.float32)
      log_total, _ = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
      eubo, log_mean, count = eubo_from_log_total(log_total, n, beta)
      return {"eubo": eubo, "eubo_log_mean": log_mean, "eubo_count": count}

    tree = tree | G.micro_batch_map(pass1, tree, cfg.micro_batch_size)

  def loss_fn(p, mb, j):
    model = nnx.merge(graphdef, p)
    logp, sample = _sample(model, mb, j, cfg)
    positive = sample.weight * jnp.sum(logp, axis=-1) / n
    if needs_eubo:
      log_t = jnp.log(jnp.maximum(sample.ratio, 1e-30))[:, None]
      coef = jnp.where(sample.scored,
                       jnp.exp(jnp.minimum(beta * logp - log_t - mb["eubo_log_mean"], 80.0)), 0.0)
      coef = jax.lax.stop_gradient(coef / (n * jnp.maximum(mb["eubo_count"], 1.0))[:, None])
      eubo = G.value_with_surrogate_grad(mb["eubo"] / n, jnp.sum(coef * logp, axis=-1))
    if cfg.negative_estimator == "eubo":
      negative = eubo
    elif cfg.negative_estimator == "mix":
      negative = cfg.mix_weight * eubo + (1.0 - cfg.mix_weight) * positive
    elif cfg.negative_estimator == "elbo":
      negative = positive
    else:
      negative = jnp.zeros_like(positive)
    loss = spg_sequence_loss(mb["advantages"], positive, negative, mb["completion_length"])
    metrics = {"spg/mask_ratio": G.WeightedMetric.mean_of(sample.ratio)}
    return jnp.sum(loss * mb["row_scale"]), metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=n,
                                micro_batch_size=cfg.micro_batch_size,
                                denominator_fn=lambda mb: jnp.sum(mb["row_denominator"]))
