"""Objectives on a real (tiny) transformer: BGPO / VRPO-OL equivalences (`docs/algorithms.md` §3.3,
§5.1, §5.2), scan accumulation vs an unrolled computation, micro-batched vs full-batch, DMPO
weights and loss against an independent computation, layout invariance, and the two-pass WDDO
and SPG-EUBO gradients against direct autodiff of the nonlinear losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmpo_jax.diffusion import elbo, masking
from dmpo_jax.rl import scoring
from dmpo_jax.rl.objectives import sequence_ratio
from dmpo_jax.rl.objectives.base import Prepared
from tests.helpers import objective_setup as tiny
from tests.helpers.objective_setup import (CONFIG, B, assert_trees_close, fast_jit, full_canvas, model,
                                           run)


# -- BGPO / VRPO-OL ------------------------------------------------------------------------------

# Not group-normalised: a non-trivial mean. A host array: nothing compiles at import.
ADVANTAGES = np.asarray([1.0, 0.5, -0.3, 2.0], np.float32)


@functools.lru_cache(maxsize=None)
def bgpo_aux():
  """BGPO's prepare (old terms on shared masks) with the advantages replaced."""
  aux = run("bgpo", tiny.PARAMS_OLD, num_mc=3, micro_batch_size=2)[2]
  return Prepared(aux.per_example | {"advantages": ADVANTAGES}, aux.metrics)


@pytest.mark.slow
def test_bgpo_on_policy_value_is_mean_advantage_and_gradient_equals_vrpo_ol():
  g_on, out_on, _ = run("bgpo", tiny.PARAMS_OLD, aux=Prepared({"advantages": ADVANTAGES}, {}),
                        num_mc=3, mode="on_policy")
  np.testing.assert_allclose(out_on.loss, -float(jnp.mean(ADVANTAGES)), rtol=1e-6)
  # off-policy at θ = θ_old (old terms from prepare): same value and gradient
  g_off, out_off, _ = run("bgpo", tiny.PARAMS_OLD, aux=bgpo_aux(), num_mc=3, micro_batch_size=2)
  np.testing.assert_allclose(out_off.loss, -float(jnp.mean(ADVANTAGES)), atol=1e-5)
  assert_trees_close(g_on, g_off, rtol=1e-3, atol=1e-5)
  # VRPO-OL (direct) on the same masks at θ = θ_old: the same gradient (`docs/algorithms.md` §5.1)
  g_vrpo, out_vrpo, _ = run("vrpo_ol", tiny.PARAMS_OLD, aux=bgpo_aux(), num_mc=3)
  np.testing.assert_allclose(out_vrpo.loss, -float(jnp.mean(ADVANTAGES)), atol=1e-5)
  assert_trees_close(g_on, g_vrpo, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_two_pass_vrpo_ol_equals_direct_off_policy():
  g_direct, out_direct, _ = run("vrpo_ol", tiny.PARAMS_NEW, aux=bgpo_aux(), num_mc=3)
  g_two, out_two, _ = run("vrpo_ol_two_pass", tiny.PARAMS_NEW, aux=bgpo_aux(), num_mc=3,
                          micro_batch_size=2)
  np.testing.assert_allclose(out_two.loss, out_direct.loss, rtol=1e-5, atol=1e-6)
  assert_trees_close(g_direct, g_two)
  assert abs(float(out_direct.metric_values()["vrpo/log_ratio_mean"])) > 1e-3  # really off-policy


@functools.partial(fast_jit, static_argnums=(4,))
def bgpo_sample_grad(params, advantages, keys, j, n):
  """One MC sample's BGPO loss and gradient, written from the formulas with `masking`/`elbo`."""
  sample = masking.k_stratified_mask(keys, full_canvas(), j, num_samples=n)
  old = elbo.elbo_term(model(tiny.PARAMS_OLD), tiny.BATCH["sequences"], sample,
                       tiny.BATCH["attention_mask"])

  def loss(p):
    new = elbo.elbo_term(model(p), tiny.BATCH["sequences"], sample, tiny.BATCH["attention_mask"])
    d = new - old
    a = advantages
    g = jnp.where(a >= 0, (1 + d) * a, jnp.exp(jnp.minimum(d, 20.0)) * a) / n
    return -jnp.sum(g) / B

  return jax.value_and_grad(loss)(params)


@pytest.mark.slow
def test_bgpo_micro_batched_scan_equals_unrolled_full_batch():
  n = 3
  keys = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], sequence_ratio._MASK_PURPOSE)
  ref_loss, ref_grad = 0.0, None
  for j in range(n):  # Python loop over MC samples, full batch, gradients summed
    value, grad = bgpo_sample_grad(tiny.PARAMS_NEW, ADVANTAGES, keys, j, n)
    ref_loss += float(value)
    ref_grad = grad if ref_grad is None else jax.tree.map(jnp.add, ref_grad, grad)
  g, out, _ = run("bgpo", tiny.PARAMS_NEW, aux=bgpo_aux(), num_mc=3, micro_batch_size=2)
  np.testing.assert_allclose(out.loss, ref_loss, rtol=1e-4, atol=1e-6)
  assert_trees_close(g, ref_grad, rtol=1e-3, atol=1e-6)
  # group z-score advantages from prepare (numpy reference)
  r, gid = np.asarray(tiny.BATCH["rewards"]), np.asarray(tiny.BATCH["group_ids"])
  expected = np.array([(r[i] - r[gid == gid[i]].mean()) / (r[gid == gid[i]].std(ddof=1) + 1e-6)
                       for i in range(B)])
  aux = run("bgpo", tiny.PARAMS_OLD, num_mc=3, micro_batch_size=2)[2]
  np.testing.assert_allclose(aux.per_example["advantages"], expected, rtol=1e-5)


# -- DMPO ----------------------------------------------------------------------------------------

@functools.partial(fast_jit, static_argnums=(1, 2))
def dmpo_model_terms(params_theta, weight_num_mc, loss_num_mc):
  """ELBO_v, ELBO_ref on the shared weight masks; S and m on each fresh loss mask."""
  eligible = full_canvas()
  mask_fn = functools.partial(masking.antithetic_mask, lambda_range=(0.1, 1.0))
  wkeys = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "dmpo/weights")
  est = lambda p: elbo.elbo_estimate(model(p), tiny.BATCH["sequences"], wkeys, eligible, mask_fn,
                                     weight_num_mc, attention_mask=tiny.BATCH["attention_mask"]).mean
  lkeys = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "dmpo/loss", fresh=True)
  s, m = [], []
  for j in range(loss_num_mc):
    sample = mask_fn(lkeys, eligible, j)
    s.append(elbo.masked_log_likelihood(model(params_theta), tiny.BATCH["sequences"], sample,
                                        tiny.BATCH["attention_mask"]))
    m.append(jnp.maximum(jnp.sum(sample.scored, -1), 1))
  return est(tiny.PARAMS_OLD), est(tiny.PARAMS_REF), jnp.stack(s), jnp.stack(m)


def np_group_softmax(x, gid):
  out = np.zeros_like(x)
  for g in np.unique(gid):
    idx = gid == g
    e = np.exp(x[idx] - x[idx].max())
    out[idx] = e / e.sum()
  return out


@pytest.mark.slow
def test_dmpo_weights_and_loss_match_independent_computation():
  alpha = 0.5
  g, out, aux = run("dmpo", tiny.PARAMS_NEW, alpha=alpha, weight_num_mc=2, loss_num_mc=2,
                    micro_batch_size=1)
  e_v, e_ref, s, m = [np.asarray(x, np.float64) for x in dmpo_model_terms(tiny.PARAMS_NEW, 2, 2)]
  r, gid = np.asarray(tiny.BATCH["rewards"], np.float64), np.asarray(tiny.BATCH["group_ids"])
  w = np_group_softmax(r / alpha + e_ref - e_v, gid)
  a = w - np_group_softmax(-r / alpha + e_ref - e_v, gid)    # individual baseline
  loss = np.sum(a * np.mean(-s / m, axis=0)) / 2             # 2 prompts
  np.testing.assert_allclose(aux.per_example["weights"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux.per_example["advantages"], a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.loss, loss, rtol=1e-4)
  np.testing.assert_allclose(out.denominator, 2.0)
  # ELBO noise diagnostic: per-sequence sample variance of the K = 2 behaviour-policy terms.
  wkeys = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "dmpo/weights")
  terms = np.asarray(elbo.elbo_estimate(
      model(tiny.PARAMS_OLD), tiny.BATCH["sequences"], wkeys, full_canvas(),
      functools.partial(masking.antithetic_mask, lambda_range=(0.1, 1.0)), 2,
      attention_mask=tiny.BATCH["attention_mask"]).terms, np.float64)
  np.testing.assert_allclose(float(aux.metrics["elbo/mc_variance"]),
                             np.mean(np.var(terms, axis=0, ddof=1)), rtol=1e-4)


@pytest.mark.slow
def test_dmpo_model_baseline_invariant_to_group_placement():
  kw = dict(alpha=0.5, weight_num_mc=2, loss_num_mc=2, baseline="model", micro_batch_size=2)
  g, out, aux = run("dmpo", tiny.PARAMS_NEW, **kw)
  # members of each group placed elsewhere in the batch (rows and their example ids move), so
  # each micro-batch now holds a different mix of the two groups
  perm = np.array([3, 0, 1, 2])
  moved = jax.tree.map(lambda x: x[perm], tiny.BATCH)
  g_moved, out_moved, aux_moved = run("dmpo", tiny.PARAMS_NEW, batch=moved, **kw)
  for key in ("weights", "advantages", "elbo_old"):
    np.testing.assert_allclose(aux_moved.per_example[key], np.asarray(aux.per_example[key])[perm],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_moved.loss, out.loss, rtol=1e-5)
  assert_trees_close(g, g_moved)
  # the model baseline at θ = θ_old equals the group baseline (CRN: ELBO_θ = ELBO_v)
  e_v, e_ref, s, m = [np.asarray(x, np.float64) for x in dmpo_model_terms(tiny.PARAMS_OLD, 2, 2)]
  _, out_old, _ = run("dmpo", tiny.PARAMS_OLD, aux=aux, **kw)
  w = np.asarray(aux.per_example["weights"], np.float64)
  np.testing.assert_allclose(out_old.loss, np.sum((w - 0.5) * np.mean(-s / m, axis=0)) / 2,
                             rtol=1e-4)


# -- two-pass WDDO and SPG EUBO vs direct autodiff -----------------------------------------------

@pytest.mark.slow
def test_wddo_two_pass_equals_direct_autodiff():
  cfg = dict(alpha=0.5, weight_num_mc=2, beta=0.7, fake_weight=0.5)
  g, out, aux = run("wddo", tiny.PARAMS_NEW, **cfg)
  pe = aux.per_example
  mask_fn = functools.partial(masking.antithetic_mask, lambda_range=(0.1, 1.0))
  real = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "dmpo/weights")
  fake = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "wddo/fake")

  def direct(p):
    est = lambda keys: elbo.elbo_estimate(model(p), tiny.BATCH["sequences"], keys, full_canvas(),
                                          mask_fn, 2, attention_mask=tiny.BATCH["attention_mask"]).mean
    x = 0.7 * (est(real) - pe["elbo_old"])
    y = 0.7 * (est(fake) - pe["elbo_old_fake"])
    return jnp.mean(-pe["weights"] * jax.nn.log_sigmoid(x) - 0.5 * jax.nn.log_sigmoid(-y))

  value, grad = fast_jit(jax.value_and_grad(direct))(tiny.PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)
  np.testing.assert_allclose(np.asarray(pe["weights"]).reshape(2, 2).sum(0), [2.0, 2.0], rtol=1e-5)


@pytest.mark.slow
def test_spg_eubo_two_pass_equals_direct_autodiff():
  cfg = dict(num_mc=2, block_length=4, eubo_beta=1.5, negative_estimator="mix", mix_weight=0.3)
  g, out, aux = run("spg", tiny.PARAMS_NEW, **cfg)
  keys = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "spg/block", per_iteration=True)
  eligible = scoring.eligible_positions(tiny.BATCH, CONFIG.eos_token_id, include_eos_padding=False)
  a = np.asarray(tiny.BATCH["rewards"]) - np.array([1.5, 0.25, 1.5, 0.25])
  length = np.asarray(eligible).sum(-1)
  np.testing.assert_allclose(aux.per_example["completion_length"], length)
  samples = fast_jit(lambda: [masking.spg_block_mask(
      keys, eligible, j, completion_positions=tiny.BATCH["completion_mask"], block_length=4,
      prompt_positions=tiny.BATCH["prompt_mask"] & tiny.BATCH["attention_mask"]) for j in range(2)])()

  def direct(p):
    lps = [elbo.masked_token_log_probs(model(p), tiny.BATCH["sequences"], s,
                                       tiny.BATCH["attention_mask"]) for s in samples]
    pos = sum(s.weight * jnp.sum(lp, -1) for s, lp in zip(samples, lps)) / 2
    pbar = sum(jnp.where(s.scored, jnp.exp(1.5 * lp) / s.ratio[:, None], 0.0)
               for s, lp in zip(samples, lps)) / 2
    covered = pbar > 0
    eubo = jnp.sum(jnp.where(covered, jnp.log(jnp.where(covered, pbar, 1.0)), 0.0), -1) / (
        1.5 * jnp.sum(covered, -1))
    neg = 0.3 * eubo + 0.7 * pos
    score = jnp.where(a > 0, pos, neg)
    return jnp.sum(-a * score * length) / np.sum(length)

  value, grad = fast_jit(jax.value_and_grad(direct))(tiny.PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)


# -- diffu-GRPO and wd1 --------------------------------------------------------------------------

def one_step_logps(params, seed_index):
  keys = scoring.example_keys(tiny.KEYS, tiny.BATCH["example_ids"], "one_step/seed")
  eligible = scoring.eligible_positions(tiny.BATCH, CONFIG.eos_token_id, include_eos_padding=False)
  sample = masking.one_step_mask(keys, eligible, seed_index,
                                 prompt_positions=(tiny.BATCH["prompt_mask"]
                                                   & tiny.BATCH["attention_mask"]),
                                 completion_positions=tiny.BATCH["completion_mask"],
                                 p_mask_prompt=0.3)
  return elbo.masked_token_log_probs(model(params), tiny.BATCH["sequences"], sample,
                                     tiny.BATCH["attention_mask"]), sample.scored


@pytest.mark.slow
def test_diffu_grpo_matches_independent_token_loss():
  g, out, aux = run("diffu_grpo", tiny.PARAMS_NEW, num_iterations=3, p_mask_prompt=0.3, beta=0.04,
                    clip_eps=0.2)
  k = 2  # tiny.KEYS.iteration mod 3
  a = np.asarray(tiny.BATCH["rewards"]) - np.array([1.5, 0.25, 1.5, 0.25])
  scores = fast_jit(one_step_logps, static_argnums=(1,))
  old, scored = scores(tiny.PARAMS_OLD, k)
  ref, _ = scores(tiny.PARAMS_REF, k)
  np.testing.assert_allclose(aux.per_example["old_logps"][:, k], old, rtol=1e-5, atol=1e-5)

  def direct(p):
    lp, _ = one_step_logps(p, k)
    ratio = jnp.exp(lp - old)
    surrogate = jnp.minimum(ratio * a[:, None], jnp.clip(ratio, 0.8, 1.2) * a[:, None])
    kl = jnp.exp(ref - lp) - (ref - lp) - 1
    return -jnp.sum(jnp.where(scored, surrogate - 0.04 * kl, 0.0)) / jnp.sum(scored)

  value, grad = fast_jit(jax.value_and_grad(direct))(tiny.PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)
  assert int(np.asarray(scored)[1].sum()) == 4  # scored up to and including the first EOS


@pytest.mark.slow
def test_wd1_matches_independent_loss():
  g, out, aux = run("wd1", tiny.PARAMS_NEW, num_iterations=3, p_mask_prompt=0.3)
  a = np.asarray(tiny.BATCH["rewards"]) - np.array([1.5, 0.25, 1.5, 0.25])
  w_pos = np.array([np.exp(a[0]), np.exp(a[1]), np.exp(a[2]), np.exp(a[3])])
  w_pos /= np.array([w_pos[0] + w_pos[2], w_pos[1] + w_pos[3]] * 2)
  w_neg = np.exp(-a) / np.array([np.exp(-a[0]) + np.exp(-a[2]), np.exp(-a[1]) + np.exp(-a[3])] * 2)

  def direct(p):
    lp, _ = one_step_logps(p, 2)
    return jnp.sum((w_neg - w_pos) * jnp.sum(lp, -1)) / 2

  value, grad = fast_jit(jax.value_and_grad(direct))(tiny.PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)


@pytest.mark.slow
def test_bgpo_prepare_reports_mc_variance_of_independent_elbo_terms():
  aux = run("bgpo", tiny.PARAMS_OLD, num_mc=3, micro_batch_size=2)[2]
  # Per-sequence sample variance of the 3 old-policy MC terms, averaged over the batch (numpy).
  terms = np.asarray(aux.per_example["old_terms"], np.float64)  # [B, 3]
  assert terms.shape == (B, 3)
  expected = np.mean(np.var(terms, axis=1, ddof=1))
  np.testing.assert_allclose(float(aux.metrics["elbo/mc_variance"]), expected, rtol=1e-5)
  assert expected > 0
