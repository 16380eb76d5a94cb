"""DMPO (weighted denoising cross-entropy, WDCE) and WDDO (`docs/algorithms.md` §2).

Per rollout (``prepare``, no gradient, deterministic): ELBO_v (current = behaviour policy) and
ELBO_ref on the **same** K weight masks (antithetic Bernoulli by default, weight L/m), then

    ℓ_i = coeff·(r_i/α + ELBO_ref,i − ELBO_v,i),   ℓ⁻_i = coeff·(−r_i/α + ELBO_ref,i − ELBO_v,i)
    w = softmax_G(ℓ),  A_i = w_i − s·w_base,i                          (Eq. 10, 12-15)

over the full group of each prompt (α = 0: ℓ = coeff·r, the proximal variant; optional per-group
ESS-targeted coeff). The weights do not depend on θ, so one rollout buffer serves F updates.
The reference code's layout-bound rules (group / model baseline and ESS coefficient over each
GPU's micro-batch, its EOS switches as executed) are options (`docs/algorithms.md` §6).

Per update (``grads``): R fresh loss masks (keyed by the update step), and

    L_WDCE = (1/P) Σ_i A_i · (1/R) Σ_j (1/m_ij) Σ_{d∈M_ij} −log π_θ(y_i,d | masked y_i)      (Eq. 11)

(1/m = ELBO weight / L: the |o| factor dropped as in the code; P = number of prompts, since
the weights of a group sum to 1). A loop over micro-batches × R masks with gradients in the
carry. The model baseline (Eq. 15) needs ELBO_θ of every group member before any gradient: a
no-grad pass (on the weight masks, CRN with ELBO_v, by default) fixes it first.

WDDO (Eq. 16, §2.4, with the pitfalls of §2.6 item 5 fixed: mean-1 weights, averaged replicates,
independent real/fake mask sets):

    L = (1/B) Σ_i [ −w_i·log σ(β(E_θ^real,i − E_v^real,i)) − a·log σ(−β(E_θ^fake,i − E_v^fake,i)) ]

with E the K-sample ELBOs on the weight masks (real) and on an independent fake set; exact
with constant memory by the two-pass method (§5.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.diffusion import elbo
from dmpo_jax.rl import advantages as adv
from dmpo_jax.rl import grad as G
from dmpo_jax.rl import reference_rules
from dmpo_jax.rl import scoring
from dmpo_jax.rl.objectives.base import ObjectiveConfig, Prepared, check_choice, check_positive

MODEL_BASELINE_MASKS = ("weights", "loss")
SCOPES = ("group", "micro_batch")
EOS_LAWS = ("truncate", "as_executed")
_WEIGHT_PURPOSE = "dmpo/weights"
_LOSS_PURPOSE = "dmpo/loss"
_FAKE_PURPOSE = "wddo/fake"


@dataclasses.dataclass(frozen=True)
class _ElboWeightConfig(ObjectiveConfig):
  """Weight settings shared by DMPO and WDDO.

  alpha: KL strength α (0 = proximal variant; -1 = the reference code's raw-reward weights, w = r,
  w⁻ = −r). coeff: logit coefficient. target_ess: if set, a
  per-group coefficient in [0.01, 0.99] giving this normalised ESS (``ada_coeff``).
  target_ess_solver: ``bisection`` (the largest c reaching the target) or ``reference`` (the
  reference's L-BFGS-B from c = 0.5, which stops at 0.5 when the weights there are saturated;
  `reference_rules.reference_ess_coeff`). weight_num_mc: K weight masks. mask_scheme /
  lambda_range: ELBO law (antithetic Bernoulli, λ ∈ [0.1, 1.0) as the released code).
  include_eos_padding: score the full canvas (§1.6). weight_eos_law (with include_eos_padding
  False): ``truncate`` = masks over the positions up to the first EOS, the padding after it clean
  (the ELBO of the truncated response); ``as_executed`` = the reference's ``log_rnd_omit_eos``:
  masks over the full canvas with weight L/m, positions after the first EOS dropped from the sum.
  weight_scale: ``sum1`` (code) or ``mean1`` (paper).
  """
  alpha: float = 0.04
  coeff: float = 1.0
  target_ess: Optional[float] = None
  target_ess_solver: str = "bisection"
  weight_num_mc: int = 4
  mask_scheme: str = "antithetic"
  lambda_range: tuple[float, float] = (0.1, 1.0)
  include_eos_padding: bool = True
  weight_eos_law: str = "truncate"
  weight_scale: str = "sum1"

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    if self.alpha != adv.RAW_REWARD_ALPHA:
      check_positive(errors, "alpha", self.alpha, allow_zero=True)
    check_positive(errors, "coeff", self.coeff)
    if self.target_ess is not None and not 0.0 < self.target_ess <= 1.0:
      errors.append(f"target_ess must be in (0, 1], got {self.target_ess}")
    if self.target_ess is not None and self.alpha == adv.RAW_REWARD_ALPHA:
      errors.append("target_ess needs softmax weights; alpha = -1 uses raw rewards")
    check_choice(errors, "target_ess_solver", self.target_ess_solver, adv.ESS_SOLVERS)
    if self.target_ess_solver != "bisection" and self.target_ess is None:
      errors.append(f"target_ess_solver={self.target_ess_solver!r} needs target_ess")
    check_choice(errors, "weight_eos_law", self.weight_eos_law, EOS_LAWS)
    if self.weight_eos_law != "truncate" and self.include_eos_padding:
      errors.append("weight_eos_law='as_executed' drops the positions after the first EOS: it needs "
                    "include_eos_padding=False")
    if self.weight_num_mc < 1:
      errors.append(f"weight_num_mc must be >= 1, got {self.weight_num_mc}")
    check_choice(errors, "mask_scheme", self.mask_scheme, scoring.ELBO_SCHEMES)
    if self.mask_scheme == "antithetic" and self.weight_num_mc % 2:
      errors.append(f"antithetic masks come in pairs: weight_num_mc must be even, got "
                    f"{self.weight_num_mc}")
    if len(self.lambda_range) != 2 or not 0.0 <= self.lambda_range[0] <= self.lambda_range[1] <= 1.0:
      errors.append(f"lambda_range must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.lambda_range}")
    check_choice(errors, "weight_scale", self.weight_scale, adv.WEIGHT_SCALES)
    return errors


@dataclasses.dataclass(frozen=True)
class DMPOConfig(_ElboWeightConfig):
  """DMPO (defaults: `docs/algorithms.md` §2.8 reproduction defaults).

  baseline: none / group / individual / model (§2.2); baseline_strength: s. loss_num_mc: R
  fresh loss masks per update. model_baseline_masks: ``weights`` (ELBO_θ on the weight masks,
  CRN with ELBO_v; at θ = θ_old it equals the group baseline) or ``loss`` (the reference code's
  choice: ELBO_θ on the loss masks). loss_include_eos_padding: which positions the loss masks
  (None = as ``include_eos_padding``, which then governs the weights only; the reference code has
  separate switches, ``log_rnd_omit_eos`` and ``loss_mask_non_eos``). loss_eos_law (with the loss
  up to the first EOS): ``truncate`` = masks over the positions up to the first EOS (what
  ``loss_mask_non_eos`` intends); ``as_executed`` = what that line does (`reference_rules`:
  full-canvas masks, and the last two rows of each micro-batch's last replicate cleared).
  reference_micro_batch_size: None = the loss is a mean over prompts (weights sum to 1 per group);
  c = the reference code's scale, the mean over micro-batches of c completions of each
  micro-batch's summed loss (× c/G of the default: ½ at the paper's c = 8, G = 16), which the
  published learning rate and ``max_grad_norm`` assume (`grad.loss_normalization`).
  baseline_scope: ``group`` (default) or ``micro_batch``: the group baseline's mean and the model
  baseline's softmax over the reference's micro-batches of c consecutive rows (its per-device
  batch), as the paper's runs computed them. target_ess_scope: the rows one ESS coefficient is
  fitted on, ``group`` or ``micro_batch`` (the reference fits one per device row).
  """
  baseline: str = "individual"
  baseline_strength: float = 1.0
  loss_num_mc: int = 4
  model_baseline_masks: str = "weights"
  loss_include_eos_padding: Optional[bool] = None
  loss_eos_law: str = "truncate"
  reference_micro_batch_size: Optional[int] = None
  baseline_scope: str = "group"
  target_ess_scope: str = "group"

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    check_choice(errors, "baseline", self.baseline, adv.BASELINES)
    check_positive(errors, "baseline_strength", self.baseline_strength, allow_zero=True)
    if self.loss_num_mc < 1:
      errors.append(f"loss_num_mc must be >= 1, got {self.loss_num_mc}")
    if self.mask_scheme == "antithetic" and self.loss_num_mc % 2:
      errors.append(f"antithetic masks come in pairs: loss_num_mc must be even, got {self.loss_num_mc}")
    check_choice(errors, "model_baseline_masks", self.model_baseline_masks, MODEL_BASELINE_MASKS)
    check_positive(errors, "reference_micro_batch_size", self.reference_micro_batch_size,
                   allow_none=True)
    check_choice(errors, "baseline_scope", self.baseline_scope, SCOPES)
    check_choice(errors, "target_ess_scope", self.target_ess_scope, SCOPES)
    check_choice(errors, "loss_eos_law", self.loss_eos_law, EOS_LAWS)
    micro = self.reference_micro_batch_size is not None
    if self.baseline_scope == "micro_batch":
      if not micro:
        errors.append("baseline_scope='micro_batch' needs reference_micro_batch_size")
      if self.baseline not in ("group", "model"):
        errors.append(f"baseline_scope='micro_batch' applies to the group and model baselines, "
                      f"not baseline={self.baseline!r}")
    if self.target_ess_scope == "micro_batch" and (not micro or self.target_ess is None):
      errors.append("target_ess_scope='micro_batch' needs target_ess and reference_micro_batch_size")
    if self.loss_eos_law != "truncate" and (self.loss_eos_padding or not micro):
      errors.append("loss_eos_law='as_executed' needs the loss up to the first EOS "
                    "(loss_include_eos_padding=False) and reference_micro_batch_size")
    return errors

  @property
  def loss_eos_padding(self) -> bool:
    return (self.include_eos_padding if self.loss_include_eos_padding is None
            else self.loss_include_eos_padding)


@dataclasses.dataclass(frozen=True)
class WDDOConfig(_ElboWeightConfig):
  """WDDO. beta: β inside the log-sigmoids (``ddo_beta``). fake_weight: a (``ddo_alpha``).
  Mean-1 weights by default (the paper's scale; §2.6 item 5)."""
  weight_scale: str = "mean1"
  beta: float = 1.0
  fake_weight: float = 1.0

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    check_positive(errors, "beta", self.beta)
    check_positive(errors, "fake_weight", self.fake_weight, allow_zero=True)
    return errors


# -- pure math ------------------------------------------------------------------------------------

def wdce_sample_loss(advantages: jax.Array, log_likelihood: jax.Array, loss_weight: jax.Array,
                     num_samples: int) -> jax.Array:
  """One loss mask's WDCE contribution per row: A_i·(−loss_weight_i·S_i)/R, fp32 [B]
  (loss_weight = 1/m_ij, S = Σ_{d∈M} log π_θ)."""
  return advantages.astype(jnp.float32) * (-loss_weight * log_likelihood) / num_samples


def wddo_terms(weights: jax.Array, elbo_theta_real: jax.Array, elbo_old_real: jax.Array,
               elbo_theta_fake: jax.Array, elbo_old_fake: jax.Array, *, beta: float,
               fake_weight: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """WDDO per-row loss and its derivatives w.r.t. the two current-policy ELBOs.

  loss_i = −w_i·log σ(β x_i) − a·log σ(−β y_i), x = E_θ^real − E_v^real, y = E_θ^fake − E_v^fake;
  ∂loss/∂E_θ^real = −w_i·β·σ(−β x_i),  ∂loss/∂E_θ^fake = a·β·σ(β y_i). fp32 [B] each.
  """
  x = beta * (elbo_theta_real - elbo_old_real).astype(jnp.float32)
  y = beta * (elbo_theta_fake - elbo_old_fake).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  loss = -w * jax.nn.log_sigmoid(x) - fake_weight * jax.nn.log_sigmoid(-y)
  return loss, -w * beta * jax.nn.sigmoid(-x), fake_weight * beta * jax.nn.sigmoid(y)


# -- shared scoring ---------------------------------------------------------------------------------

def _mask_fn(cfg: _ElboWeightConfig, num_samples: int):
  return scoring.elbo_mask_fn(cfg.mask_scheme, num_samples=num_samples,
                              lambda_range=cfg.lambda_range)


def _eligible(model: Any, mb: Mapping[str, jax.Array], cfg: _ElboWeightConfig,
              include_eos_padding: Optional[bool] = None) -> jax.Array:
  include = cfg.include_eos_padding if include_eos_padding is None else include_eos_padding
  return scoring.eligible_positions(mb, model.config.eos_token_id, include)


def _elbo_estimate(model: Any, mb: Mapping[str, jax.Array], keys: jax.Array,
                   cfg: _ElboWeightConfig, num_samples: int) -> elbo.ElboEstimate:
  """K-sample ELBO on the weight masks (no gradient). ``weight_eos_law='as_executed'``: masks and
  weights L/m over the full canvas, the sum over the positions up to the first EOS only."""
  mask_fn, eligible = _mask_fn(cfg, num_samples), _eligible(model, mb, cfg)
  if cfg.weight_eos_law == "as_executed":
    truncated, base_fn = eligible, mask_fn
    eligible = _eligible(model, mb, cfg, include_eos_padding=True)

    def mask_fn(keys, eligible, j):
      sample = base_fn(keys, eligible, j)
      return sample._replace(scored=sample.scored & truncated)
  est = elbo.elbo_estimate(model, mb["sequences"], keys, eligible, mask_fn, num_samples,
                           attention_mask=mb["attention_mask"])
  return jax.tree.map(jax.lax.stop_gradient, est)


def _elbo_mean(model: Any, mb: Mapping[str, jax.Array], keys: jax.Array, cfg: _ElboWeightConfig,
               num_samples: int) -> jax.Array:
  return _elbo_estimate(model, mb, keys, cfg, num_samples).mean


def _base_tree(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in ("sequences", "attention_mask", "completion_mask")}


def _weights_and_elbos(graphdef: Any, params: Any, ref_params: Any,
                       batch: Mapping[str, jax.Array], keys: scoring.RLKeys,
                       cfg: _ElboWeightConfig, need_old: bool,
                       coeff_scope_ids: Optional[jax.Array] = None):
  """ELBO_v and ELBO_ref on shared weight masks and the DMPO weights (no gradient)."""
  tree = _base_tree(batch) | {
      "weight_keys": scoring.example_keys(keys, batch["example_ids"], _WEIGHT_PURPOSE)}
  need_ref = cfg.alpha > 0
  model_v = nnx.merge(graphdef, jax.lax.stop_gradient(params))
  model_ref = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params)) if need_ref else None

  def elbos(mb):
    out = {}
    if need_ref or need_old:
      est = _elbo_estimate(model_v, mb, mb["weight_keys"], cfg, cfg.weight_num_mc)
      out["elbo_old"] = est.mean
      if cfg.weight_num_mc > 1:  # ELBO noise diagnostic: per-sequence variance of the K terms
        out["elbo_old_mc_var"] = jnp.var(est.terms, axis=0, ddof=1)
    if need_ref:
      out["elbo_ref"] = _elbo_mean(model_ref, mb, mb["weight_keys"], cfg, cfg.weight_num_mc)
    return out

  scored = G.micro_batch_map(elbos, tree, cfg.micro_batch_size) if (need_ref or need_old) else {}
  zeros = jnp.zeros(batch["rewards"].shape, jnp.float32)
  log_ratio_ref = scored["elbo_ref"] - scored["elbo_old"] if need_ref else zeros
  weights = adv.dmpo_weights(batch["rewards"], log_ratio_ref, batch["group_ids"], alpha=cfg.alpha,
                             coeff=cfg.coeff, target_ess=cfg.target_ess,
                             weight_scale=cfg.weight_scale, target_ess_solver=cfg.target_ess_solver,
                             coeff_scope_ids=coeff_scope_ids)
  metrics = {"dmpo/ess_mean": jnp.mean(weights["ess"]),
             "dmpo/coeff_mean": jnp.mean(weights["coeff"]),
             "dmpo/log_ratio_ref_mean": jnp.mean(log_ratio_ref),
             "dmpo/log_ratio_ref_abs_max": jnp.max(jnp.abs(log_ratio_ref)),
             "dmpo/weight_max": jnp.max(weights["weights"])}
  if "elbo_old_mc_var" in scored:
    metrics["elbo/mc_variance"] = jnp.mean(scored.pop("elbo_old_mc_var"))
  return weights, scored, metrics


# -- DMPO ------------------------------------------------------------------------------------------

def _scope_ids(batch: Mapping[str, jax.Array], cfg: DMPOConfig, scope: str) -> jax.Array:
  """Labels of the rows a statistic runs over: the groups, or the reference micro-batches."""
  if scope == "group":
    return batch["group_ids"]
  return reference_rules.micro_batch_ids(batch["rewards"].shape[0], cfg.reference_micro_batch_size)


def _loss_sample(model: Any, mb: Mapping[str, jax.Array], cfg: DMPOConfig,
                 j: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
  """Loss mask j of each row: (MaskSample, keep [b] (0 where the as-executed
  ``loss_mask_non_eos`` clears the row), eligible count [b])."""
  as_executed = cfg.loss_eos_law == "as_executed"
  eligible = _eligible(model, mb, cfg, True if as_executed else cfg.loss_eos_padding)
  sample = _mask_fn(cfg, cfg.loss_num_mc)(mb["loss_keys"], eligible, j)
  keep = jnp.ones(sample.weight.shape, jnp.float32)
  if as_executed:
    keep = reference_rules.non_eos_mask_keep(mb["reference_row"], mb["reference_tail"], j,
                                             cfg.loss_num_mc, cfg.reference_micro_batch_size)
  return sample, keep, jnp.maximum(jnp.sum(eligible, axis=-1), 1).astype(jnp.float32)


def dmpo_prepare(graphdef: Any, params: Any, ref_params: Any, batch: Mapping[str, jax.Array],
                 keys: scoring.RLKeys, cfg: DMPOConfig) -> Prepared:
  """Weights, baseline-subtracted weights A (except the model baseline, done in ``grads``) and
  ELBO_v, once per rollout (no gradient)."""
  scoring.check_batch(batch)
  group_ids = batch["group_ids"]
  coeff_scope = _scope_ids(batch, cfg, cfg.target_ess_scope)
  weights, scored, metrics = _weights_and_elbos(graphdef, params, ref_params, batch, keys, cfg,
                                                need_old=cfg.baseline == "model",
                                                coeff_scope_ids=coeff_scope)
  if cfg.baseline == "model":
    a = weights["weights"]
  else:
    base = adv.dmpo_baseline(cfg.baseline, _scope_ids(batch, cfg, cfg.baseline_scope),
                             negative_weights=weights["negative_weights"],
                             weight_scale=cfg.weight_scale, weights=weights["weights"])
    a = weights["weights"] - cfg.baseline_strength * base
  per_example = {"weights": weights["weights"], "advantages": a,
                 "inv_group_size": 1.0 / adv.group_count(group_ids)}
  if "elbo_old" in scored:
    per_example["elbo_old"] = scored["elbo_old"]
  metrics["dmpo/advantage_abs_mean"] = jnp.mean(jnp.abs(a))
  return Prepared(per_example, metrics)


def dmpo_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
               keys: scoring.RLKeys, cfg: DMPOConfig) -> tuple[Any, G.LossOutput]:
  """∇ L_WDCE: loop over micro-batches × R fresh loss masks (keyed by ``keys.update_step``).

  With the model baseline, ``batch`` must hold whole groups (its softmax is over the group)."""
  pe = aux.per_example
  row_scale, row_denominator = G.loss_normalization(pe["inv_group_size"],
                                                    cfg.reference_micro_batch_size)
  tree = _base_tree(batch) | {
      "advantages": pe["advantages"], "row_scale": row_scale, "row_denominator": row_denominator,
      "loss_keys": scoring.example_keys(keys, batch["example_ids"], _LOSS_PURPOSE, fresh=True)}
  r = cfg.loss_num_mc
  if cfg.loss_eos_law == "as_executed":
    c = cfg.reference_micro_batch_size
    b = batch["rewards"].shape[0]
    eos = scoring.model_config(graphdef, params).eos_token_id
    truncated = jnp.sum(scoring.eligible_positions(batch, eos, False), axis=-1)
    tree["reference_row"] = jnp.arange(b, dtype=jnp.int32) % c
    tree["reference_tail"] = reference_rules.micro_batch_any(
        truncated < scoring.canvas_length(batch), c)

  if cfg.baseline == "model":
    model0 = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    if cfg.model_baseline_masks == "weights":
      elbo_theta = G.micro_batch_map(
          lambda mb: _elbo_mean(model0, mb, mb["theta_keys"], cfg, cfg.weight_num_mc),
          _base_tree(batch) | {"theta_keys": scoring.example_keys(keys, batch["example_ids"],
                                                                  _WEIGHT_PURPOSE)},
          cfg.micro_batch_size)
    else:  # the reference's choice: ELBO_θ (weight L/m) on this update's loss masks
      def theta_on_loss_masks(mb):
        def body(total, j):
          sample, keep, _ = _loss_sample(model0, mb, cfg, j)
          term = elbo.elbo_term(model0, mb["sequences"], sample, mb["attention_mask"])
          return total + keep * term, None
        total, _ = jax.lax.scan(body, jnp.zeros(mb["sequences"].shape[:1], jnp.float32),
                                jnp.arange(r, dtype=jnp.int32))
        return total / r
      elbo_theta = G.micro_batch_map(theta_on_loss_masks, tree, cfg.micro_batch_size)
    base = adv.dmpo_baseline("model", _scope_ids(batch, cfg, cfg.baseline_scope),
                             model_log_ratio=elbo_theta - pe["elbo_old"],
                             weight_scale=cfg.weight_scale)
    tree["advantages"] = pe["weights"] - cfg.baseline_strength * base

  def loss_fn(p, mb, j):
    model = nnx.merge(graphdef, p)
    sample, keep, n_eligible = _loss_sample(model, mb, cfg, j)
    log_lik = elbo.masked_log_likelihood(model, mb["sequences"], sample, mb["attention_mask"])
    contribution = keep * mb["row_scale"] * wdce_sample_loss(mb["advantages"], log_lik,
                                                             sample.weight / n_eligible, r)
    m = jnp.sum(sample.scored, axis=-1)
    metrics = {"dmpo/small_mask_frac": G.WeightedMetric.mean_of(m < 4),
               "dmpo/masked_nll_per_token": G.WeightedMetric(
                   -jax.lax.stop_gradient(jnp.sum(log_lik)), jnp.sum(m).astype(jnp.float32))}
    return jnp.sum(contribution), metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=r,
                                micro_batch_size=cfg.micro_batch_size,
                                denominator_fn=lambda mb: jnp.sum(mb["row_denominator"]))


# -- WDDO ------------------------------------------------------------------------------------------

def wddo_prepare(graphdef: Any, params: Any, ref_params: Any, batch: Mapping[str, jax.Array],
                 keys: scoring.RLKeys, cfg: WDDOConfig) -> Prepared:
  """Weights (mean-1 by default), ELBO_v on the weight ("real") masks and on an independent
  fake mask set, once per rollout (no gradient)."""
  scoring.check_batch(batch)
  weights, scored, metrics = _weights_and_elbos(graphdef, params, ref_params, batch, keys, cfg,
                                                need_old=True)
  model_v = nnx.merge(graphdef, jax.lax.stop_gradient(params))
  fake_keys = scoring.example_keys(keys, batch["example_ids"], _FAKE_PURPOSE)
  elbo_old_fake = G.micro_batch_map(
      lambda mb: _elbo_mean(model_v, mb, mb["fake_keys"], cfg, cfg.weight_num_mc),
      _base_tree(batch) | {"fake_keys": fake_keys}, cfg.micro_batch_size)
  per_example = {"weights": weights["weights"], "elbo_old": scored["elbo_old"],
                 "elbo_old_fake": elbo_old_fake}
  return Prepared(per_example, metrics)


def wddo_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
               keys: scoring.RLKeys, cfg: WDDOConfig) -> tuple[Any, G.LossOutput]:
  """Exact two-pass WDDO: pass 1 (no grad) gives E_θ^real, E_θ^fake and the log-sigmoid
  derivatives; pass 2 loops over the 2K masks accumulating c·∇ℓ_θ^{(j)}/K."""
  pe = aux.per_example
  k = cfg.weight_num_mc
  real_keys = scoring.example_keys(keys, batch["example_ids"], _WEIGHT_PURPOSE)
  fake_keys = scoring.example_keys(keys, batch["example_ids"], _FAKE_PURPOSE)
  model0 = nnx.merge(graphdef, jax.lax.stop_gradient(params))
  tree = _base_tree(batch) | {"real_keys": real_keys, "fake_keys": fake_keys}
  theta = G.micro_batch_map(
      lambda mb: {"real": _elbo_mean(model0, mb, mb["real_keys"], cfg, k),
                  "fake": _elbo_mean(model0, mb, mb["fake_keys"], cfg, k)},
      tree, cfg.micro_batch_size)
  loss, coef_real, coef_fake = wddo_terms(pe["weights"], theta["real"], pe["elbo_old"],
                                          theta["fake"], pe["elbo_old_fake"], beta=cfg.beta,
                                          fake_weight=cfg.fake_weight)
  tree = _base_tree(batch) | {
      "keys2": jnp.stack([real_keys, fake_keys], axis=1),
      "coef2": jnp.stack([coef_real, coef_fake], axis=1), "loss": loss,
      "log_ratio_real": theta["real"] - pe["elbo_old"]}

  def loss_fn(p, mb, j):
    model = nnx.merge(graphdef, p)
    which, mc_index = j // k, j % k
    sample_keys = jax.lax.dynamic_index_in_dim(mb["keys2"], which, axis=1, keepdims=False)
    coef = jax.lax.dynamic_index_in_dim(mb["coef2"], which, axis=1, keepdims=False)
    sample = _mask_fn(cfg, k)(sample_keys, _eligible(model, mb, cfg), mc_index)
    term = elbo.elbo_term(model, mb["sequences"], sample, mb["attention_mask"])
    value = jnp.sum(mb["loss"]) / (2 * k)
    numerator = G.value_with_surrogate_grad(value, jnp.sum(coef * term) / k)
    metrics = {"wddo/log_ratio_real_mean": G.WeightedMetric(
        jnp.sum(mb["log_ratio_real"]) / (2 * k), jnp.asarray(mb["loss"].shape[0] / (2 * k)))}
    return numerator, metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=2 * k,
                                micro_batch_size=cfg.micro_batch_size,
                                denominator_fn=lambda mb: jnp.asarray(mb["loss"].shape[0],
                                                                      jnp.float32))
