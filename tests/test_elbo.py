"""ELBO estimator tests (`dmpo_jax.diffusion.elbo`, `docs/algorithms.md` §1).

The toy check: a tiny transformer with large random weights (strongly context-dependent
conditionals) over a 4-token completion. All 2^4 masked conditionals are computed in one batched
forward pass, which gives
  * log p(x) of the any-order autoregressive model exactly, by enumerating the 4! reveal orders:
    p(x) = (1/L!) Σ_σ Π_i q(x_σ(i) | x_σ(<i));
  * the MDM bound  Σ_k (1/k) E_{|M|=k} S(M)  (= E_σ log Π_i q(…), hence ≤ log p(x) by Jensen);
  * each estimator's exact expectation under its mask law.
The Monte-Carlo mean of the real `elbo_estimate` is then compared with these numbers.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from dmpo_jax.diffusion import elbo as E
from dmpo_jax.diffusion import masking as M
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model

PROMPT = [72, 105, 33]
COMPLETION = [111, 107, 46, 10]
P, L = len(PROMPT), len(COMPLETION)


@pytest.fixture(scope="module")
def toy():
  config = get_preset("tiny", initializer_range=0.4)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model(config, 3)))
  params = jax.jit(lambda: nnx.split(create_model(config, 3))[1])()  # jitted init: fast on CPU
  return config, nnx.merge(graphdef, params)


_GRAPH_CACHE = {}


def full_logits(model, ids, attention_mask=None):
  """Jitted full fp32 logits (the unchunked path), one compile per shape."""
  graphdef, state = nnx.split(model)
  if "fn" not in _GRAPH_CACHE:
    _GRAPH_CACHE["fn"] = jax.jit(lambda st, x, am: nnx.merge(graphdef, st)(x, am))
  return _GRAPH_CACHE["fn"](state, ids, attention_mask)


def _subset_table(model, config):
  """lp[s, d] = log q(x_d | x with subset s of the completion masked), s as a bitmask."""
  seq = np.asarray(PROMPT + COMPLETION)
  rows = []
  for s in range(2 ** L):
    row = seq.copy()
    for d in range(L):
      if s >> d & 1:
        row[P + d] = config.mask_token_id
    rows.append(row)
  logits = np.asarray(full_logits(model, jnp.asarray(np.stack(rows)), None), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return np.stack([[logp[s, P + d, COMPLETION[d]] for d in range(L)] for s in range(2 ** L)])


def _exact_quantities(lp):
  full = 2 ** L - 1
  log_terms = []
  for order in itertools.permutations(range(L)):
    masked, total = full, 0.0
    for d in order:
      total += lp[masked, d]
      masked &= ~(1 << d)
    log_terms.append(total)
  log_px = np.logaddexp.reduce(log_terms) - math.log(math.factorial(L))
  s_of = lambda s: sum(lp[s, d] for d in range(L) if s >> d & 1)
  mean_s_given_k = np.zeros(L + 1)
  for s in range(1, 2 ** L):
    k = bin(s).count("1")
    mean_s_given_k[k] += s_of(s) / math.comb(L, k)
  bound = sum(mean_s_given_k[k] / k for k in range(1, L + 1))
  return log_px, bound, mean_s_given_k, float(np.mean(log_terms))


@pytest.mark.slow
def test_masked_log_likelihood_matches_full_logits(toy):
  config, model = toy
  rng = np.random.default_rng(0)
  seq = jnp.asarray(rng.integers(0, 256, (3, 9)))
  attention = jnp.asarray([[1] * 9, [0, 0] + [1] * 7, [1] * 9])
  elig = jnp.zeros((3, 9), bool).at[:, 4:].set(True)
  keys = M.mask_keys(jax.random.key(0), 0, jnp.arange(3), "t")
  sample = M.t_iid_mask(keys, elig, 0)
  got = jax.jit(lambda s: E.masked_log_likelihood(model, seq, s, attention))(sample)
  noised = np.where(np.asarray(sample.mask), config.mask_token_id, np.asarray(seq))
  logits = np.asarray(full_logits(model, jnp.asarray(noised), attention), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tok = np.take_along_axis(logp, np.asarray(seq)[..., None], -1)[..., 0]
  expected = (tok * np.asarray(sample.scored)).sum(-1)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sample.weight * got), expected * np.asarray(sample.weight),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_elbo_estimate_scan_equals_loop_and_shares_masks(toy):
  config, model = toy
  graphdef, state = nnx.split(model)
  other = nnx.merge(graphdef, jax.tree.map(lambda x: 1.3 * x, state))  # e.g. the reference policy
  seq = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 10)))
  elig = M.completion_eligibility(seq, 4)
  keys = M.mask_keys(jax.random.key(1), 5, jnp.arange(4), "weights")
  mask_fn = functools.partial(M.k_stratified_mask, num_samples=3)
  estimate = jax.jit(lambda m: E.elbo_estimate(m, seq, keys, elig, mask_fn, 3))
  term = jax.jit(lambda m, j: E.elbo_term(m, seq, mask_fn(keys, elig, j)))
  for m in (model, other):
    est = estimate(m)
    loop = [np.asarray(term(m, j)) for j in range(3)]
    np.testing.assert_allclose(np.asarray(est.terms), np.stack(loop), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(est.mean), np.mean(loop, 0), rtol=1e-5, atol=1e-5)
    assert est.mean.dtype == jnp.float32


@pytest.mark.slow
def test_estimator_expectations_equal_the_bound_below_log_px(toy):
  config, model = toy
  lp = _subset_table(model, config)
  log_px, bound, mean_s_given_k, order_mean = _exact_quantities(lp)
  np.testing.assert_allclose(bound, order_mean, rtol=1e-9)  # bound = E_σ log Π q
  assert bound < log_px - 0.05, (bound, log_px)

  # Exact expectations of the mask laws (analytic): k-stratified averages (L/k_i) E[S|k_i] over a
  # uniform offset; t-iid with eps=0 weights E[S|k] by ∫ C(L,k) t^(k-1) (1-t)^(L-k) dt = 1/k.
  n = 2
  strat = np.mean([np.mean([L / k * mean_s_given_k[k] for k in
                            [((round(k0 + i * L / n) - 1) % L) + 1 for i in range(n)]])
                   for k0 in range(1, L + 1)])
  np.testing.assert_allclose(strat, bound, rtol=1e-9)
  # Antithetic Bernoulli pairs, lambda ~ U[lo, hi]: P(|M|=k) = ½ E_λ[Bin(k; L, λ) + Bin(k; L, 1-λ)].
  def antithetic_expectation(lo, hi):
    lam = lo + (hi - lo) * (np.arange(20000) + 0.5) / 20000
    total = 0.0
    for k in range(1, L + 1):
      pk = 0.5 * np.mean(math.comb(L, k) * (lam ** k * (1 - lam) ** (L - k)
                                             + (1 - lam) ** k * lam ** (L - k)))
      total += pk * L / k * mean_s_given_k[k]
    return total
  # With lambda ~ U(0,1) every count 0..L has probability 1/(L+1): expectation = L/(L+1) · bound.
  np.testing.assert_allclose(antithetic_expectation(0.0, 1.0), L / (L + 1) * bound, rtol=1e-6)
  anti = antithetic_expectation(0.1, 1.0)

  # Monte-Carlo means of the mask laws with the exact per-subset values (cheap), then the real
  # `elbo_estimate` (through the model) against the same table on its own masks.
  rows, n_mc = 4096, 4
  seq = jnp.asarray(np.tile(PROMPT + COMPLETION, (rows, 1)))
  elig = M.completion_eligibility(seq, P)
  keys = M.mask_keys(jax.random.key(2), 0, jnp.arange(rows), "exact")
  bits = 1 << np.arange(L)
  cases = {
      "k_stratified": (functools.partial(M.k_stratified_mask, num_samples=n_mc), bound),
      "t_iid": (functools.partial(M.t_iid_mask, eps=0.0), bound),
      "uniform_count": (M.uniform_count_mask, bound),
      "antithetic": (M.antithetic_mask, anti),
  }
  for name, (mask_fn, expected) in cases.items():
    draw = jax.jit(lambda k, j, fn=mask_fn: fn(k, elig, j))
    terms = []
    for j in range(n_mc):
      sample = draw(keys, j)
      mask = np.asarray(sample.mask)[:, P:]
      subset = mask.astype(np.int64) @ bits
      s_value = (lp[subset] * mask).sum(-1)
      terms.append(np.asarray(sample.weight, np.float64) * s_value)
    per_row = np.mean(terms, 0)
    se = per_row.std() / math.sqrt(rows)
    assert abs(per_row.mean() - expected) < 4 * se, (name, per_row.mean(), expected, se)
    if expected == bound:
      assert 4 * se < log_px - bound  # sharp enough to tell the bound from log p(x)
  # DMPO's law is not the bound: the k = 0 complement mass is lost and counts are not uniform.
  # Its expectation is not guaranteed to lie below log p(x) (on this 4-token toy it does not).
  assert abs(anti - bound) > 0.5

  small = 64
  mask_fn = functools.partial(M.k_stratified_mask, num_samples=n_mc)
  est = jax.jit(lambda k: E.elbo_estimate(model, seq[:small], k, elig[:small], mask_fn, n_mc))(keys[:small])
  for j in range(n_mc):
    sample = mask_fn(keys[:small], elig[:small], j)
    mask = np.asarray(sample.mask)[:, P:]
    expected_terms = np.asarray(sample.weight) * (lp[mask.astype(np.int64) @ bits] * mask).sum(-1)
    np.testing.assert_allclose(np.asarray(est.terms[j]), expected_terms, rtol=1e-4, atol=1e-4)
