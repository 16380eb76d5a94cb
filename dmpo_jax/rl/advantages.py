"""Group statistics, advantages and DMPO importance weights (`docs/algorithms.md` §2-§4).

Every group statistic is computed over the **full group** of one prompt on the global batch
(`docs/algorithms.md` §0.3 rule 3, pitfalls §5.5): group membership is given by ``group_ids`` [B]
(any integer labels, members in any positions of the batch), and the statistics use the
[B, B] same-group matrix, so they do not depend on where a group's members sit (device layout,
shuffling). All statistics are fp32 and safe for extreme inputs (no NaN/inf for finite inputs
up to ~1e37; non-finite rewards or log-ratios are clamped to ±`LOGIT_LIMIT`).
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from dmpo_jax.rl import reference_rules

# Logits of every softmax are clamped to this range: exp differences stay exact for all
# realistic values while ±inf/NaN inputs (e.g. r/α overflowing) cannot produce NaN weights.
LOGIT_LIMIT = 1e30
BASELINES = ("none", "group", "individual", "model")
# DMPO's alpha = -1: raw rewards as weights (`docs/algorithms.md` §2.3 step 5).
RAW_REWARD_ALPHA = -1.0
WEIGHT_SCALES = ("sum1", "mean1")
ESS_SOLVERS = ("bisection", "reference")


# -- group primitives ------------------------------------------------------------------------------

def same_group(group_ids: jax.Array) -> jax.Array:
  """[B, B] bool: same_group[i, j] = (group_ids[i] == group_ids[j])."""
  chex.assert_rank(group_ids, 1)
  return group_ids[:, None] == group_ids[None, :]


def group_count(group_ids: jax.Array) -> jax.Array:
  """Size of each row's group, fp32 [B]."""
  return jnp.sum(same_group(group_ids), axis=-1).astype(jnp.float32)


def group_sum(values: jax.Array, group_ids: jax.Array) -> jax.Array:
  """Σ_{j in group(i)} values[j], broadcast back to every row [B]."""
  chex.assert_equal_shape([values, group_ids])
  return jnp.sum(jnp.where(same_group(group_ids), values[None, :].astype(jnp.float32), 0.0), -1)


def group_mean(values: jax.Array, group_ids: jax.Array) -> jax.Array:
  """Group mean per row [B]; each value is divided by the group size before summing so that the
  sum cannot overflow."""
  counts = group_count(group_ids)
  return group_sum(values.astype(jnp.float32) / counts, group_ids)


def group_max(values: jax.Array, group_ids: jax.Array) -> jax.Array:
  chex.assert_equal_shape([values, group_ids])
  return jnp.max(jnp.where(same_group(group_ids), values[None, :].astype(jnp.float32), -jnp.inf),
                 axis=-1)


def group_std(values: jax.Array, group_ids: jax.Array, ddof: int = 1) -> jax.Array:
  """Group standard deviation per row [B] (``ddof=1``: unbiased, as torch.std / verl GRPO).

  Computed on the centred values rescaled by the group's largest |deviation|, so squares cannot
  overflow for extreme rewards. Groups of size <= ddof get 0.
  """
  values = values.astype(jnp.float32)
  centred = values - group_mean(values, group_ids)
  scale = group_max(jnp.abs(centred), group_ids)
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  counts = group_count(group_ids)
  sq = group_sum(jnp.square(centred / safe_scale), group_ids)
  var = sq / jnp.maximum(counts - ddof, 1.0)
  return jnp.where((counts > ddof) & (scale > 0), safe_scale * jnp.sqrt(var), 0.0)


def sanitize_logits(logits: jax.Array) -> jax.Array:
  """fp32 logits with ±inf and huge values clamped to ±LOGIT_LIMIT (NaN is left visible)."""
  return jnp.clip(logits.astype(jnp.float32), -LOGIT_LIMIT, LOGIT_LIMIT)


def group_log_softmax(logits: jax.Array, group_ids: jax.Array) -> jax.Array:
  """log softmax over each row's group: logits[i] − logsumexp_{j in group(i)} logits[j]."""
  logits = sanitize_logits(logits)
  m = group_max(logits, group_ids)
  shifted = logits[None, :] - m[:, None]
  lse = jnp.log(jnp.sum(jnp.where(same_group(group_ids), jnp.exp(shifted), 0.0), axis=-1))
  return logits - m - lse


def group_softmax(logits: jax.Array, group_ids: jax.Array) -> jax.Array:
  """softmax over each row's group (weights of a group sum to 1), fp32 [B]."""
  return jnp.exp(group_log_softmax(logits, group_ids))


# -- advantages --------------------------------------------------------------------------------------

def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, *, eps: float = 1e-6,
                    std_ddof: int = 1) -> jax.Array:
  """Group z-score A_i = (r_i − mean_G r) / (std_G r + eps) (BGPO Eq. 18, `docs/algorithms.md` §3.4).

  Groups with zero spread get A = 0. fp32 [B].
  """
  chex.assert_equal_shape([rewards, group_ids])
  rewards = rewards.astype(jnp.float32)
  centred = rewards - group_mean(rewards, group_ids)
  std = group_std(rewards, group_ids, ddof=std_ddof)
  # Divide by the std first and add eps relative to it: centred / (std + eps) without overflow.
  return jnp.where(std > 0, centred / (std + eps), 0.0)


def mean_centered_advantages(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
  """A_i = r_i − mean_G r, no division by the std (diffu-GRPO, wd1, SPG; `docs/algorithms.md` §4)."""
  chex.assert_equal_shape([rewards, group_ids])
  rewards = rewards.astype(jnp.float32)
  return rewards - group_mean(rewards, group_ids)


def zero_std_fraction(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
  """Fraction of rows whose group has identical rewards (d1's ``zero_std_ratio``)."""
  return jnp.mean((group_std(rewards, group_ids) == 0).astype(jnp.float32))


# -- DMPO weights (`docs/algorithms.md` §2.1-§2.3, §2.9) -----------------------------------------------

def dmpo_logits(rewards: jax.Array, log_ratio_ref: jax.Array, *, alpha: float,
                coeff: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Positive and negative weight logits (`docs/algorithms.md` §2.3 step 4).

  α > 0:  ℓ = coeff·(r/α + log p_ref − log p_v),   ℓ⁻ = coeff·(−r/α + log p_ref − log p_v).
  α = 0 (proximal limit, App. B.2):  ℓ = coeff·r,  ℓ⁻ = −coeff·r.
  ``log_ratio_ref`` = ELBO_ref − ELBO_v per row. ``coeff`` may be a scalar or per-row [B].
  """
  chex.assert_equal_shape([rewards, log_ratio_ref])
  if alpha < 0:
    raise ValueError(f"DMPO alpha must be >= 0 (0 = proximal variant), got {alpha}")
  r = rewards.astype(jnp.float32)
  if alpha == 0:
    pos, neg = r, -r
  else:
    tilt = r / alpha
    lr = log_ratio_ref.astype(jnp.float32)
    pos, neg = lr + tilt, lr - tilt
  coeff = jnp.asarray(coeff, jnp.float32)
  return sanitize_logits(coeff * sanitize_logits(pos)), sanitize_logits(coeff * sanitize_logits(neg))


def normalized_ess_from_sums(sum_w: jax.Array | float, sum_sq_w: jax.Array,
                             count: jax.Array) -> jax.Array:
  """The project's one ESS formula: Kish's normalised effective sample size of N weights,

    ESS / N = (Σ w)² / (N · Σ w²)  ∈ [1/N, 1]   (Kish 1965, *Survey Sampling*)

  (1/N: all mass on one sample; 1: uniform), from the sums; 1 where Σ w² = 0 (all-zero weights).
  DMPO's ``ada_coeff`` targets it for softmax weights, where Σ w = 1 (`docs/algorithms.md` §2.3).
  """
  sum_sq_w = jnp.asarray(sum_sq_w, jnp.float32)
  return jnp.where(sum_sq_w > 0, jnp.square(sum_w) / (count * jnp.maximum(sum_sq_w, 1e-38)), 1.0)


def normalized_ess(weights: jax.Array, group_ids: jax.Array) -> jax.Array:
  """`normalized_ess_from_sums` over each row's group, fp32 [B]."""
  w = weights.astype(jnp.float32)
  return normalized_ess_from_sums(group_sum(w, group_ids), group_sum(jnp.square(w), group_ids),
                                  group_count(group_ids))


def ess_targeted_coeff(logits: jax.Array, group_ids: jax.Array, *, target_ess: float,
                       coeff_range: tuple[float, float] = (0.01, 0.99),
                       iterations: int = 40) -> jax.Array:
  """Per-group coefficient c such that normalised ESS(softmax(c·ℓ)) = target (`ada_coeff`).

  ESS(softmax(c·ℓ)) is non-increasing in c (Rényi-2 entropy of a tempered distribution), so a
  bisection on [lo, hi] finds the largest c whose ESS is still >= target: c = hi if even hi keeps
  ESS >= target, c = lo if even lo falls below it. Returns fp32 [B], constant within a group.
  """
  if not 0.0 < target_ess <= 1.0:
    raise ValueError(f"target ESS must be in (0, 1], got {target_ess}")
  lo_c, hi_c = coeff_range
  if not 0.0 < lo_c <= hi_c:
    raise ValueError(f"coeff_range must satisfy 0 < lo <= hi, got {coeff_range}")
  logits = sanitize_logits(logits)
  same = same_group(group_ids)
  counts = group_count(group_ids)

  def ess_at(c):  # c: [B] per row (equal within a group) -> ESS of that row's group
    z = jnp.where(same, c[:, None] * logits[None, :], -jnp.inf)
    w = jax.nn.softmax(z, axis=-1)
    # Softmax rows: Σ w = 1 (the reference's 1 / (N·Σw²)), not re-summed in fp32.
    return normalized_ess_from_sums(1.0, jnp.sum(jnp.square(w), axis=-1), counts)

  lo = jnp.full(logits.shape, lo_c, jnp.float32)
  hi = jnp.full(logits.shape, hi_c, jnp.float32)
  # Decided once, outside the loop: re-evaluating the ESS at the final bracket could round
  # differently and flip a feasible answer to the lower end of the range.
  hi_feasible = ess_at(hi) >= target_ess
  lo_feasible = ess_at(lo) >= target_ess

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = ess_at(mid) >= target_ess
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iterations, body, (lo, hi))
  return jnp.where(hi_feasible, hi_c, jnp.where(lo_feasible, lo, lo_c))


def scale_weights(weights: jax.Array, group_ids: jax.Array, weight_scale: str) -> jax.Array:
  """``sum1`` (code): unchanged softmax weights; ``mean1`` (paper): N·softmax."""
  if weight_scale not in WEIGHT_SCALES:
    raise ValueError(f"weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
  return weights if weight_scale == "sum1" else weights * group_count(group_ids)


def dmpo_weights(rewards: jax.Array, log_ratio_ref: jax.Array, group_ids: jax.Array, *,
                 alpha: float, coeff: float = 1.0, target_ess: Optional[float] = None,
                 weight_scale: str = "sum1", target_ess_solver: str = "bisection",
                 coeff_scope_ids: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """DMPO importance weights w = softmax_G(ℓ) and negative weights w⁻ = softmax_G(ℓ⁻)
  (`docs/algorithms.md` §2.1 Eq. 10, §2.3), both over the full group of each prompt.

  ``alpha = -1`` (`RAW_REWARD_ALPHA`, the reference code's special case, §2.3 step 5): the raw
  reward is the weight and −r the negative weight (no softmax, no ``weight_scale``).

  With ``target_ess`` the coefficient is chosen per scope (``coeff_scope_ids``, default the
  groups) on the coefficient-free logits and also used for ℓ⁻: by `ess_targeted_coeff`
  (``bisection``: the largest c whose ESS still reaches the target) or by the DMPO reference's
  L-BFGS-B (``reference``, `reference_rules.reference_ess_coeff`). Returns fp32 [B] arrays
  ``weights``, ``negative_weights`` (scaled per ``weight_scale``), ``coeff`` and ``ess``.
  """
  if alpha == RAW_REWARD_ALPHA:
    if target_ess is not None:
      raise ValueError("DMPO alpha = -1 (raw-reward weights) has no softmax to target an ESS for")
    r = rewards.astype(jnp.float32)
    return {"weights": r, "negative_weights": -r, "coeff": jnp.ones_like(r),
            "ess": normalized_ess(r, group_ids)}
  if target_ess_solver not in ESS_SOLVERS:
    raise ValueError(f"target_ess_solver must be one of {ESS_SOLVERS}, got {target_ess_solver!r}")
  scope = group_ids if coeff_scope_ids is None else coeff_scope_ids
  if target_ess is not None and target_ess_solver == "reference":
    coeff_rows = reference_rules.reference_ess_coeff(log_ratio_ref, rewards, scope, alpha=alpha,
                                                     target_ess=target_ess)
  elif target_ess is not None:
    raw, _ = dmpo_logits(rewards, log_ratio_ref, alpha=alpha, coeff=1.0)
    coeff_rows = ess_targeted_coeff(raw, scope, target_ess=target_ess)
  else:
    coeff_rows = jnp.full(rewards.shape, coeff, jnp.float32)
  pos, neg = dmpo_logits(rewards, log_ratio_ref, alpha=alpha, coeff=coeff_rows)
  w = group_softmax(pos, group_ids)
  w_neg = group_softmax(neg, group_ids)
  return {"weights": scale_weights(w, group_ids, weight_scale),
          "negative_weights": scale_weights(w_neg, group_ids, weight_scale),
          "coeff": coeff_rows, "ess": normalized_ess(w, group_ids)}


def dmpo_baseline(kind: str, group_ids: jax.Array, *, negative_weights: Optional[jax.Array] = None,
                  model_log_ratio: Optional[jax.Array] = None,
                  weight_scale: str = "sum1", weights: Optional[jax.Array] = None) -> jax.Array:
  """Weight baseline w_base of `docs/algorithms.md` §2.2 at the scale of the weights, fp32 [B].

  none: 0.   group (Eq. 13): 1/N (sum-1 scale), 1 (mean-1 scale); with ``weights`` given, their
  group mean (the same for softmax weights; the group mean reward for alpha = -1's raw weights).
  individual (Eq. 14): the negative weights softmax_G(ℓ⁻) (already scaled).
  model (Eq. 15): softmax_G(ELBO_θ − ELBO_v) (``model_log_ratio``), scaled like the weights.
  ``group_ids`` is the scope of the group and model statistics: the groups, or the reference's
  per-device micro-batches (`reference_rules.micro_batch_ids`, `docs/algorithms.md` §6).
  """
  if kind not in BASELINES:
    raise ValueError(f"DMPO baseline must be one of {BASELINES}, got {kind!r}")
  if kind == "none":
    return jnp.zeros(group_ids.shape, jnp.float32)
  if kind == "group":
    if weights is not None:
      return group_mean(weights, group_ids)
    return scale_weights(1.0 / group_count(group_ids), group_ids, weight_scale)
  if kind == "individual":
    if negative_weights is None:
      raise ValueError("the individual baseline needs negative_weights")
    return negative_weights.astype(jnp.float32)
  if model_log_ratio is None:
    raise ValueError("the model baseline needs model_log_ratio = ELBO_θ − ELBO_v")
  return scale_weights(group_softmax(model_log_ratio, group_ids), group_ids, weight_scale)


def wd1_weights(advantages: jax.Array, group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """wd1 (`docs/algorithms.md` §4.3): w⁺ = softmax_G(A), w⁻ = softmax_G(−A), over the group (the
  reference code softmaxes over the per-device batch, a layout bug)."""
  return group_softmax(advantages, group_ids), group_softmax(-advantages, group_ids)
