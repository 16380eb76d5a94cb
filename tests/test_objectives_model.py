"""Objectives on a real (tiny) transformer: BGPO / VRPO-OL equivalences (`algorithms.md` §3.3,
§5.1, §5.2), scan accumulation vs an unrolled computation, micro-batched vs full-batch, DMPO
weights and loss against an independent computation, layout invariance, and the two-pass WDDO
and SPG-EUBO gradients against direct autodiff of the nonlinear losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmpo_jax.diffusion import elbo, masking
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model, split_model
from dmpo_jax.rl import registry, scoring
from dmpo_jax.rl.objectives import dmpo as dmpo_mod
from dmpo_jax.rl.objectives import sequence_ratio, spg as spg_mod
from dmpo_jax.rl.objectives.base import Prepared

CONFIG = get_preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                    mlp_hidden_size=64, logprob_chunk_size=16)
GRAPHDEF, PARAMS_OLD = split_model(create_model(CONFIG, 0))
_, PARAMS_REF = split_model(create_model(CONFIG, 1))
PARAMS_NEW = jax.tree.map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape, p.dtype), PARAMS_OLD)
B, P, L = 4, 4, 8
T = P + L
KEYS = scoring.make_keys(jax.random.key(3), rollout_step=5, update_step=11, iteration=2)


def make_batch():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, 256, (B, T)).astype(np.int32)
  seq[:, P + 6:] = CONFIG.eos_token_id            # trailing EOS padding
  seq[1, P + 3] = CONFIG.eos_token_id              # an early EOS
  seq[0, 0] = CONFIG.pad_token_id                  # left padding
  attn = np.ones((B, T), bool)
  attn[0, 0] = False
  prompt = np.zeros((B, T), bool)
  prompt[:, :P] = True
  return {"sequences": jnp.asarray(seq), "attention_mask": jnp.asarray(attn),
          "prompt_mask": jnp.asarray(prompt), "completion_mask": jnp.asarray(~prompt),
          "rewards": jnp.asarray([1.0, 0.0, 2.0, 0.5]), "group_ids": jnp.asarray([4, 9, 4, 9]),
          "example_ids": jnp.asarray([10, 11, 12, 13])}


BATCH = make_batch()


@functools.lru_cache(maxsize=None)
def jitted(name: str, which: str):
  obj = registry.get_objective(name)
  return jax.jit(getattr(obj, which), static_argnums=(0, 5))


def run(name: str, params, batch=BATCH, aux=None, prepare_params=PARAMS_OLD, **overrides):
  obj = registry.get_objective(name)
  cfg = obj.make_config(overrides)
  if aux is None:
    aux = jitted(name, "prepare")(GRAPHDEF, prepare_params, PARAMS_REF, batch, KEYS, cfg)
  grads, out = jitted(name, "grads")(GRAPHDEF, params, batch, aux, KEYS, cfg)
  return grads, out, aux


def assert_trees_close(a, b, rtol=2e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def model(params):
  return nnx.merge(GRAPHDEF, params)


def full_canvas(batch=BATCH):
  return batch["completion_mask"]


# -- BGPO / VRPO-OL ------------------------------------------------------------------------------

ADVANTAGES = jnp.asarray([1.0, 0.5, -0.3, 2.0])  # not group-normalised: a non-trivial mean


def test_bgpo_on_policy_value_is_mean_advantage_and_gradient_equals_vrpo_ol():
  aux = Prepared({"advantages": ADVANTAGES}, {})
  g_bgpo, out_bgpo, _ = run("bgpo", PARAMS_OLD, aux=aux, num_mc=3, mode="on_policy")
  np.testing.assert_allclose(out_bgpo.loss, -float(jnp.mean(ADVANTAGES)), rtol=1e-6)
  g_vrpo, out_vrpo, _ = run("vrpo_ol", PARAMS_OLD, aux=aux, num_mc=3, mode="on_policy")
  np.testing.assert_allclose(out_vrpo.loss, -float(jnp.mean(ADVANTAGES)), rtol=1e-6)
  assert_trees_close(g_bgpo, g_vrpo)
  g_two, _, _ = run("vrpo_ol_two_pass", PARAMS_OLD, aux=aux, num_mc=3, mode="on_policy")
  assert_trees_close(g_bgpo, g_two)
  # off-policy at θ = θ_old (old terms from prepare) gives the same gradient
  aux_off = run("bgpo", PARAMS_OLD, num_mc=3)[2]
  aux_off = Prepared(aux_off.per_example | {"advantages": ADVANTAGES}, {})
  g_off, out_off, _ = run("bgpo", PARAMS_OLD, aux=aux_off, num_mc=3)
  assert_trees_close(g_bgpo, g_off, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(out_off.loss, -float(jnp.mean(ADVANTAGES)), atol=1e-5)


def test_two_pass_vrpo_ol_equals_direct_off_policy():
  g_direct, out_direct, aux = run("vrpo_ol", PARAMS_NEW, num_mc=3)
  g_two, out_two, _ = run("vrpo_ol_two_pass", PARAMS_NEW, aux=aux, num_mc=3, micro_batch_size=2)
  np.testing.assert_allclose(out_two.loss, out_direct.loss, rtol=1e-5, atol=1e-6)
  assert_trees_close(g_direct, g_two)
  assert abs(float(out_direct.metric_values()["vrpo/log_ratio_mean"])) > 1e-3  # really off-policy


def bgpo_unrolled(params, n):
  """Independent BGPO: a Python loop over MC samples, masks from `masking`, ELBO terms from
  `elbo`, one jax.grad per sample, summed; advantages from numpy."""
  r = np.asarray(BATCH["rewards"])
  gid = np.asarray(BATCH["group_ids"])
  adv_np = np.zeros(B, np.float32)
  for g in np.unique(gid):
    idx = gid == g
    adv_np[idx] = (r[idx] - r[idx].mean()) / (r[idx].std(ddof=1) + 1e-6)
  keys = scoring.example_keys(KEYS, BATCH["example_ids"], sequence_ratio._MASK_PURPOSE)
  eligible = full_canvas()
  total_grad, total = None, 0.0
  for j in range(n):
    sample = masking.k_stratified_mask(keys, eligible, j, num_samples=n)
    old = elbo.elbo_term(model(PARAMS_OLD), BATCH["sequences"], sample, BATCH["attention_mask"])

    def loss(p):
      new = elbo.elbo_term(model(p), BATCH["sequences"], sample, BATCH["attention_mask"])
      d = new - old
      a = jnp.asarray(adv_np)
      g = jnp.where(a >= 0, (1 + d) * a, jnp.exp(jnp.minimum(d, 20.0)) * a) / n
      return -jnp.sum(g) / B

    value, grad = jax.value_and_grad(loss)(params)
    total += float(value)
    total_grad = grad if total_grad is None else jax.tree.map(jnp.add, total_grad, grad)
  return total_grad, total


def test_bgpo_scan_accumulation_equals_unrolled_and_micro_batched():
  ref_grad, ref_loss = bgpo_unrolled(PARAMS_NEW, 3)
  g, out, aux = run("bgpo", PARAMS_NEW, num_mc=3)
  np.testing.assert_allclose(out.loss, ref_loss, rtol=1e-4, atol=1e-6)
  assert_trees_close(g, ref_grad, rtol=1e-3, atol=1e-6)
  g_mb, out_mb, _ = run("bgpo", PARAMS_NEW, aux=aux, num_mc=3, micro_batch_size=2)
  np.testing.assert_allclose(out_mb.loss, out.loss, rtol=1e-5, atol=1e-7)
  assert_trees_close(g, g_mb)


# -- DMPO ----------------------------------------------------------------------------------------

def dmpo_reference(params_theta, alpha=0.5, weight_num_mc=2, loss_num_mc=2):
  """Independent DMPO weights (numpy softmax per group) and WDCE loss value."""
  eligible = full_canvas()
  mask_fn = functools.partial(masking.antithetic_mask, lambda_range=(0.1, 1.0))
  wkeys = scoring.example_keys(KEYS, BATCH["example_ids"], "dmpo/weights")
  e_v = np.asarray(elbo.elbo_estimate(model(PARAMS_OLD), BATCH["sequences"], wkeys, eligible,
                                      mask_fn, weight_num_mc, attention_mask=BATCH["attention_mask"]).mean)
  e_ref = np.asarray(elbo.elbo_estimate(model(PARAMS_REF), BATCH["sequences"], wkeys, eligible,
                                        mask_fn, weight_num_mc, attention_mask=BATCH["attention_mask"]).mean)
  r = np.asarray(BATCH["rewards"], np.float64)
  gid = np.asarray(BATCH["group_ids"])
  w = np.zeros(B)
  w_neg = np.zeros(B)
  for g in np.unique(gid):
    idx = gid == g
    lp = r[idx] / alpha + e_ref[idx] - e_v[idx]
    ln = -r[idx] / alpha + e_ref[idx] - e_v[idx]
    w[idx] = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
    w_neg[idx] = np.exp(ln - ln.max()) / np.exp(ln - ln.max()).sum()
  a = w - w_neg
  lkeys = scoring.example_keys(KEYS, BATCH["example_ids"], "dmpo/loss", fresh=True)
  loss = 0.0
  for j in range(loss_num_mc):
    sample = mask_fn(lkeys, eligible, j)
    s = np.asarray(elbo.masked_log_likelihood(model(params_theta), BATCH["sequences"], sample,
                                              BATCH["attention_mask"]))
    m = np.maximum(np.asarray(sample.scored).sum(-1), 1)
    loss += np.sum(a * (-s / m)) / loss_num_mc
  return w, a, loss / len(np.unique(gid))


def test_dmpo_weights_and_loss_match_independent_computation():
  g, out, aux = run("dmpo", PARAMS_NEW, alpha=0.5, weight_num_mc=2, loss_num_mc=2)
  w, a, loss = dmpo_reference(PARAMS_NEW)
  np.testing.assert_allclose(aux.per_example["weights"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux.per_example["advantages"], a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.loss, loss, rtol=1e-4)
  np.testing.assert_allclose(out.denominator, 2.0)
  g_mb, out_mb, _ = run("dmpo", PARAMS_NEW, aux=aux, alpha=0.5, weight_num_mc=2, loss_num_mc=2,
                        micro_batch_size=1)
  np.testing.assert_allclose(out_mb.loss, out.loss, rtol=1e-5)
  assert_trees_close(g, g_mb)


def test_dmpo_model_baseline_layout_invariant_and_micro_batched():
  kw = dict(alpha=0.5, weight_num_mc=2, loss_num_mc=2, baseline="model")
  g, out, aux = run("dmpo", PARAMS_NEW, **kw)
  # at θ = θ_old the model baseline (CRN weight masks) is exactly the group baseline 1/N
  _, out_old, _ = run("dmpo", PARAMS_OLD, aux=aux, **kw)
  _, out_group, _ = run("dmpo", PARAMS_OLD, alpha=0.5, weight_num_mc=2, loss_num_mc=2,
                        baseline="group")
  np.testing.assert_allclose(out_old.loss, out_group.loss, rtol=1e-4, atol=1e-6)
  # members of each group placed elsewhere in the batch (rows and their example ids move)
  perm = np.array([3, 0, 1, 2])
  moved = jax.tree.map(lambda x: x[perm], BATCH)
  g_moved, out_moved, aux_moved = run("dmpo", PARAMS_NEW, batch=moved, **kw)
  for key in ("weights", "advantages", "elbo_old"):
    np.testing.assert_allclose(aux_moved.per_example[key], np.asarray(aux.per_example[key])[perm],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_moved.loss, out.loss, rtol=1e-5)
  assert_trees_close(g, g_moved)
  g_mb, out_mb, _ = run("dmpo", PARAMS_NEW, aux=aux, micro_batch_size=2, **kw)
  np.testing.assert_allclose(out_mb.loss, out.loss, rtol=1e-5)
  assert_trees_close(g, g_mb)


# -- two-pass WDDO and SPG EUBO vs direct autodiff -----------------------------------------------

def test_wddo_two_pass_equals_direct_autodiff():
  cfg = dict(alpha=0.5, weight_num_mc=2, beta=0.7, fake_weight=0.5)
  g, out, aux = run("wddo", PARAMS_NEW, **cfg)
  pe = aux.per_example
  mask_fn = functools.partial(masking.antithetic_mask, lambda_range=(0.1, 1.0))
  real = scoring.example_keys(KEYS, BATCH["example_ids"], "dmpo/weights")
  fake = scoring.example_keys(KEYS, BATCH["example_ids"], "wddo/fake")

  def direct(p):
    est = lambda keys: elbo.elbo_estimate(model(p), BATCH["sequences"], keys, full_canvas(),
                                          mask_fn, 2, attention_mask=BATCH["attention_mask"]).mean
    x = 0.7 * (est(real) - pe["elbo_old"])
    y = 0.7 * (est(fake) - pe["elbo_old_fake"])
    return jnp.mean(-pe["weights"] * jax.nn.log_sigmoid(x) - 0.5 * jax.nn.log_sigmoid(-y))

  value, grad = jax.value_and_grad(direct)(PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)
  np.testing.assert_allclose(np.asarray(pe["weights"]).reshape(2, 2).sum(0), [2.0, 2.0], rtol=1e-5)


def test_spg_eubo_two_pass_equals_direct_autodiff():
  cfg = dict(num_mc=2, block_length=4, eubo_beta=1.5, negative_estimator="mix", mix_weight=0.3)
  g, out, aux = run("spg", PARAMS_NEW, **cfg)
  keys = scoring.example_keys(KEYS, BATCH["example_ids"], "spg/block", per_iteration=True)
  eligible = scoring.eligible_positions(BATCH, CONFIG.eos_token_id, include_eos_padding=False)
  a = np.asarray(BATCH["rewards"]) - np.array([1.5, 0.25, 1.5, 0.25])
  length = np.asarray(eligible).sum(-1)
  np.testing.assert_allclose(aux.per_example["completion_length"], length)
  samples = [masking.spg_block_mask(keys, eligible, j, completion_positions=BATCH["completion_mask"],
                                    block_length=4,
                                    prompt_positions=BATCH["prompt_mask"] & BATCH["attention_mask"])
             for j in range(2)]

  def direct(p):
    lps = [elbo.masked_token_log_probs(model(p), BATCH["sequences"], s, BATCH["attention_mask"])
           for s in samples]
    pos = sum(s.weight * jnp.sum(lp, -1) for s, lp in zip(samples, lps)) / 2
    pbar = sum(jnp.where(s.scored, jnp.exp(1.5 * lp) / s.ratio[:, None], 0.0)
               for s, lp in zip(samples, lps)) / 2
    covered = pbar > 0
    eubo = jnp.sum(jnp.where(covered, jnp.log(jnp.where(covered, pbar, 1.0)), 0.0), -1) / (
        1.5 * jnp.sum(covered, -1))
    neg = 0.3 * eubo + 0.7 * pos
    score = jnp.where(a > 0, pos, neg)
    return jnp.sum(-a * score * length) / np.sum(length)

  value, grad = jax.value_and_grad(direct)(PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)


# -- diffu-GRPO and wd1 --------------------------------------------------------------------------

def one_step_logps(params, seed_index):
  keys = scoring.example_keys(KEYS, BATCH["example_ids"], "one_step/seed")
  eligible = scoring.eligible_positions(BATCH, CONFIG.eos_token_id, include_eos_padding=False)
  sample = masking.one_step_mask(keys, eligible, seed_index,
                                 prompt_positions=BATCH["prompt_mask"] & BATCH["attention_mask"],
                                 completion_positions=BATCH["completion_mask"], p_mask_prompt=0.3)
  return elbo.masked_token_log_probs(model(params), BATCH["sequences"], sample,
                                     BATCH["attention_mask"]), sample.scored


def test_diffu_grpo_matches_independent_token_loss():
  g, out, aux = run("diffu_grpo", PARAMS_NEW, num_iterations=3, p_mask_prompt=0.3, beta=0.04,
                    clip_eps=0.2)
  k = 2  # KEYS.iteration mod 3
  a = np.asarray(BATCH["rewards"]) - np.array([1.5, 0.25, 1.5, 0.25])
  old, scored = one_step_logps(PARAMS_OLD, k)
  ref, _ = one_step_logps(PARAMS_REF, k)
  np.testing.assert_allclose(aux.per_example["old_logps"][:, k], old, rtol=1e-5, atol=1e-5)

  def direct(p):
    lp, _ = one_step_logps(p, k)
    ratio = jnp.exp(lp - old)
    surrogate = jnp.minimum(ratio * a[:, None], jnp.clip(ratio, 0.8, 1.2) * a[:, None])
    kl = jnp.exp(ref - lp) - (ref - lp) - 1
    return -jnp.sum(jnp.where(scored, surrogate - 0.04 * kl, 0.0)) / jnp.sum(scored)

  value, grad = jax.value_and_grad(direct)(PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)
  assert int(np.asarray(scored)[1].sum()) == 4  # scored up to and including the first EOS


def test_wd1_matches_independent_loss():
  g, out, aux = run("wd1", PARAMS_NEW, num_iterations=3, p_mask_prompt=0.3)
  a = np.asarray(BATCH["rewards"]) - np.array([1.5, 0.25, 1.5, 0.25])
  w_pos = np.array([np.exp(a[0]), np.exp(a[1]), np.exp(a[2]), np.exp(a[3])])
  w_pos /= np.array([w_pos[0] + w_pos[2], w_pos[1] + w_pos[3]] * 2)
  w_neg = np.exp(-a) / np.array([np.exp(-a[0]) + np.exp(-a[2]), np.exp(-a[1]) + np.exp(-a[3])] * 2)

  def direct(p):
    lp, _ = one_step_logps(p, 2)
    return jnp.sum((w_neg - w_pos) * jnp.sum(lp, -1)) / 2

  value, grad = jax.value_and_grad(direct)(PARAMS_NEW)
  np.testing.assert_allclose(out.loss, value, rtol=1e-5)
  assert_trees_close(g, grad)
