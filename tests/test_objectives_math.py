"""Hand-computed values of the pure pieces of every objective: group statistics, advantages,
DMPO weights and baselines, BGPO / VRPO-OL / diffu-GRPO / wd1 / SPG / WDDO terms, and
finiteness for extreme inputs (`docs/algorithms.md` §2-§5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmpo_jax.rl import advantages as adv
from dmpo_jax.rl import registry
from dmpo_jax.rl.objectives import dmpo, one_step, sequence_ratio, spg

F32 = dict(rtol=1e-5, atol=1e-6)


def np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


# -- group statistics and advantages ----------------------------------------------------------------

def test_grpo_advantages_hand_values():
  # groups {1, 2} and {0, 0.5}: mean ± std(ddof=1)/√2·... -> z-scores ∓1/(1 + eps/std)
  rewards = jnp.array([1.0, 0.0, 2.0, 0.5])
  gid = jnp.array([7, 3, 7, 3])
  a = adv.grpo_advantages(rewards, gid)
  s0, s1 = math.sqrt(0.5), math.sqrt(0.125)
  np.testing.assert_allclose(a, [-0.5 / (s0 + 1e-6), -0.25 / (s1 + 1e-6), 0.5 / (s0 + 1e-6),
                                 0.25 / (s1 + 1e-6)], **F32)
  a3 = adv.grpo_advantages(jnp.array([1.0, 2.0, 3.0]), jnp.array([0, 0, 0]), eps=0.0)
  np.testing.assert_allclose(a3, [-1.0, 0.0, 1.0], **F32)
  # ddof=0: std of {1,2,3} = sqrt(2/3)
  a3b = adv.grpo_advantages(jnp.array([1.0, 2.0, 3.0]), jnp.array([0, 0, 0]), eps=0.0, std_ddof=0)
  np.testing.assert_allclose(a3b, np.array([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3), **F32)


def test_zero_std_group_gets_zero_advantage_and_mean_centering():
  rewards = jnp.array([1.0, 1.0, 2.0, 6.0, 1.0])
  gid = jnp.array([0, 0, 1, 1, 1])
  np.testing.assert_allclose(adv.grpo_advantages(rewards, gid)[:2], [0.0, 0.0])
  np.testing.assert_allclose(adv.mean_centered_advantages(rewards, gid), [0, 0, -1, 3, -2], **F32)
  np.testing.assert_allclose(adv.zero_std_fraction(rewards, gid), 0.4, **F32)


def test_group_statistics_match_numpy_for_any_placement():
  rng = np.random.default_rng(0)
  g, n = 4, 5
  gid = rng.permutation(np.repeat(np.arange(n) * 11 + 3, g))  # arbitrary labels, shuffled
  x = rng.normal(size=g * n).astype(np.float32)
  sm = np.asarray(adv.group_softmax(jnp.asarray(x), jnp.asarray(gid)))
  mean = np.asarray(adv.group_mean(jnp.asarray(x), jnp.asarray(gid)))
  std = np.asarray(adv.group_std(jnp.asarray(x), jnp.asarray(gid)))
  for label in np.unique(gid):
    idx = gid == label
    np.testing.assert_allclose(sm[idx], np_softmax(x[idx]), **F32)
    np.testing.assert_allclose(mean[idx], x[idx].mean(), **F32)
    np.testing.assert_allclose(std[idx], x[idx].std(ddof=1), rtol=1e-5)


# -- DMPO weights and baselines --------------------------------------------------------------------

def test_dmpo_weights_hand_values():
  # one group of 2: r = [1, 0], α = 0.5, log p_ref − log p_v = [0, ln 2]
  r = jnp.array([1.0, 0.0])
  lr = jnp.array([0.0, math.log(2.0)])
  gid = jnp.array([0, 0])
  out = adv.dmpo_weights(r, lr, gid, alpha=0.5, coeff=1.0)
  e2 = math.exp(2.0)
  np.testing.assert_allclose(out["weights"], [e2 / (e2 + 2), 2 / (e2 + 2)], **F32)
  em2 = math.exp(-2.0)
  np.testing.assert_allclose(out["negative_weights"], [em2 / (em2 + 2), 2 / (em2 + 2)], **F32)
  w = np.array([e2 / (e2 + 2), 2 / (e2 + 2)])
  np.testing.assert_allclose(out["ess"], [w.sum() ** 2 / (2 * (w ** 2).sum())] * 2, **F32)
  # coeff scales the logits; mean-1 scale multiplies by N
  out2 = adv.dmpo_weights(r, lr, gid, alpha=0.5, coeff=0.5, weight_scale="mean1")
  e1 = math.exp(1.0)
  np.testing.assert_allclose(out2["weights"], [2 * e1 / (e1 + math.sqrt(2)),
                                               2 * math.sqrt(2) / (e1 + math.sqrt(2))], **F32)


def test_dmpo_alpha_zero_is_proximal_softmax_of_rewards():
  r = jnp.array([1.0, 0.0, 3.0, 2.0])
  gid = jnp.array([0, 0, 1, 1])
  out = adv.dmpo_weights(r, jnp.array([5.0, -5.0, 1.0, 0.0]), gid, alpha=0.0, coeff=2.0)
  np.testing.assert_allclose(out["weights"][:2], np_softmax([2.0, 0.0]), **F32)
  np.testing.assert_allclose(out["negative_weights"][2:], np_softmax([-6.0, -4.0]), **F32)


def test_dmpo_baselines_hand_values():
  gid = jnp.array([0, 1, 0, 0, 1])
  neg = jnp.array([0.1, 0.3, 0.2, 0.7, 0.7])
  np.testing.assert_allclose(adv.dmpo_baseline("none", gid), np.zeros(5))
  np.testing.assert_allclose(adv.dmpo_baseline("group", gid), [1 / 3, 1 / 2, 1 / 3, 1 / 3, 1 / 2], **F32)
  np.testing.assert_allclose(adv.dmpo_baseline("group", gid, weight_scale="mean1"), np.ones(5), **F32)
  np.testing.assert_allclose(adv.dmpo_baseline("individual", gid, negative_weights=neg), neg)
  lr = jnp.array([0.0, 1.0, math.log(2.0), math.log(3.0), 0.0])
  np.testing.assert_allclose(adv.dmpo_baseline("model", gid, model_log_ratio=lr),
                             [1 / 6, math.e / (1 + math.e), 2 / 6, 3 / 6, 1 / (1 + math.e)], **F32)
  np.testing.assert_allclose(adv.dmpo_baseline("model", gid, model_log_ratio=lr, weight_scale="mean1"),
                             [0.5, 2 * math.e / (1 + math.e), 1.0, 1.5, 2 / (1 + math.e)], **F32)
  with pytest.raises(ValueError, match="baseline"):
    adv.dmpo_baseline("median", gid)


def test_individual_baseline_advantages_sum_to_zero_per_group():
  rng = np.random.default_rng(1)
  gid = jnp.asarray(rng.permutation(np.repeat(np.arange(3), 4)))
  out = adv.dmpo_weights(jnp.asarray(rng.normal(size=12)), jnp.asarray(rng.normal(size=12)), gid,
                         alpha=0.04)
  a = out["weights"] - out["negative_weights"]
  np.testing.assert_allclose(adv.group_sum(a, gid), np.zeros(12), atol=1e-6)
  np.testing.assert_allclose(adv.group_sum(out["weights"], gid), np.ones(12), **F32)


def test_dmpo_weights_invariant_to_group_placement():
  rng = np.random.default_rng(2)
  n = 16
  gid = np.repeat(np.arange(4), 4)
  r, lr = rng.normal(size=n), rng.normal(size=n)
  perm = rng.permutation(n)
  base = adv.dmpo_weights(jnp.asarray(r), jnp.asarray(lr), jnp.asarray(gid), alpha=0.3,
                          target_ess=0.6)
  moved = adv.dmpo_weights(jnp.asarray(r[perm]), jnp.asarray(lr[perm]), jnp.asarray(gid[perm]),
                           alpha=0.3, target_ess=0.6)
  for key in base:
    np.testing.assert_allclose(np.asarray(base[key])[perm], moved[key], **F32)


def test_normalized_ess_is_kish_per_group_for_any_placement():
  """(Σw)² / (N·Σw²) per group against numpy; bounds: uniform -> 1, one non-zero -> 1/N, all
  zero -> 1 (defined); groups in any order give the same per-row values."""
  rng = np.random.default_rng(0)
  w = rng.exponential(size=12).astype(np.float32)
  gid = np.repeat(np.arange(3), 4)
  expected = np.repeat([g.sum() ** 2 / (4 * (g ** 2).sum()) for g in w.reshape(3, 4)], 4)
  np.testing.assert_allclose(adv.normalized_ess(jnp.asarray(w), jnp.asarray(gid)), expected,
                             rtol=1e-6)
  perm = rng.permutation(12)
  np.testing.assert_allclose(adv.normalized_ess(jnp.asarray(w[perm]), jnp.asarray(gid[perm])),
                             expected[perm], rtol=1e-6)
  bounds = jnp.array([2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(adv.normalized_ess(bounds, jnp.asarray(gid)),
                                np.repeat([1.0, 0.25, 1.0], 4))
  # The formula from sums (the bisection passes Σw = 1 for its softmax rows).
  np.testing.assert_allclose(adv.normalized_ess_from_sums(1.0, jnp.array([0.5, 1.0]),
                                                          jnp.array([4.0, 2.0])), [0.5, 0.5])


def test_ess_targeted_coeff_hits_target_and_clips():
  gid = jnp.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  logits = jnp.array([0.0, 1.0, 3.0, 0.0, 1000.0, 2000.0, 1.0, 1.0, 1.0])
  c = np.asarray(adv.ess_targeted_coeff(logits, gid, target_ess=0.8))
  def ess(z):
    w = np_softmax(z)
    return 1.0 / (len(z) * (w ** 2).sum())
  # group 0: interior solution with ESS = 0.8
  assert 0.01 < c[0] < 0.99
  np.testing.assert_allclose(ess(c[0] * np.array([0.0, 1.0, 3.0])), 0.8, atol=1e-4)
  # group 1: even the smallest coefficient cannot reach 0.8 -> lower end of the range
  np.testing.assert_allclose(c[3:6], 0.01, **F32)
  # group 2: constant logits, ESS = 1 for any coefficient -> upper end of the range
  np.testing.assert_allclose(c[6:], 0.99, **F32)
  assert ess(0.01 * np.array([0.0, 1000.0, 2000.0])) < 0.8


# -- BGPO / VRPO-OL ------------------------------------------------------------------------------

def test_bgpo_sample_terms_hand_values():
  d = jnp.array([0.5, -0.5, 30.0, 1.0, 0.0])
  a = jnp.array([1.0, 1.0, -2.0, -1.0, 0.0])
  g, flags = sequence_ratio.bgpo_sample_objective(d, a, 2)
  np.testing.assert_allclose(g, [0.75, 0.25, -math.exp(20.0), -math.e / 2, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(flags["exp_clamped"], [False, False, True, False, False])
  # dg/dd: A/n on the linear branch, exp(d)·A/n on the exp branch, 0 above the clamp (§3.8)
  # and for A = 0.
  grad = jax.grad(lambda x: jnp.sum(sequence_ratio.bgpo_sample_objective(x, a, 2)[0]))(d)
  np.testing.assert_allclose(grad, [0.5, 0.5, 0.0, -math.e / 2, 0.0], rtol=1e-6)
  # Lemma-1-only: linear for every sign; Lemma-2-only: exp for every sign
  g1, _ = sequence_ratio.bgpo_sample_objective(d, a, 2, bound="lemma1_only")
  np.testing.assert_allclose(g1, [0.75, 0.25, -31.0, -1.0, 0.0], rtol=1e-6)
  g2, _ = sequence_ratio.bgpo_sample_objective(d, a, 2, bound="lemma2_only")
  np.testing.assert_allclose(g2, [math.exp(0.5) / 2, math.exp(-0.5) / 2, -math.exp(20.0),
                                  -math.e / 2, 0.0], rtol=1e-6)


def test_bgpo_ppo_and_dual_clip():
  d = jnp.array([0.5, 0.5, math.log(5.0), -0.9])
  a = jnp.array([1.0, -1.0, -1.0, -1.0])
  g, flags = sequence_ratio.bgpo_sample_objective(d, a, 1, clip_eps=0.2, dual_clip=3.0)
  # A>0: min(1.5, 1.2) = 1.2; A<0: ratio e^0.5: min(-e^.5, -1.2) = -e^.5;
  # ratio 5: min(-5, -1.2) = -5 -> dual clip max(-5, -3) = -3; ratio e^-0.9: min(-0.407, -0.8) = -0.8
  np.testing.assert_allclose(g, [1.2, -math.exp(0.5), -3.0, -0.8], rtol=1e-6)
  np.testing.assert_array_equal(flags["clipped"], [True, False, True, True])


def test_bgpo_gradient_at_zero_equals_vrpo_coefficient():
  # On-policy (d = 0) both branches have dg/dd = A/n: the VRPO-OL coefficient exp(0)·A.
  a = jnp.array([1.5, -0.5, 0.0, -2.0])
  n = 4
  grad_bgpo = jax.grad(lambda d: jnp.sum(sequence_ratio.bgpo_sample_objective(d, a, n)[0]))(
      jnp.zeros(4))
  value, coef = sequence_ratio.vrpo_ol_coefficients(jnp.zeros(4), a)
  np.testing.assert_allclose(grad_bgpo * n, coef, **F32)
  np.testing.assert_allclose(value, a, **F32)


def test_vrpo_ol_objective_and_coefficients():
  md = jnp.array([0.3, -0.2, 0.3, 25.0])
  a = jnp.array([2.0, -1.0, 2.0, -1.0])
  value, coef = sequence_ratio.vrpo_ol_coefficients(md, a)
  expected = [2 * math.exp(0.3), -math.exp(-0.2), 2 * math.exp(0.3), -math.exp(20.0)]
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # Above the clamp the coefficient is exp(20)·A (§5.2), not 0: the ratio stays bounded but the
  # runaway sample is still pushed back.
  np.testing.assert_allclose(coef, expected, rtol=1e-6)
  # PPO clip at ε = 0.2: ratio e^0.3 = 1.35 > 1.2 with A > 0 -> clipped, zero coefficient
  value_c, coef_c = sequence_ratio.vrpo_ol_coefficients(md[:2], a[:2], clip_eps=0.2)
  np.testing.assert_allclose(value_c, [2.4, -math.exp(-0.2)], rtol=1e-6)
  np.testing.assert_allclose(coef_c, [0.0, -math.exp(-0.2)], rtol=1e-6)


# -- diffu-GRPO, wd1 -----------------------------------------------------------------------------

def test_diffu_grpo_token_loss_hand_values():
  logp = jnp.array([[math.log(0.5), math.log(0.2), 0.0]])
  old = jnp.array([[math.log(0.25), math.log(0.2), 0.0]])
  ref = jnp.array([[math.log(0.5), math.log(0.4), 0.0]])
  scored = jnp.array([[True, True, False]])
  loss, flags = one_step.diffu_grpo_token_loss(logp, old, ref, jnp.array([1.0]), scored,
                                               clip_eps=0.5, beta=0.1)
  # token 0: ρ = 2 -> min(2, 1.5) = 1.5, KL = 0; token 1: ρ = 1, KL = 2 − ln 2 − 1
  kl1 = 2.0 - math.log(2.0) - 1.0
  np.testing.assert_allclose(loss, [[-1.5, -(1.0 - 0.1 * kl1), 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(flags["clipped"], [[True, False, False]])


def test_wd1_weights_and_loss():
  a = jnp.array([1.0, -1.0, 0.5, -0.5])
  gid = jnp.array([0, 0, 1, 1])
  w_pos, w_neg = adv.wd1_weights(a, gid)
  np.testing.assert_allclose(w_pos, [*np_softmax([1, -1]), *np_softmax([0.5, -0.5])], **F32)
  np.testing.assert_allclose(w_neg, [*np_softmax([-1, 1]), *np_softmax([-0.5, 0.5])], **F32)
  ll = jnp.array([-3.0, -5.0, -2.0, -1.0])
  np.testing.assert_allclose(one_step.wd1_sequence_loss(w_pos, w_neg, ll),
                             (np.asarray(w_neg) - np.asarray(w_pos)) * np.asarray(ll), **F32)


# -- SPG, WDDO, DMPO loss term ------------------------------------------------------------------

def test_spg_eubo_hand_values():
  # 1 row, 3 tokens, 2 draws: draw 0 scores tokens {0, 1} with t = 2/3, draw 1 token {1}, t = 1/3.
  lp = [np.log([0.5, 0.25, 1.0]), np.log([1.0, 0.5, 1.0])]
  scored = [np.array([True, True, False]), np.array([False, True, False])]
  ratios = [2 / 3, 1 / 3]
  beta = 2.0
  total = jnp.full((1, 3), -jnp.inf)
  for j in range(2):
    total = spg.eubo_log_mean_update(total, jnp.asarray(lp[j])[None], jnp.asarray(scored[j])[None],
                                     jnp.array([ratios[j]]), beta)
  eubo, log_mean, count = spg.eubo_from_log_total(total, 2, beta)
  p0 = 0.5 * (0.25 / (2 / 3))
  p1 = 0.5 * (0.0625 / (2 / 3) + 0.25 / (1 / 3))
  np.testing.assert_allclose(eubo, [(math.log(p0) + math.log(p1)) / (2 * beta)], rtol=1e-6)
  np.testing.assert_allclose(count, [2.0])
  loss = spg.spg_sequence_loss(jnp.array([2.0, -1.0, 0.0]), jnp.array([-1.0, -2.0, -3.0]),
                               jnp.array([-4.0, -5.0, -6.0]), jnp.array([10.0, 20.0, 30.0]))
  np.testing.assert_allclose(loss, [20.0, -100.0, 0.0], **F32)


def test_wddo_terms_hand_values():
  w = jnp.array([2.0])
  loss, c_real, c_fake = dmpo.wddo_terms(w, jnp.array([1.0]), jnp.array([0.0]), jnp.array([0.5]),
                                         jnp.array([1.0]), beta=2.0, fake_weight=0.5)
  sig = lambda x: 1 / (1 + math.exp(-x))
  # x = 2·1 = 2, y = 2·(−0.5) = −1
  np.testing.assert_allclose(loss, [-2 * math.log(sig(2.0)) - 0.5 * math.log(sig(1.0))], rtol=1e-6)
  np.testing.assert_allclose(c_real, [-2 * 2 * sig(-2.0)], rtol=1e-6)
  np.testing.assert_allclose(c_fake, [0.5 * 2 * sig(-1.0)], rtol=1e-6)
  # the derivatives are those of the loss
  g = jax.grad(lambda er, ef: jnp.sum(dmpo.wddo_terms(w, er, jnp.zeros(1), ef, jnp.ones(1), beta=2.0,
                                                      fake_weight=0.5)[0]), argnums=(0, 1))(
      jnp.array([1.0]), jnp.array([0.5]))
  np.testing.assert_allclose(g[0], c_real, rtol=1e-6)
  np.testing.assert_allclose(g[1], c_fake, rtol=1e-6)


def test_wdce_sample_loss_hand_values():
  out = dmpo.wdce_sample_loss(jnp.array([0.5, -0.25]), jnp.array([-8.0, -2.0]),
                              jnp.array([0.25, 0.5]), 2)
  np.testing.assert_allclose(out, [0.5 * 2.0 / 2, -0.25 * 1.0 / 2], **F32)


# -- extreme inputs --------------------------------------------------------------------------------

EXTREME = np.array([1e30, -1e30, 1e4, -1e4, 0.0, 3e38, -3e38, 1.0], np.float32)


def test_no_nan_for_extreme_rewards_and_log_ratios():
  gid = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
  r = jnp.asarray(EXTREME)
  for fn in (adv.grpo_advantages, adv.mean_centered_advantages):
    out = np.asarray(fn(r[:5].at[4].set(1.0), gid[:5]))
    assert np.all(np.isfinite(out)), (fn.__name__, out)
  z = adv.grpo_advantages(jnp.array([1e30, -1e30, 1e30, -1e30]), jnp.zeros(4, jnp.int32))
  np.testing.assert_allclose(z, [math.sqrt(3) / 2, -math.sqrt(3) / 2] * 2, rtol=1e-5)
  for lr in (jnp.asarray(EXTREME), jnp.asarray(EXTREME[::-1].copy())):
    out = adv.dmpo_weights(jnp.asarray(EXTREME), lr, gid, alpha=0.04, target_ess=0.7)
    for key, value in out.items():
      assert np.all(np.isfinite(np.asarray(value))), key
    np.testing.assert_allclose(adv.group_sum(out["weights"], gid), np.ones(8), rtol=1e-5)
  inf_lr = jnp.array([jnp.inf, -jnp.inf, 0.0, 1.0])
  out = adv.dmpo_weights(jnp.ones(4), inf_lr, jnp.zeros(4, jnp.int32), alpha=0.04)
  assert np.all(np.isfinite(np.asarray(out["weights"])))


@pytest.mark.slow
def test_no_nan_for_extreme_advantages_and_log_ratios_in_loss_terms():
  d = jnp.asarray(np.concatenate([EXTREME, [np.inf, -np.inf]]).astype(np.float32))
  a = jnp.asarray(np.resize(np.array([1e3, -1e3, 2.0, -2.0, 0.0], np.float32), d.shape))
  for bound in sequence_ratio.BOUNDS:
    for kw in ({}, {"clip_eps": 0.2, "dual_clip": 3.0}):
      f = lambda d: jnp.sum(sequence_ratio.bgpo_sample_objective(d, a, 16, bound=bound, **kw)[0])
      value, grad = jax.value_and_grad(f)(d)
      assert np.isfinite(value) and np.all(np.isfinite(grad)), (bound, kw, grad)
  f = lambda md: jnp.sum(sequence_ratio.vrpo_ol_objective(md, a))
  value, grad = jax.value_and_grad(f)(d)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  logp = jnp.asarray(np.resize(np.array([-1e4, 0.0, -3e38, -1e30], np.float32), (2, 5)))
  old = logp[::-1]
  for beta in (0.0, 0.04):
    f = lambda lp: jnp.sum(one_step.diffu_grpo_token_loss(
        lp, old, old, jnp.array([1e3, -1e3]), jnp.ones((2, 5), bool), clip_eps=0.5, beta=beta)[0])
    value, grad = jax.value_and_grad(f)(logp)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  total = spg.eubo_log_mean_update(jnp.full((1, 4), -jnp.inf), jnp.array([[-1e4, -3e38, 0.0, -5.0]]),
                                   jnp.array([[True, True, True, False]]), jnp.array([1e-8]), 2.0)
  eubo, _, _ = spg.eubo_from_log_total(total, 1, 2.0)
  assert np.all(np.isfinite(np.asarray(eubo)))


def test_registry_and_config_validation():
  assert set(registry.objective_names()) >= {"dmpo", "wddo", "bgpo", "vrpo_ol", "diffu_grpo",
                                             "wd1", "spg"}
  with pytest.raises(ValueError, match="Unknown objective"):
    registry.get_objective("ppo")
  bgpo = registry.get_objective("bgpo")
  with pytest.raises(ValueError, match="Unknown BGPOConfig field"):
    bgpo.make_config({"n_mc": 4})
  with pytest.raises(ValueError, match="mode must be one of"):
    bgpo.make_config(mode="sometimes")
  with pytest.raises(ValueError, match="weight_num_mc must be even"):
    registry.get_objective("dmpo").make_config(weight_num_mc=3)
  assert registry.get_objective("vrpo_ol_two_pass").make_config().form == "two_pass"
  assert registry.get_objective("vrpo_ol").make_config().form == "direct"
  assert bgpo.max_updates_per_rollout(bgpo.make_config(mode="on_policy")) == 1
  cfg = registry.get_objective("dmpo").make_config({"lambda_range": [0.1, 0.9]})
  assert cfg.lambda_range == (0.1, 0.9) and hash(cfg)
  for name in registry.objective_names():  # defaults round-trip through a plain dict
    obj = registry.get_objective(name)
    assert obj.make_config(obj.default_config()) == obj.make_config()
