"""Objective options that reproduce the PyTorch reference code (`docs/algorithms.md` §2.3, §4,
§5.4): per-micro-batch loss normalisation (DMPO, diffu-GRPO, SPG), DMPO alpha = -1 and separate
EOS switches for the weights and the loss, wd1 ``pos_only``, SPG's ``block_random`` prompt
masking and d1's prompt masking of left padding.

The normalisation tests compose the reference's rule from independent pieces: the gradient with
``reference_micro_batch_size = c`` must equal the average over the K = B/c micro-batches of the
gradient of each micro-batch normalised on its own (the reference's gradient accumulation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmpo_jax.diffusion import masking
from dmpo_jax.rl import advantages as adv
from dmpo_jax.rl import grad as G
from dmpo_jax.rl.objectives import one_step
from dmpo_jax.rl.objectives.base import Prepared

from tests.helpers import objective_setup as tiny
from tests.helpers.objective_setup import assert_trees_close, model, run


def test_loss_normalization_by_hand():
  counts = jnp.asarray([3.0, 1.0, 2.0, 2.0])
  scale, den = G.loss_normalization(counts, None)
  np.testing.assert_array_equal(scale, [1, 1, 1, 1])
  np.testing.assert_array_equal(den, counts)
  # Two micro-batches of 2: token totals 4 and 4 -> scale 1/4; Σ den = K = 2.
  scale, den = G.loss_normalization(counts, 2, reference_counts=counts)
  np.testing.assert_allclose(scale, [0.25, 0.25, 0.25, 0.25])
  np.testing.assert_allclose(den, [0.5, 0.5, 0.5, 0.5])
  # Rows with losses l: reference = mean_k( Σ_{i∈k} l_i / Σ_{i∈k} n_i ).
  l = np.asarray([1.0, 2.0, 3.0, 5.0])
  want = 0.5 * ((1 + 2) / 4 + (3 + 5) / 4)
  np.testing.assert_allclose(float(jnp.sum(scale * l) / jnp.sum(den)), want, rtol=1e-6)
  # Micro-batch sums (DMPO): scale 1, denominator K.
  scale, den = G.loss_normalization(jnp.full((4,), 0.5), 4)
  np.testing.assert_array_equal(scale, [1, 1, 1, 1])
  assert float(jnp.sum(den)) == 1.0
  with pytest.raises(ValueError, match="divide"):
    G.loss_normalization(counts, 3)


def _rows(tree, rows):
  return jax.tree.map(lambda x: x[np.asarray(rows)], tree)


def _chunk_average(name, aux, chunk_factor, **overrides):
  """(1/K) Σ_k factor·∇(loss of micro-batch k normalised on its own), c = 2 rows."""
  total = None
  for rows in ([0, 1], [2, 3]):
    sub_aux = Prepared(_rows(aux.per_example, rows), aux.metrics)
    g, _, _ = run(name, tiny.PARAMS_NEW, batch=_rows(tiny.BATCH, rows), aux=sub_aux, **overrides)
    g = jax.tree.map(lambda x: x * chunk_factor / 2, g)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return total


@pytest.mark.slow
def test_diffu_grpo_per_micro_batch_token_mean():
  """d1: each micro-batch's loss is its own token mean; micro-batch losses are averaged."""
  _, _, aux = run("diffu_grpo", tiny.PARAMS_OLD, num_iterations=2)
  g_ref, out_ref, _ = run("diffu_grpo", tiny.PARAMS_NEW, aux=aux, num_iterations=2,
                          reference_micro_batch_size=2)
  want = _chunk_average("diffu_grpo", aux, 1.0, num_iterations=2)
  assert_trees_close(g_ref, want, rtol=2e-4, atol=1e-7)
  g_global, _, _ = run("diffu_grpo", tiny.PARAMS_NEW, aux=aux, num_iterations=2)
  # The two normalisations differ here (the micro-batches hold different token counts).
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_global)))
  assert diff > 1e-6
  assert np.isfinite(float(out_ref.loss))


@pytest.mark.slow
def test_spg_per_micro_batch_length_normalisation():
  _, _, aux = run("spg", tiny.PARAMS_OLD, num_mc=2, block_length=4)
  g_ref, _, _ = run("spg", tiny.PARAMS_NEW, aux=aux, num_mc=2, block_length=4,
                    reference_micro_batch_size=2)
  want = _chunk_average("spg", aux, 1.0, num_mc=2, block_length=4)
  assert_trees_close(g_ref, want, rtol=2e-4, atol=1e-7)


@pytest.mark.slow
def test_dmpo_reference_loss_scale():
  """DMPO reference: mean over micro-batches of each micro-batch's summed loss. The default
  divides by the number of prompts; here each micro-batch of 2 rows holds 1 prompt's worth of
  weight (groups of 2), so a micro-batch normalised on its own divides by 1: factor 1."""
  _, _, aux = run("dmpo", tiny.PARAMS_OLD, baseline="group", loss_num_mc=2, weight_num_mc=2)
  g_ref, out_ref, _ = run("dmpo", tiny.PARAMS_NEW, aux=aux, baseline="group", loss_num_mc=2,
                          weight_num_mc=2, reference_micro_batch_size=2)
  want = _chunk_average("dmpo", aux, 1.0, baseline="group", loss_num_mc=2, weight_num_mc=2)
  assert_trees_close(g_ref, want, rtol=2e-4, atol=1e-8)
  # Against the default scale: the reference's gradient is the default × c/G... here B/c = 2
  # micro-batches against P = 2 prompts, so both scales agree; a micro-batch of the whole batch
  # (c = 4) halves it (one micro-batch sum vs a mean over 2 prompts).
  g_default, out_default, _ = run("dmpo", tiny.PARAMS_NEW, aux=aux, baseline="group", loss_num_mc=2,
                                  weight_num_mc=2)
  assert_trees_close(g_ref, g_default, rtol=2e-4, atol=1e-8)
  g_one, out_one, _ = run("dmpo", tiny.PARAMS_NEW, aux=aux, baseline="group", loss_num_mc=2,
                          weight_num_mc=2, reference_micro_batch_size=4)
  assert_trees_close(g_one, jax.tree.map(lambda x: 2.0 * x, g_default), rtol=2e-4, atol=1e-8)
  np.testing.assert_allclose(float(out_one.loss), 2.0 * float(out_default.loss), rtol=1e-5)


@pytest.mark.slow
def test_dmpo_alpha_minus_one_raw_reward_weights():
  """alpha = -1: w = r, w⁻ = −r (no softmax). Individual baseline: A = r − (−r) = 2r; group
  baseline: A = r − mean_G(r). Rewards [1, 0, 2, 0.5], groups {0, 2} and {1, 3}."""
  r = tiny.BATCH["rewards"]
  w = adv.dmpo_weights(r, jnp.zeros_like(r), tiny.BATCH["group_ids"], alpha=-1.0)
  np.testing.assert_array_equal(w["weights"], [1.0, 0.0, 2.0, 0.5])
  np.testing.assert_array_equal(w["negative_weights"], [-1.0, 0.0, -2.0, -0.5])
  _, _, aux = run("dmpo", tiny.PARAMS_OLD, alpha=-1.0, baseline="individual", loss_num_mc=2,
                  weight_num_mc=2)
  np.testing.assert_allclose(aux.per_example["advantages"], [2.0, 0.0, 4.0, 1.0], rtol=1e-6)
  _, _, aux = run("dmpo", tiny.PARAMS_OLD, alpha=-1.0, baseline="group", loss_num_mc=2,
                  weight_num_mc=2)
  np.testing.assert_allclose(aux.per_example["advantages"], [-0.5, -0.25, 0.5, 0.25], rtol=1e-6)
  with pytest.raises(ValueError, match="alpha"):
    run("dmpo", tiny.PARAMS_OLD, alpha=-2.0)
  with pytest.raises(ValueError, match="target_ess"):
    run("dmpo", tiny.PARAMS_OLD, alpha=-1.0, target_ess=0.5)


@pytest.mark.slow
def test_dmpo_separate_eos_switch_for_the_loss():
  """Weights on the full canvas, loss up to the first EOS: the loss (given fixed weights) equals
  the loss of a config that scores up to the first EOS everywhere, and differs from the
  full-canvas loss."""
  _, _, aux = run("dmpo", tiny.PARAMS_OLD, loss_num_mc=2, weight_num_mc=2)
  g_split, _, _ = run("dmpo", tiny.PARAMS_NEW, aux=aux, loss_num_mc=2, weight_num_mc=2,
                      include_eos_padding=True, loss_include_eos_padding=False)
  g_first_eos, _, _ = run("dmpo", tiny.PARAMS_NEW, aux=aux, loss_num_mc=2, weight_num_mc=2,
                          include_eos_padding=False)
  g_canvas, _, _ = run("dmpo", tiny.PARAMS_NEW, aux=aux, loss_num_mc=2, weight_num_mc=2)
  assert_trees_close(g_split, g_first_eos, rtol=1e-6, atol=1e-9)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(g_split), jax.tree.leaves(g_canvas)))
  assert diff > 1e-7


@pytest.mark.slow
def test_wd1_pos_only_by_hand():
  w_pos = jnp.asarray([0.7, 0.3])
  w_neg = jnp.asarray([0.2, 0.8])
  ll = jnp.asarray([-2.0, -5.0])
  np.testing.assert_allclose(one_step.wd1_sequence_loss(w_pos, w_neg, ll),
                             [(0.2 - 0.7) * -2.0, (0.8 - 0.3) * -5.0], rtol=1e-6)
  np.testing.assert_allclose(one_step.wd1_sequence_loss(w_pos, w_neg, ll, pos_only=True),
                             [-0.7 * -2.0, -0.3 * -5.0], rtol=1e-6)
  # Through the objective: pos_only drops the w⁻ term, so the loss is −Σ w⁺ℓ / P.
  g_both, out_both, aux = run("wd1", tiny.PARAMS_NEW, num_iterations=2)
  g_pos, out_pos, _ = run("wd1", tiny.PARAMS_NEW, aux=aux, num_iterations=2, pos_only=True)
  assert float(out_pos.loss) != pytest.approx(float(out_both.loss))
  assert float(out_pos.loss) > 0  # −w⁺·ℓ with ℓ < 0


def _spg_toy():
  """One row: prompt 3 tokens, completion 8 = two blocks of 4, no EOS (all eligible)."""
  t = 11
  prompt = np.zeros((1, t), bool)
  prompt[:, :3] = True
  completion = ~prompt
  return jnp.asarray(prompt), jnp.asarray(completion)


@pytest.mark.parametrize("mc_index", [0, 1, 2, 3])
@pytest.mark.slow
def test_spg_reference_prompt_masking(mc_index):
  """With p_mask_prompt = 1 every candidate position is prompt-masked, so the two laws differ
  exactly in the documented places: SPG's own ``forward_process`` leaves the chosen block's
  unselected positions clean and scores the earlier completion positions it prompt-masked."""
  prompt, completion = _spg_toy()
  keys = jax.random.split(jax.random.key(5), 1)
  kwargs = dict(completion_positions=completion, block_length=4, prompt_positions=prompt,
                p_mask_prompt=1.0)
  base = masking.spg_block_mask(keys, completion, mc_index, **kwargs)
  ref = masking.spg_block_mask(keys, completion, mc_index, reference_prompt_masking=True, **kwargs)
  plain = masking.spg_block_mask(keys, completion, mc_index, completion_positions=completion,
                                 block_length=4)
  comp = np.asarray(completion[0])
  plain_scored = np.asarray(plain.scored[0])
  first_scored = int(np.argmax(plain_scored))
  chosen = (first_scored - 3) // 4
  block_of = np.full(11, -1)
  block_of[3:] = np.arange(8) // 4
  # Both laws mask the whole prompt.
  assert np.asarray(base.mask[0])[:3].all() and np.asarray(ref.mask[0])[:3].all()
  # Project law: everything is masked, only the block law's positions are scored.
  assert np.asarray(base.mask[0]).all()
  np.testing.assert_array_equal(base.scored[0], plain_scored)
  # Reference law: the chosen block's unselected positions stay clean ...
  unselected = comp & (block_of == chosen) & ~np.asarray(plain.mask[0])
  assert not np.asarray(ref.mask[0])[unselected].any()
  # ... and earlier blocks are masked and scored, counted in t_j and |M_j|.
  earlier = comp & (block_of < chosen)
  want_scored = plain_scored | earlier
  np.testing.assert_array_equal(ref.scored[0], want_scored)
  np.testing.assert_allclose(ref.ratio[0], want_scored.sum() / comp.sum(), rtol=1e-6)
  np.testing.assert_allclose(ref.weight[0], 1.0 / want_scored.sum(), rtol=1e-6)


@pytest.mark.slow
def test_d1_prompt_masking_of_left_padding():
  """Row 0 of the batch has one left-pad position; with p_mask_prompt = 1 the reference law
  (``mask_prompt_padding``) masks it, the default masks only real prompt tokens."""
  from dmpo_jax.rl.objectives.one_step import DiffuGRPOConfig, one_step_token_log_probs
  captured = {}
  real = masking.one_step_mask

  def spy(*args, **kwargs):
    sample = real(*args, **kwargs)
    captured.setdefault("masks", []).append(np.asarray(sample.mask))
    return sample

  keys = jax.random.split(jax.random.key(0), tiny.BATCH["sequences"].shape[0])
  try:
    masking.one_step_mask = spy
    for pad in (False, True):
      cfg = DiffuGRPOConfig(p_mask_prompt=1.0, mask_prompt_padding=pad)
      one_step_token_log_probs(model(tiny.PARAMS_OLD), tiny.BATCH, keys, jnp.int32(0), cfg)
  finally:
    masking.one_step_mask = real
  default, reference = captured["masks"]
  assert not default[0, 0] and reference[0, 0]          # the pad position
  np.testing.assert_array_equal(default[:, 1:], reference[:, 1:])
  assert default[:, 1:4].all()                          # real prompt tokens masked in both


# -- reference scopes, the ESS solver, the reference bugs, padding visibility ---------------------

def test_group_baseline_per_micro_batch_small_repro():
  """One group of 4 weights, micro-batches of 2: the group mean gives the project's advantages,
  the micro-batch mean the reference's (the numbers of the fidelity check)."""
  from dmpo_jax.rl import reference_rules
  w = jnp.asarray([0.4126, 0.1518, 0.2502, 0.1854])
  groups = jnp.zeros((4,), jnp.int32)
  a_group = w - adv.dmpo_baseline("group", groups, weights=w)
  a_micro = w - adv.dmpo_baseline("group", reference_rules.micro_batch_ids(4, 2), weights=w)
  np.testing.assert_allclose(a_group, [0.1626, -0.0982, 0.0002, -0.0646], atol=1e-7)
  np.testing.assert_allclose(a_micro, [0.1304, -0.1304, 0.0324, -0.0324], atol=1e-7)
  with pytest.raises(ValueError, match="divide"):
    reference_rules.micro_batch_ids(4, 3)


@pytest.mark.slow
def test_reference_ess_solver_stops_at_its_start_when_saturated():
  """A unique best reward 2 nats·α⁻¹ = 50 ahead: at c = 0.5 the weights are one-hot to double
  precision, the finite-difference gradient is 0 and L-BFGS-B returns its start point; the
  bisection finds the c whose ESS is the target. Unsaturated, both reach the target."""
  from dmpo_jax.rl import reference_rules
  lr = np.asarray(np.random.default_rng(0).normal(0, 0.5, 16), np.float32)
  saturated = np.asarray([2.0] + [0.0] * 15, np.float32)
  ids = jnp.zeros((16,), jnp.int32)
  assert reference_rules.find_coeff(lr, saturated, 0.04, 0.5) == 0.5
  coeff = reference_rules.reference_ess_coeff(jnp.asarray(lr), jnp.asarray(saturated), ids,
                                              alpha=0.04, target_ess=0.5)
  np.testing.assert_array_equal(coeff, np.full(16, 0.5, np.float32))
  raw, _ = adv.dmpo_logits(jnp.asarray(saturated), jnp.asarray(lr), alpha=0.04)
  bisect = float(adv.ess_targeted_coeff(raw, ids, target_ess=0.5)[0])
  ess = float(adv.normalized_ess(adv.group_softmax(bisect * raw, ids), ids)[0])
  assert bisect < 0.1 and abs(ess - 0.5) < 1e-3
  spread = np.asarray([0.0, 0.5, 1.0, 2.0] * 4, np.float32)
  lbfgs = reference_rules.find_coeff(lr, spread, 0.04, 0.5)
  raw, _ = adv.dmpo_logits(jnp.asarray(spread), jnp.asarray(lr), alpha=0.04)
  ess = float(adv.normalized_ess(adv.group_softmax(lbfgs * raw, ids), ids)[0])
  assert abs(ess - 0.5) < 1e-3
  # Under jit, one coefficient per scope: two micro-batches of 8 rows.
  scope = reference_rules.micro_batch_ids(16, 8)
  coeff = jax.jit(lambda a, b, s: reference_rules.reference_ess_coeff(
      a, b, s, alpha=0.04, target_ess=0.7))(jnp.asarray(lr), jnp.asarray(spread), scope)
  for k in range(2):
    rows = slice(8 * k, 8 * k + 8)
    want = np.float32(reference_rules.find_coeff(lr[rows], spread[rows], 0.04, 0.7))
    np.testing.assert_array_equal(np.asarray(coeff)[rows], want)


@pytest.mark.parametrize("micro,num_samples", [(8, 4), (2, 4), (1, 2)])
@pytest.mark.parametrize("tail", [False, True])
def test_loss_mask_non_eos_as_executed_rows(micro, num_samples, tail):
  """`non_eos_mask_keep` against the reference line itself, executed in numpy (whose ``~`` on an
  int array and integer-array indexing behave as torch's): which rows of the replicate-major
  [R·c, L] mask matrix end up empty."""
  from dmpo_jax.rl import reference_rules
  length = 6
  cmask = np.ones((micro, length), np.int64)
  if tail:
    cmask[micro // 2, 3:] = 0                    # one completion ends before the last position
  masked_index = np.ones((num_samples * micro, length), bool)
  masked_index[~np.tile(cmask, (num_samples, 1))] = False
  want = masked_index.any(-1).reshape(num_samples, micro)
  rows = jnp.arange(micro, dtype=jnp.int32)
  has_tail = jnp.full((micro,), tail)
  got = np.stack([np.asarray(reference_rules.non_eos_mask_keep(rows, has_tail, j, num_samples, micro))
                  for j in range(num_samples)])
  np.testing.assert_array_equal(got.astype(bool), want)
  assert (~want).sum() == (2 if tail else 1)   # never the positions after an EOS


def test_reference_option_validation():
  from dmpo_jax.rl.objectives.dmpo import DMPOConfig
  bad = [({"baseline_scope": "micro_batch", "baseline": "group"}, "reference_micro_batch_size"),
         ({"baseline_scope": "micro_batch", "baseline": "individual",
           "reference_micro_batch_size": 8}, "group and model"),
         ({"target_ess_solver": "reference"}, "needs target_ess"),
         ({"target_ess": 0.5, "target_ess_scope": "micro_batch"}, "target_ess_scope"),
         ({"weight_eos_law": "as_executed"}, "include_eos_padding=False"),
         ({"loss_eos_law": "as_executed", "reference_micro_batch_size": 8}, "loss_include_eos"),
         ({"baseline_scope": "device"}, "baseline_scope")]
  for values, message in bad:
    with pytest.raises(ValueError, match=message):
      DMPOConfig(**values)


@pytest.mark.slow
def test_padding_visibility_matches_the_references_unpadded_forward():
  """The references pass no attention mask, but each device batch holds one prompt, so their rows
  carry no padding. Row 0 of the test batch (one left pad) with the key-padding mask gives the
  unpadded row's log-probs (LLaDA's RoPE scores depend on position differences only); attending
  to the pad (``use_key_padding_mask=False``) does not."""
  from tests.helpers.objective_setup import CONFIG
  seq = tiny.BATCH["sequences"]
  comp = np.asarray(tiny.BATCH["completion_mask"][0, 1:])
  for mask_on, close in ((True, True), (False, False)):
    m = model(tiny.PARAMS_OLD)
    m.config = CONFIG.replace(use_key_padding_mask=mask_on)
    alone = np.asarray(m.token_log_probs(seq[:1, 1:], seq[:1, 1:], None))[0]
    padded = np.asarray(m.token_log_probs(seq, seq, tiny.BATCH["attention_mask"]))[0, 1:]
    diff = np.abs(alone - padded)[comp].max()
    assert (diff < 1e-5) if close else (diff > 1e-3), (mask_on, diff)
