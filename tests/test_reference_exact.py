"""Every published config against the reference code's rule on identical tensors
(`docs/algorithms.md` §6).

For each `configs/*.py` (and the reference options the published configs do not switch on), the
registry's prepare + grads run on the mock `reference_impl.TableModel` (per-token log-probs are its
parameters) and a prompt-major batch with the config's group size, and must give the loss and the
gradient of `tests/helpers/reference_impl.py`'s independent numpy re-implementation of the reference
trainer: |Δloss| <= 1e-6 · Σ|terms| (the same reduction of the terms' absolute values: group
baselines make the loss a difference of nearly equal sums) and |Δgrad| <= 1e-6 · max|grad|
elementwise (float64 numpy against the project's fp32). Micro-batch layouts cover c < G (a micro-
batch is part of a group, the published DMPO layout) and c > G (a micro-batch holds several groups)."""

import functools
import importlib

import jax
import numpy as np
import pytest
from flax import nnx

from dmpo_jax.diffusion import masking
from dmpo_jax.rl import registry, scoring
from dmpo_jax.rl.objectives import dmpo, sequence_ratio, spg

from tests.helpers import reference_impl as ref

PROMPT = 4
@functools.cache
def step_keys():
  """The step's keys (computed on first use: nothing compiles at import)."""
  return scoring.make_keys(jax.random.key(3), rollout_step=5, update_step=11, iteration=2)
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
RTOL = 1e-6


def published(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  return config.objective, dict(config[config.objective]), config.group_size


def _jit(name, which, cfg, *args):
  fn = jax.jit(getattr(registry.get_objective(name), which), static_argnums=(0, 5))
  return fn.lower(*args).compile(FAST)(*[a for i, a in enumerate(args) if i not in (0, 5)])


def tables(batch, seed=0, spread=0.05):
  """(old, ref, new) per-token log-prob tables [B, T]: old in [-0.3, -0.01], the others moved by
  N(0, spread²) per token."""
  rng = np.random.default_rng(seed)
  shape = batch["sequences"].shape
  old = rng.uniform(-0.3, -0.01, shape)
  ref_t = np.clip(old + rng.normal(0, 0.05, shape), -0.6, -0.005)
  new = np.clip(old + rng.normal(0, spread, shape), -3.0, -0.005)
  return old, ref_t, new


def run_project(name, overrides, batch, old, ref_t, new):
  obj = registry.get_objective(name)
  cfg = obj.make_config(overrides)
  graphdef, p_old = nnx.split(ref.TableModel(old))
  p_ref = nnx.split(ref.TableModel(ref_t))[1]
  p_new = nnx.split(ref.TableModel(new))[1]
  jb = jax.tree.map(jax.numpy.asarray, batch)
  aux = _jit(name, "prepare", cfg, graphdef, p_old, p_ref, jb, step_keys(), cfg)
  grads, out = _jit(name, "grads", cfg, graphdef, p_new, jb, aux, step_keys(), cfg)
  grad = np.asarray(jax.tree.leaves(grads)[0], np.float64)[:, PROMPT:]
  return float(out.loss), grad, aux, cfg


def canvas(x):
  return np.asarray(x, np.float64)[:, PROMPT:]


def assert_matches(got, want):
  """|Δloss| <= 1e-6 · Σ|terms| (the loss before cancellation), |Δg| <= 1e-6 · max|g|."""
  loss, grad = got
  want_loss, want_grad, scale = want
  assert abs(loss - want_loss) <= RTOL * scale, (loss, want_loss, scale)
  gmax = np.abs(want_grad).max()
  assert gmax > 0
  np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=RTOL * gmax)


def eligible(batch, include_eos_padding):
  jb = jax.tree.map(jax.numpy.asarray, batch)
  return scoring.eligible_positions(jb, ref.EOS, include_eos_padding)


def elbo_masks(batch, cfg, purpose, num, include_eos_padding, fresh=False, scheme=None):
  """The masks [n, B, L] the objective drew (same keys, purpose and law)."""
  keys = scoring.example_keys(step_keys(), jax.numpy.asarray(batch["example_ids"]), purpose,
                              fresh=fresh)
  fn = scoring.elbo_mask_fn(scheme or cfg.mask_scheme, num_samples=num,
                            lambda_range=getattr(cfg, "lambda_range", (0.1, 1.0)))
  elig = eligible(batch, include_eos_padding)
  return np.stack([canvas(fn(keys, elig, j).scored) for j in range(num)]).astype(bool)


# -- DMPO ------------------------------------------------------------------------------------------

def dmpo_case(overrides, group, prompts=2, gen=16, seed=0):
  batch = ref.make_batch(prompts, group, PROMPT, gen, seed)
  old, ref_t, new = tables(batch, seed)
  loss, grad, _, cfg = run_project("dmpo", overrides, batch, old, ref_t, new)
  weight_eos = cfg.include_eos_padding or cfg.weight_eos_law == "as_executed"
  loss_eos = cfg.loss_eos_padding or cfg.loss_eos_law == "as_executed"
  w_masks = elbo_masks(batch, cfg, dmpo._WEIGHT_PURPOSE, cfg.weight_num_mc, weight_eos)
  l_masks = elbo_masks(batch, cfg, dmpo._LOSS_PURPOSE, cfg.loss_num_mc, loss_eos, fresh=True)
  want = ref.dmpo_reference(
      theta_v=canvas(old), theta_ref=canvas(ref_t), theta_new=canvas(new), weight_masks=w_masks,
      loss_masks=l_masks, rewards=batch["rewards"], group=group,
      micro=cfg.reference_micro_batch_size, cmask=ref.completion_mask_upto_eos(batch),
      alpha=cfg.alpha, coeff=cfg.coeff, baseline=cfg.baseline, strength=cfg.baseline_strength,
      ada_threshold=cfg.target_ess, log_rnd_omit_eos=not cfg.include_eos_padding,
      loss_mask_non_eos=cfg.loss_eos_law == "as_executed")
  return (loss, grad), want


@pytest.mark.parametrize("name", ["dmpo_gsm8k", "dmpo_math", "dmpo_sudoku", "dmpo_countdown"])
@pytest.mark.slow
def test_dmpo_published_configs(name):
  objective, block, group = published(name)
  assert objective == "dmpo"
  got, want = dmpo_case(block, group)
  assert_matches(got, want)


@pytest.mark.parametrize("group,micro", [(16, 4), (4, 8)])
@pytest.mark.parametrize("baseline", ["group", "model"])
@pytest.mark.slow
def test_dmpo_micro_batch_scope_layouts(baseline, group, micro):
  """Micro-batches that split groups (c < G) and that span groups (c > G); the model baseline on
  the loss masks, as the reference computes it."""
  overrides = {"baseline": baseline, "baseline_scope": "micro_batch",
               "reference_micro_batch_size": micro, "model_baseline_masks": "loss"}
  got, want = dmpo_case(overrides, group, prompts=4 if group == 4 else 2, seed=1)
  assert_matches(got, want)


def test_dmpo_alpha_minus_one_group_baseline_per_micro_batch():
  overrides = {"alpha": -1.0, "baseline": "group", "baseline_scope": "micro_batch",
               "reference_micro_batch_size": 8}
  got, want = dmpo_case(overrides, 16, seed=2)
  assert_matches(got, want)


def test_dmpo_reference_ess_solver_per_device_row():
  overrides = {"target_ess": 0.5, "target_ess_solver": "reference", "target_ess_scope": "micro_batch",
               "baseline": "group", "baseline_scope": "micro_batch",
               "reference_micro_batch_size": 8}
  got, want = dmpo_case(overrides, 16, seed=3)
  assert_matches(got, want)


def test_dmpo_eos_switches_as_executed():
  """``log_rnd_omit_eos=True`` and ``loss_mask_non_eos=True`` as the reference executes them."""
  overrides = {"include_eos_padding": False, "weight_eos_law": "as_executed",
               "loss_eos_law": "as_executed", "baseline": "individual",
               "reference_micro_batch_size": 8}
  got, want = dmpo_case(overrides, 16, seed=4)
  assert_matches(got, want)


def test_dmpo_eos_switches_intended():
  """The intent of ``loss_mask_non_eos``: masks only up to the first EOS (numpy applies the
  boolean mask the line meant to)."""
  overrides = {"include_eos_padding": True, "loss_include_eos_padding": False,
               "baseline": "group", "baseline_scope": "micro_batch",
               "reference_micro_batch_size": 8}
  batch = ref.make_batch(2, 16, PROMPT, 16, 5)
  old, ref_t, new = tables(batch, 5)
  loss, grad, _, cfg = run_project("dmpo", overrides, batch, old, ref_t, new)
  cmask = ref.completion_mask_upto_eos(batch)
  l_masks_intended = elbo_masks(batch, cfg, dmpo._LOSS_PURPOSE, 4, False, fresh=True)
  assert not (l_masks_intended & ~cmask.astype(bool)[None]).any()
  want = ref.dmpo_reference(
      theta_v=canvas(old), theta_ref=canvas(ref_t), theta_new=canvas(new),
      weight_masks=elbo_masks(batch, cfg, dmpo._WEIGHT_PURPOSE, 4, True),
      loss_masks=l_masks_intended & cmask.astype(bool)[None], rewards=batch["rewards"], group=16,
      micro=8, cmask=cmask, baseline="group")
  assert_matches((loss, grad), want)


# -- BGPO / VRPO-OL --------------------------------------------------------------------------------

def sequence_ratio_case(name, overrides, group, off_policy, gen=16, seed=0, clip=None,
                        reference=ref.dare_bgpo_reference, spread=0.05):
  batch = ref.make_batch(2, group, PROMPT, gen, seed)
  old, _, new = tables(batch, seed, spread)
  if not off_policy:
    old = new
  loss, grad, _, cfg = run_project(name, overrides, batch, old, old, new)
  masks = elbo_masks(batch, cfg, sequence_ratio._MASK_PURPOSE, cfg.num_mc, True)
  kwargs = {"clip": clip} if reference is ref.dare_bgpo_reference else {}
  want = reference(theta_new=canvas(new), theta_old=canvas(old), masks=masks,
                   rewards=batch["rewards"], group=group, **kwargs)
  if clip is not None and off_policy:  # the clips must bind somewhere for the test to mean anything
    k = masks.sum(-1)
    d = ((canvas(new) - canvas(old))[None] * masks).sum(-1) / k
    assert (np.abs(d) > clip).any()
  return (loss, grad), want


@pytest.mark.parametrize("name", ["bgpo_math", "bgpo_code", "bgpo_countdown", "bgpo_sudoku"])
def test_bgpo_published_configs_against_dare(name):
  """On-policy (the published setting): DARE's clipped objective and the paper's unclipped one
  have the same gradient, which the config reproduces with d/L."""
  objective, block, group = published(name)
  assert objective == "bgpo" and block["mode"] == "on_policy"
  got, want = sequence_ratio_case("bgpo", block, group, off_policy=False, clip=0.2)
  assert_matches(got, want)


def test_bgpo_off_policy_with_dare_clips():
  """The off-policy variant with DARE's clip (0.2) and dual clip (3) switched on by flag."""
  _, block, group = published("bgpo_math")
  block.update(mode="off_policy", clip_eps=0.2, dual_clip=3.0)
  got, want = sequence_ratio_case("bgpo", block, group, off_policy=True, clip=0.2, seed=1,
                                  spread=0.4)
  assert_matches(got, want)


@pytest.mark.slow
def test_vrpo_ol_published_config():
  objective, block, group = published("vrpo_ol_math")
  got, want = sequence_ratio_case(objective, block, group, off_policy=False,
                                  reference=ref.vrpo_ol_reference)
  assert_matches(got, want)
  block["mode"] = "off_policy"
  got, want = sequence_ratio_case(objective, block, group, off_policy=True, seed=2,
                                  reference=ref.vrpo_ol_reference)
  assert_matches(got, want)


# -- d1 / wd1 / SPG --------------------------------------------------------------------------------

def test_diffu_grpo_published_config():
  objective, block, group = published("diffu_grpo_gsm8k")
  batch = ref.make_batch(2, group, PROMPT, 16, 0)
  old, ref_t, new = tables(batch, 0)
  loss, grad, _, cfg = run_project(objective, block, batch, old, ref_t, new)
  want = ref.d1_reference(theta_new=canvas(new), theta_old=canvas(old), theta_ref=canvas(ref_t),
                          cmask=ref.completion_mask_upto_eos(batch), rewards=batch["rewards"],
                          group=group, micro=cfg.reference_micro_batch_size,
                          clip_eps=cfg.clip_eps, beta=cfg.beta)
  assert_matches((loss, grad), want)


def test_wd1_published_config():
  objective, block, group = published("wd1_gsm8k")
  batch = ref.make_batch(2, group, PROMPT, 16, 1)
  old, ref_t, new = tables(batch, 1)
  loss, grad, _, cfg = run_project(objective, block, batch, old, ref_t, new)
  want = ref.wd1_reference(theta_new=canvas(new), cmask=ref.completion_mask_upto_eos(batch),
                           rewards=batch["rewards"], group=group, micro=group,
                           pos_only=cfg.pos_only)
  assert_matches((loss, grad), want)


@pytest.mark.slow
def test_spg_published_config():
  objective, block, group = published("spg_gsm8k")
  batch = ref.make_batch(2, group, PROMPT, 64, 2)
  old, ref_t, new = tables(batch, 2)
  loss, grad, _, cfg = run_project(objective, block, batch, old, ref_t, new)
  jb = jax.tree.map(jax.numpy.asarray, batch)
  keys = scoring.example_keys(step_keys(), jb["example_ids"], spg._MASK_PURPOSE, per_iteration=True)
  elig = eligible(batch, cfg.include_eos_padding)
  scored = np.stack([canvas(masking.spg_block_mask(
      keys, elig, j, completion_positions=jb["completion_mask"], block_length=cfg.block_length,
      min_t=cfg.min_t, max_t=cfg.max_t, prompt_positions=scoring.real_prompt_positions(jb),
      p_mask_prompt=cfg.p_mask_prompt, reference_prompt_masking=cfg.reference_prompt_masking
  ).scored) for j in range(cfg.num_mc)]).astype(bool)
  want = ref.spg_reference(theta_new=canvas(new), scored=scored,
                           cmask=ref.completion_mask_upto_eos(batch), rewards=batch["rewards"],
                           group=group, micro=cfg.reference_micro_batch_size, beta=cfg.eubo_beta)
  assert_matches((loss, grad), want)
