"""Tests of the Monte-Carlo mask samplers (`dmpo_jax.diffusion.masking`, `docs/algorithms.md` §1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmpo_jax.diffusion import masking as M

_JITTED = {}


def J(fn, **static):
  """Cached jitted mask function (eager vmapped code is slow on CPU)."""
  key = (fn, tuple(sorted(static.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(fn, **static))
  return _JITTED[key]


B, P, L = 64, 5, 11
T = P + L


def _eligible(batch=B):
  """Completion eligible; some rows padded at the end (honoured), one row with nothing."""
  lengths = np.arange(batch) % (L + 1)
  elig = np.zeros((batch, T), bool)
  for b, n in enumerate(lengths):
    elig[b, P:P + n] = True
  return elig  # a host array: building it at import compiles nothing


@functools.cache
def mask_keys():
  """The per-example mask keys of the tests (computed on first use: nothing compiles at import)."""
  return M.mask_keys(jax.random.key(7), 3, jnp.arange(B), "test")


ELIG = _eligible()


def test_mask_keys_are_deterministic_and_distinct():
  a = M.mask_keys(jax.random.key(7), 3, jnp.arange(B), "test")
  np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(mask_keys()))
  # Different step, purpose or example id -> different masks.
  variants = [M.mask_keys(jax.random.key(7), 4, jnp.arange(B), "test"),
              M.mask_keys(jax.random.key(7), 3, jnp.arange(B), "other"),
              M.mask_keys(jax.random.key(7), 3, jnp.arange(B) + 1, "test")]
  base = np.asarray(J(M.t_iid_mask)(mask_keys(), ELIG, 0).mask)
  for keys in variants:
    assert not np.array_equal(np.asarray(J(M.t_iid_mask)(keys, ELIG, 0).mask), base)
  # Raw uint32 keys work too.
  raw = M.mask_keys(jax.random.PRNGKey(7), 3, jnp.arange(B), "test")
  assert raw.shape == (B, 2)
  assert M.purpose_tag("loss") == M.purpose_tag("loss") != M.purpose_tag("weights")


ALL_FNS = {
    "t_iid": functools.partial(M.t_iid_mask, eps=1e-3),
    "k_stratified": functools.partial(M.k_stratified_mask, num_samples=4),
    "uniform_count": M.uniform_count_mask,
    "antithetic": M.antithetic_mask,
}


@pytest.mark.parametrize("name", sorted(ALL_FNS))
@pytest.mark.slow
def test_only_eligible_positions_and_crn(name):
  fn = ALL_FNS[name]
  for j in range(3):
    s = J(fn)(mask_keys(), ELIG, j)
    mask, elig = np.asarray(s.mask), np.asarray(ELIG)
    assert not np.any(mask & ~elig), "prompt or padding masked"
    np.testing.assert_array_equal(np.asarray(s.scored), mask)
    n_elig = elig.sum(-1)
    assert np.all(np.asarray(s.weight)[n_elig == 0] == 0)
    np.testing.assert_allclose(np.asarray(s.ratio), np.where(n_elig > 0, mask.sum(-1) / np.maximum(n_elig, 1), 0), rtol=1e-6)
    if j != 1:
      continue
    # Same keys -> identical masks, jitted (traced mc index) or not (CRN across policies).
    again = fn(mask_keys(), ELIG, j)
    np.testing.assert_array_equal(np.asarray(again.mask), mask)
    np.testing.assert_allclose(np.asarray(again.weight), np.asarray(s.weight), rtol=1e-6)


def test_t_iid_weight_is_inverse_mask_probability():
  keys = M.mask_keys(jax.random.key(1), 0, jnp.arange(4096), "t")
  elig = jnp.ones((4096, 32), bool)
  s = J(M.t_iid_mask, eps=0.1)(keys, elig, 0)
  p = 1.0 / np.asarray(s.weight)
  assert p.min() >= 0.1 - 1e-6 and p.max() <= 1.0
  # p = 0.9 t + 0.1 with t ~ U(0,1): mean 0.55; masked fraction per row ~ Binomial(32, p) / 32.
  assert abs(p.mean() - 0.55) < 0.01
  frac = np.asarray(s.mask).mean(-1)
  resid = (frac - p) / np.sqrt(p * (1 - p) / 32 + 1e-9)
  assert abs(resid.mean()) < 0.1 and 0.8 < resid.std() < 1.2


def test_k_stratified_counts_and_weights_match_formula():
  n = 5
  counts = []
  for j in range(n):
    s = J(M.k_stratified_mask, num_samples=n)(mask_keys(), ELIG, j)
    counts.append(np.asarray(s.mask).sum(-1))
    lengths = np.asarray(ELIG).sum(-1)
    k = counts[-1]
    np.testing.assert_allclose(np.asarray(s.weight), np.where(lengths > 0, lengths / np.maximum(k, 1), 0), rtol=1e-6)
  counts = np.stack(counts)  # [n, B]
  for b, length in enumerate(np.asarray(ELIG).sum(-1)):
    if length == 0:
      assert np.all(counts[:, b] == 0)
      continue
    k0 = counts[0, b]
    assert 1 <= k0 <= length
    expected = [((int(np.round(k0 + i * length / n)) - 1) % length) + 1 for i in range(n)]
    assert counts[:, b].tolist() == expected


def test_k_stratified_offset_is_uniform_and_subsets_uniform():
  rows, length = 6000, 4
  keys = M.mask_keys(jax.random.key(3), 0, jnp.arange(rows), "k")
  elig = jnp.zeros((rows, 6), bool).at[:, 2:].set(True)
  s = J(M.k_stratified_mask, num_samples=2)(keys, elig, 0)
  mask = np.asarray(s.mask)[:, 2:]
  counts = np.bincount(mask.sum(-1), minlength=length + 1)
  assert counts[0] == 0
  np.testing.assert_allclose(counts[1:] / rows, 0.25, atol=0.03)
  # Given the count, each position is equally likely.
  np.testing.assert_allclose(mask.mean(0), mask.mean(), atol=0.03)


@pytest.mark.slow
def test_antithetic_pairs_are_complements_with_lambda_range():
  for pair in range(2):
    even = J(M.antithetic_mask)(mask_keys(), ELIG, 2 * pair)
    odd = J(M.antithetic_mask)(mask_keys(), ELIG, 2 * pair + 1)
    np.testing.assert_array_equal(np.asarray(odd.mask), np.asarray(ELIG) & ~np.asarray(even.mask))
    for s in (even, odd):
      m = np.asarray(s.mask).sum(-1)
      lengths = np.asarray(ELIG).sum(-1)
      np.testing.assert_allclose(np.asarray(s.weight), np.where(lengths > 0, lengths / np.maximum(m, 1), 0), rtol=1e-6)
  # Pairs differ.
  assert not np.array_equal(np.asarray(J(M.antithetic_mask)(mask_keys(), ELIG, 0).mask),
                            np.asarray(J(M.antithetic_mask)(mask_keys(), ELIG, 2).mask))
  # lambda in [0.1, 1): fraction masked on long rows concentrates in that range; (0.5, 0.5) -> 1/2.
  keys = M.mask_keys(jax.random.key(5), 0, jnp.arange(2000), "a")
  elig = jnp.ones((2000, 400), bool)
  frac = np.asarray(J(M.antithetic_mask)(keys, elig, 0).mask).mean(-1)
  assert frac.min() > 0.05 and abs(frac.mean() - 0.55) < 0.02
  half = np.asarray(J(M.antithetic_mask, lambda_range=(0.5, 0.5))(keys, elig, 1).mask).mean(-1)
  assert abs(half.mean() - 0.5) < 0.01
  with pytest.raises(ValueError, match="lambda_range"):
    M.antithetic_mask(keys, elig, 0, lambda_range=(0.5, 1.5))


def test_one_step_mask_masks_completion_and_prompt_with_probability():
  rows = 2000
  keys = M.mask_keys(jax.random.key(9), 0, jnp.arange(rows), "d1")
  prompt = np.zeros((rows, 24), bool)
  prompt[:, 4:12] = True  # positions 0..3 are left padding
  completion = np.zeros((rows, 24), bool)
  completion[:, 12:] = True
  elig = completion.copy()
  elig[:, 20:] = False  # after the first EOS: masked but not scored
  s = M.one_step_mask(keys, jnp.asarray(elig), 0, prompt_positions=jnp.asarray(prompt),
                      completion_positions=jnp.asarray(completion), p_mask_prompt=0.15)
  mask = np.asarray(s.mask)
  assert mask[:, 12:].all()
  assert not mask[:, :4].any(), "padding masked"
  assert abs(mask[:, 4:12].mean() - 0.15) < 0.01
  np.testing.assert_array_equal(np.asarray(s.scored), elig)
  np.testing.assert_array_equal(np.asarray(s.weight), 1.0)
  # Different MC indices (d1's mask seeds) give different prompt masks.
  other = np.asarray(M.one_step_mask(keys, jnp.asarray(elig), 1, prompt_positions=jnp.asarray(prompt),
                                     completion_positions=jnp.asarray(completion)).mask)
  assert not np.array_equal(other, mask)


def test_spg_block_mask_structure():
  rows, block = 96, 4
  keys = M.mask_keys(jax.random.key(11), 0, jnp.arange(rows), "spg")
  prompt_len, gen = 3, 16
  completion = np.zeros((rows, prompt_len + gen), bool)
  completion[:, prompt_len:] = True
  valid_len = 1 + np.arange(rows) % gen  # tokens up to and including the first EOS
  elig = np.zeros_like(completion)
  for b, n in enumerate(valid_len):
    elig[b, prompt_len:prompt_len + n] = True
  chosen_blocks = []
  spg = jax.jit(lambda k, e, j, c: M.spg_block_mask(k, e, j, completion_positions=c, block_length=block))
  for j in range(2):
    s = spg(keys, jnp.asarray(elig), j, jnp.asarray(completion))
    mask, scored = np.asarray(s.mask), np.asarray(s.scored)
    assert not mask[:, :prompt_len].any()
    np.testing.assert_array_equal(scored, mask & elig)
    row_chosen = []
    for b in range(rows):
      comp_mask = mask[b, prompt_len:]
      comp_elig = elig[b, prompt_len:]
      assert comp_mask[~comp_elig].all(), "tail after EOS must be masked"
      blocks = np.arange(gen) // block
      n_valid_blocks = -(-valid_len[b] // block)
      partial = [k for k in range(gen // block)
                 if comp_mask[(blocks == k) & comp_elig].any() and not comp_mask[(blocks == k) & comp_elig].all()]
      masked_valid_blocks = [k for k in range(n_valid_blocks) if comp_mask[(blocks == k) & comp_elig].any()]
      first = min(masked_valid_blocks)
      assert first < n_valid_blocks
      # Blocks before the chosen one are clean; later valid blocks fully masked.
      for k in range(first + 1, n_valid_blocks):
        assert comp_mask[(blocks == k) & comp_elig].all()
      assert len(partial) <= 1 and (not partial or partial[0] == first)
      n_in = comp_mask[(blocks == first) & comp_elig].sum()
      assert 1 <= n_in <= ((blocks == first) & comp_elig).sum()
      np.testing.assert_allclose(float(s.weight[b]), 1.0 / scored[b].sum(), rtol=1e-6)
      np.testing.assert_allclose(float(s.ratio[b]), scored[b].sum() / valid_len[b], rtol=1e-6)
      row_chosen.append(first)
    chosen_blocks.append(row_chosen)
  chosen = np.asarray(chosen_blocks)
  # Rows with >= 2 valid blocks: the two draws come from a permutation of all blocks mod B_c; for
  # rows whose valid blocks are all 4 blocks, the two draws are distinct.
  full = valid_len > 12
  assert np.all(chosen[0, full] != chosen[1, full])
  # Every valid block is chosen sometimes.
  assert set(chosen[0, full].tolist()) == {0, 1, 2, 3}


def test_completion_eligibility():
  seq = jnp.asarray([[1, 2, 3, 9, 5, 9, 9], [1, 2, 3, 4, 4, 4, 4]])
  full = M.completion_eligibility(seq, 3)
  np.testing.assert_array_equal(np.asarray(full), [[0, 0, 0, 1, 1, 1, 1]] * 2)
  upto = M.completion_eligibility(seq, 3, eos_token_id=9, include_eos_padding=False)
  np.testing.assert_array_equal(np.asarray(upto), [[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match="eos_token_id"):
    M.completion_eligibility(seq, 3, include_eos_padding=False)
  with pytest.raises(TypeError, match="bool"):
    M.t_iid_mask(mask_keys()[:2], jnp.zeros((2, 4), jnp.int32), 0)
