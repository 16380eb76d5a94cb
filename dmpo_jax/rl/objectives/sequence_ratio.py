"""BGPO and VRPO-OL: sequence-level ELBO importance ratios (`docs/algorithms.md` §3, §4.2, §5.1-§5.2).

Both use n_t ELBO samples per response on masks drawn once per rollout (k-stratified by
default) and shared by π_old and π_θ (CRN): per-sample terms
ℓ_j = (L/k_j)·S(θ; M_j) (divided by the canvas length L with ``normalize_by_length``), and
d_j = ℓ_θ^{(j)} − ℓ_old^{(j)}, computed in fp32. Advantages are group z-scores (Eq. 18).

* ``off_policy`` mode: ℓ_old is computed once per rollout in ``prepare`` without gradient and
  reused for every update of the rollout.
* ``on_policy`` mode (exactly one update per rollout, θ = θ_old): ℓ_old^{(j)} =
  stop_gradient(ℓ_θ^{(j)}) from the same forward pass, which saves the n_t scoring passes and is
  exact because scoring is deterministic.

BGPO loss (Eq. 19):  L = −(1/B) Σ_i Σ_j g_ij, with g_j = (1 + d_j)·A/n_t (A ≥ 0, Lemma 1) and
exp(min(d_j, clamp))·A/n_t (A < 0, Lemma 2): a sum of per-sample terms, so ``grads`` is a loop
over samples with gradients in the carry (memory independent of n_t). Above the clamp a term has
no gradient (§3.8, numerical safety); the clamped fraction is logged.

VRPO-OL loss (Eq. 6-7):  L = −(1/B) Σ_i exp(min(δ̄_i, clamp))·A_i, δ̄ = mean_j d_j, whose
gradient coefficient stays exp(clamp)·A_i above the clamp (§5.2, `clamped_exp`).
``form="direct"`` differentiates through a scan over the n_t samples (all n_t graphs are kept for
the backward pass, memory grows with n_t: the paper's baseline). ``form="two_pass"`` is the exact
constant-memory method of §5.2: a no-grad pass fixes c_i = ∂R_i/∂δ̄_i, a second pass accumulates
Σ_j c_i·∇ℓ_θ^{(j)}/n_t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.rl import advantages as adv
from dmpo_jax.rl import grad as G
from dmpo_jax.rl import scoring
from dmpo_jax.rl.objectives.base import ObjectiveConfig, Prepared, check_choice, check_positive

MODES = ("off_policy", "on_policy")
BOUNDS = ("both", "lemma1_only", "lemma2_only")
VRPO_FORMS = ("direct", "two_pass")
_MASK_PURPOSE = "sequence_ratio/elbo"


@dataclasses.dataclass(frozen=True)
class SequenceRatioConfig(ObjectiveConfig):
  """Fields shared by BGPO and VRPO-OL.

  num_mc: n_t MC samples per response. mask_scheme: ELBO law (`scoring.ELBO_SCHEMES`).
  mode: ``off_policy`` (ℓ_old stored by prepare) or ``on_policy`` (one update per rollout).
  normalize_by_length: d̃ = d / L (DARE); off by default (paper). include_eos_padding: score the
  full canvas (§1.6). clip_eps / clip_eps_high: optional PPO clip of the ratio (high defaults to
  clip_eps); dual_clip: optional dual-clip constant c for A < 0. exp_clamp: upper clamp of the
  exponent (log-ratio) before exp. advantage_eps / advantage_std_ddof: z-score settings.
  """
  num_mc: int = 16
  mask_scheme: str = "k_stratified"
  mode: str = "off_policy"
  normalize_by_length: bool = False
  include_eos_padding: bool = True
  clip_eps: Optional[float] = None
  clip_eps_high: Optional[float] = None
  dual_clip: Optional[float] = None
  exp_clamp: float = 20.0
  advantage_eps: float = 1e-6
  advantage_std_ddof: int = 1

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    if self.num_mc < 1:
      errors.append(f"num_mc must be >= 1, got {self.num_mc}")
    check_choice(errors, "mask_scheme", self.mask_scheme, scoring.ELBO_SCHEMES)
    check_choice(errors, "mode", self.mode, MODES)
    check_positive(errors, "clip_eps", self.clip_eps, allow_none=True)
    check_positive(errors, "clip_eps_high", self.clip_eps_high, allow_none=True)
    if self.clip_eps_high is not None and self.clip_eps is None:
      errors.append("clip_eps_high needs clip_eps")
    if self.dual_clip is not None and self.dual_clip <= 1.0:
      errors.append(f"dual_clip must be > 1 (PPO dual clip), got {self.dual_clip}")
    check_positive(errors, "exp_clamp", self.exp_clamp)
    check_positive(errors, "advantage_eps", self.advantage_eps, allow_zero=True)
    if self.advantage_std_ddof not in (0, 1):
      errors.append(f"advantage_std_ddof must be 0 or 1, got {self.advantage_std_ddof}")
    return errors


@dataclasses.dataclass(frozen=True)
class BGPOConfig(SequenceRatioConfig):
  """BGPO (`docs/algorithms.md` §3.6 defaults). bound: ``both`` (paper), ``lemma1_only`` (linear
  (1 + d)·A for every A) or ``lemma2_only`` (exp(d)·A for every A) ablations. taylor_clamp: |d|
  clamp of the linear branch, only to keep it finite for absurd d (inactive in practice)."""
  bound: str = "both"
  taylor_clamp: float = 1e6

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    check_choice(errors, "bound", self.bound, BOUNDS)
    check_positive(errors, "taylor_clamp", self.taylor_clamp)
    return errors


@dataclasses.dataclass(frozen=True)
class VRPOOLConfig(SequenceRatioConfig):
  """VRPO-OL. form: ``direct`` (memory grows with n_t) or ``two_pass`` (exact, constant memory).
  n_t = 4 as in the BGPO paper's baseline (2 for code)."""
  num_mc: int = 4
  form: str = "direct"

  def validation_errors(self) -> list[str]:
    errors = super().validation_errors()
    check_choice(errors, "form", self.form, VRPO_FORMS)
    return errors


# -- pure per-sample math ---------------------------------------------------------------------------

@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def clamped_exp(x: jax.Array, clamp: float) -> jax.Array:
  """exp(min(x, clamp)) whose derivative is exp(min(x, clamp)) everywhere: VRPO-OL's sequence
  ratio, whose gradient coefficient `docs/algorithms.md` §5.2 gives as c = exp(min(δ̄, 20))·A (bounded,
  not 0, above the clamp). Used by the direct and the two-pass form alike, so they stay equal.
  BGPO's Lemma-2 branch keeps the plain clamp of §3.8 (no gradient above it)."""
  return jnp.exp(jnp.minimum(x, clamp))


@clamped_exp.defjvp
def _clamped_exp_jvp(clamp, primals, tangents):
  y = clamped_exp(primals[0], clamp)
  return y, y * tangents[0]


def ppo_clip(ratio: jax.Array, advantages: jax.Array, *, clip_eps: Optional[float],
             clip_eps_high: Optional[float] = None,
             dual_clip: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
  """Pessimistic PPO surrogate min(ρA, clip(ρ, 1−ε, 1+ε_high)·A), dual clip max(·, c·A) for A < 0.

  Returns (objective, clipped flag). Without ``clip_eps`` and ``dual_clip``: (ρA, False).
  """
  objective = ratio * advantages
  clipped = jnp.zeros(objective.shape, jnp.bool_)
  if clip_eps is not None:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped_obj = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    clipped = clipped_obj < objective
    objective = jnp.minimum(objective, clipped_obj)
  if dual_clip is not None:
    floor = dual_clip * advantages
    dual = (advantages < 0) & (objective < floor)
    clipped = clipped | dual
    objective = jnp.where(dual, floor, objective)
  return objective, clipped


def bgpo_sample_objective(d: jax.Array, advantages: jax.Array, num_samples: int, *,
                          bound: str = "both", exp_clamp: float = 20.0,
                          taylor_clamp: float = 1e6, clip_eps: Optional[float] = None,
                          clip_eps_high: Optional[float] = None,
                          dual_clip: Optional[float] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-MC-sample BGPO lower-bound terms g_j (`docs/algorithms.md` §3.2), fp32 [B].

  ratio_j = 1 + d_j  (Lemma 1, A ≥ 0)  or  exp(min(d_j, exp_clamp))  (Lemma 2, A < 0);
  g_j = ratio_j·A/n_t, optionally PPO-clipped (off by default). Finite for any d_j: both branches
  are computed with clamped inputs, so the unselected branch cannot inject inf/NaN gradients.
  Returns g and per-row flags {exp_clamped, taylor_clamped, clipped, ratio}.
  """
  if bound not in BOUNDS:
    raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
  d = d.astype(jnp.float32)
  a = advantages.astype(jnp.float32)
  taylor = 1.0 + jnp.clip(d, -taylor_clamp, taylor_clamp)
  jensen = jnp.exp(jnp.minimum(d, exp_clamp))
  if bound == "both":
    use_taylor = a >= 0
  else:
    use_taylor = jnp.full(a.shape, bound == "lemma1_only")
  ratio = jnp.where(use_taylor, taylor, jensen)
  objective, clipped = ppo_clip(ratio, a, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                dual_clip=dual_clip)
  flags = {"exp_clamped": ~use_taylor & (d > exp_clamp),
           "taylor_clamped": use_taylor & (jnp.abs(d) > taylor_clamp),
           "clipped": clipped, "ratio": ratio}
  return objective / num_samples, flags


def vrpo_ol_objective(mean_d: jax.Array, advantages: jax.Array, *, exp_clamp: float = 20.0,
                      clip_eps: Optional[float] = None, clip_eps_high: Optional[float] = None,
                      dual_clip: Optional[float] = None) -> jax.Array:
  """VRPO-OL per-response objective R̂ = exp(min(δ̄, exp_clamp))·A (Eq. 7), optional PPO clip, [B]."""
  ratio = clamped_exp(mean_d.astype(jnp.float32), exp_clamp)
  objective, _ = ppo_clip(ratio, advantages.astype(jnp.float32), clip_eps=clip_eps,
                          clip_eps_high=clip_eps_high, dual_clip=dual_clip)
  return objective


def vrpo_ol_coefficients(mean_d: jax.Array, advantages: jax.Array,
                         **kwargs) -> tuple[jax.Array, jax.Array]:
  """(R̂_i, c_i = ∂R̂_i/∂δ̄_i) per response: pass 1 of the two-pass method (§5.2). With PPO
  clipping c_i = ρ_i·A_i on the unclipped branch and 0 on the clipped one."""
  value_and_grad = jax.vmap(jax.value_and_grad(
      lambda md, a: vrpo_ol_objective(md[None], a[None], **kwargs)[0]))
  return value_and_grad(mean_d.astype(jnp.float32), advantages.astype(jnp.float32))


# -- model-facing parts -----------------------------------------------------------------------------

def _clip_kwargs(cfg: SequenceRatioConfig) -> dict[str, Any]:
  return dict(exp_clamp=cfg.exp_clamp, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
              dual_clip=cfg.dual_clip)


def _scoring_tree(batch: Mapping[str, jax.Array], keys: scoring.RLKeys,
                  per_example: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  tree = {k: batch[k] for k in ("sequences", "attention_mask", "completion_mask")}
  tree.update(per_example)
  tree["mask_keys"] = scoring.example_keys(keys, batch["example_ids"], _MASK_PURPOSE)
  return tree


def _sample_term(model: Any, mb: Mapping[str, jax.Array], cfg: SequenceRatioConfig,
                 j: jax.Array) -> jax.Array:
  """ℓ_j for one micro-batch: weight_j·S(θ; M_j) [/ L], fp32 [b]."""
  eligible = scoring.eligible_positions(mb, model.config.eos_token_id, cfg.include_eos_padding)
  mask_fn = scoring.elbo_mask_fn(cfg.mask_scheme, num_samples=cfg.num_mc)
  term, _ = scoring.sample_elbo_term(model, mb, mb["mask_keys"], eligible, mask_fn, j)
  if cfg.normalize_by_length:
    term = term / jnp.maximum(scoring.canvas_length(mb), 1.0)
  return term


def _old_term(mb: Mapping[str, jax.Array], term: jax.Array, cfg: SequenceRatioConfig,
              j: jax.Array) -> jax.Array:
  if cfg.mode == "on_policy":
    return jax.lax.stop_gradient(term)
  return jax.lax.dynamic_index_in_dim(mb["old_terms"], j, axis=1, keepdims=False)


def prepare(graphdef: Any, params: Any, ref_params: Any, batch: Mapping[str, jax.Array],
            keys: scoring.RLKeys, cfg: SequenceRatioConfig) -> Prepared:
  """Group z-score advantages and (off-policy) the old-policy terms ℓ_old [B, n_t], no gradient.
  ``ref_params`` is unused (no reference term in BGPO / VRPO-OL)."""
  del ref_params
  scoring.check_batch(batch)
  a = adv.grpo_advantages(batch["rewards"], batch["group_ids"], eps=cfg.advantage_eps,
                          std_ddof=cfg.advantage_std_ddof)
  per_example = {"advantages": a}
  metrics = {"advantages/abs_mean": jnp.mean(jnp.abs(a)),
             "rewards/zero_std_frac": adv.zero_std_fraction(batch["rewards"], batch["group_ids"])}
  if cfg.mode == "off_policy":
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    tree = _scoring_tree(batch, keys, {})

    def old_terms(mb):
      def body(carry, j):
        return carry, _sample_term(model, mb, cfg, j)

      _, terms = jax.lax.scan(body, None, jnp.arange(cfg.num_mc, dtype=jnp.int32))
      return terms.T

    per_example["old_terms"] = G.micro_batch_map(old_terms, tree, cfg.micro_batch_size)
    if cfg.num_mc > 1:
      # ELBO noise diagnostic: per-sequence variance of the n_t MC terms, averaged over the batch.
      metrics["elbo/mc_variance"] = jnp.mean(jnp.var(per_example["old_terms"], axis=1, ddof=1))
  return Prepared(per_example, metrics)


def _rows(mb: Mapping[str, jax.Array]) -> jax.Array:
  return jnp.asarray(mb["advantages"].shape[0], jnp.float32)


def bgpo_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
               keys: scoring.RLKeys, cfg: BGPOConfig) -> tuple[Any, G.LossOutput]:
  """∇ of L_BGPO = −(1/B) Σ_i Σ_j g_ij with a loop over micro-batches × MC samples."""
  tree = _scoring_tree(batch, keys, aux.per_example)
  n = cfg.num_mc

  def loss_fn(p, mb, j):
    model = nnx.merge(graphdef, p)
    term = _sample_term(model, mb, cfg, j)
    d = term - _old_term(mb, term, cfg, j)
    g, flags = bgpo_sample_objective(d, mb["advantages"], n, bound=cfg.bound,
                                     taylor_clamp=cfg.taylor_clamp, **_clip_kwargs(cfg))
    metrics = {"bgpo/exp_clamped_frac": G.WeightedMetric.mean_of(flags["exp_clamped"]),
               "bgpo/taylor_clamped_frac": G.WeightedMetric.mean_of(flags["taylor_clamped"]),
               "bgpo/clip_frac": G.WeightedMetric.mean_of(flags["clipped"]),
               "bgpo/ratio_mean": G.WeightedMetric.mean_of(jax.lax.stop_gradient(flags["ratio"])),
               "bgpo/log_ratio_mean": G.WeightedMetric.mean_of(jax.lax.stop_gradient(d))}
    return -jnp.sum(g), metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=n,
                                micro_batch_size=cfg.micro_batch_size, denominator_fn=_rows)


def vrpo_ol_grads(graphdef: Any, params: Any, batch: Mapping[str, jax.Array], aux: Prepared,
                  keys: scoring.RLKeys, cfg: VRPOOLConfig) -> tuple[Any, G.LossOutput]:
  """∇ of L_VRPO-OL = −(1/B) Σ_i exp(δ̄_i)·A_i in the configured ``form``."""
  tree = _scoring_tree(batch, keys, aux.per_example)
  n = cfg.num_mc
  kwargs = _clip_kwargs(cfg)

  def metrics_of(mean_d, a):
    ratio = clamped_exp(mean_d, cfg.exp_clamp)
    return {"vrpo/ratio_mean": G.WeightedMetric.mean_of(ratio),
            "vrpo/log_ratio_mean": G.WeightedMetric.mean_of(mean_d),
            "vrpo/exp_clamped_frac": G.WeightedMetric.mean_of(mean_d > cfg.exp_clamp)}

  if cfg.form == "direct":
    def loss_fn(p, mb, _):
      model = nnx.merge(graphdef, p)

      def body(total, j):
        term = _sample_term(model, mb, cfg, j)
        return total + (term - _old_term(mb, term, cfg, j)), None

      total, _ = jax.lax.scan(body, jnp.zeros(mb["advantages"].shape, jnp.float32),
                              jnp.arange(n, dtype=jnp.int32))
      mean_d = total / n
      objective = vrpo_ol_objective(mean_d, mb["advantages"], **kwargs)
      return -jnp.sum(objective), metrics_of(jax.lax.stop_gradient(mean_d), mb["advantages"])

    return G.accumulate_gradients(loss_fn, params, tree, num_samples=None,
                                  micro_batch_size=cfg.micro_batch_size, denominator_fn=_rows)

  # Two-pass (§5.2). Pass 1: δ̄ at the current θ on the same masks, no gradient.
  if cfg.mode == "on_policy":
    mean_d = jnp.zeros(batch["rewards"].shape, jnp.float32)  # θ = θ_old: δ̄ = 0 exactly
  else:
    model0 = nnx.merge(graphdef, jax.lax.stop_gradient(params))

    def pass1(mb):
      def body(total, j):
        term = _sample_term(model0, mb, cfg, j)
        return total + (term - _old_term(mb, term, cfg, j)), None

      total, _ = jax.lax.scan(body, jnp.zeros(mb["advantages"].shape, jnp.float32),
                              jnp.arange(n, dtype=jnp.int32))
      return total / n

    mean_d = G.micro_batch_map(pass1, tree, cfg.micro_batch_size)
  value, coefficient = vrpo_ol_coefficients(mean_d, aux.per_example["advantages"], **kwargs)
  tree = tree | {"vrpo_value": value, "vrpo_coefficient": coefficient, "vrpo_mean_d": mean_d}

  def loss_fn(p, mb, j):
    model = nnx.merge(graphdef, p)
    term = _sample_term(model, mb, cfg, j)
    surrogate = jnp.sum(mb["vrpo_coefficient"] * term) / n
    objective = G.value_with_surrogate_grad(jnp.sum(mb["vrpo_value"]) / n, surrogate)
    metrics = {name: G.WeightedMetric(m.total / n, m.weight / n)
               for name, m in metrics_of(mb["vrpo_mean_d"], mb["advantages"]).items()}
    return -objective, metrics

  return G.accumulate_gradients(loss_fn, params, tree, num_samples=n,
                                micro_batch_size=cfg.micro_batch_size, denominator_fn=_rows)


def max_updates_per_rollout(cfg: SequenceRatioConfig) -> Optional[int]:
  """on_policy mode is exact only for one update per rollout (the trainer must enforce it)."""
  return 1 if cfg.mode == "on_policy" else None
