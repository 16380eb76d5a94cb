"""Precision policy (`dmpo_jax.rl.train_state`): bf16 parameters with fp32 (or configured) AdamW
moments and optional fp32 master weights; every state dtype is invariant under updates, skipped
non-finite ones included. Exercised on the optimizer alone, the AOT-compiled RL train step
(full fine-tuning and LoRA), SFT warm-up, and the RL loop with a bit-identical resume."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmpo_jax.models import lora
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import loop, registry, rollout, sft, train_state as ts, train_step
from tests.helpers.small_runs import final_params, metrics_without_times, small_config

BF16 = {"dtype": "bfloat16", "param_dtype": "bfloat16"}


def dtypes(tree):
  return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


def moment_dtypes(state):
  """Dtypes of AdamW's mu and nu leaves (found by type in the optax state)."""
  found = set()
  for node in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")):
    if hasattr(node, "mu"):
      found |= {x.dtype for x in jax.tree.leaves((node.mu, node.nu))}
  assert found, "no AdamW state found"
  return found


def assert_same_tree(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------------------------------
# The optimizer alone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_moments_follow_state_dtype_and_dtypes_never_change(state_dtype):
  params = {"w": jnp.asarray([1.0, -2.0, 0.5], jnp.bfloat16), "b": jnp.zeros((2,), jnp.float32)}
  optimizer = ts.make_optimizer(1e-2, weight_decay=0.1, state_dtype=state_dtype)
  state = ts.init_train_state(params, optimizer, 0)
  assert moment_dtypes(state) == {jnp.dtype(state_dtype)}
  before = dtypes(state)
  update = jax.jit(functools.partial(ts.apply_gradients, optimizer=optimizer))
  grads = {"w": jnp.asarray([0.3, -1.0, 2.0], jnp.float32), "b": jnp.ones((2,), jnp.float32)}
  for loss in (1.0, 2.0, float("nan"), 3.0):
    previous = state
    state, metrics = update(state, grads, loss=jnp.float32(loss))
    assert dtypes(state) == before
    if np.isnan(loss):
      assert float(metrics["train/skipped_nonfinite"]) == 1.0
      assert_same_tree(state.replace(step=previous.step), previous)
  # bf16 gradients (a bf16 backward) are cast too, not promoted or demoted.
  state, _ = update(state, jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads), loss=jnp.float32(1.0))
  assert dtypes(state) == before and int(state.step) == 5


def test_fp32_moments_match_a_numpy_adamw_on_bf16_parameters():
  """Three AdamW steps (no clipping, no decay) on bf16 storage: the moments are the exact fp32
  recursions, and each stored parameter is the bf16 rounding of (bf16 param + fp32 update)."""
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
  w0 = np.asarray([1.0, -0.5, 0.25], np.float32)
  params = {"w": jnp.asarray(w0, jnp.bfloat16)}
  optimizer = ts.make_optimizer(lr, b1=b1, b2=b2, eps=eps, max_grad_norm=0.0)
  state = ts.init_train_state(params, optimizer, 0)
  grads = [np.asarray(g, np.float32) for g in ([0.1, -0.2, 0.3], [0.4, 0.1, -0.3], [-0.2, 0.2, 0.2])]
  m = np.zeros(3, np.float64)
  v = np.zeros(3, np.float64)
  w = np.asarray(params["w"], np.float32)
  for t, g in enumerate(grads, start=1):
    state, _ = ts.apply_gradients(state, {"w": jnp.asarray(g)}, optimizer, jnp.float32(0.0))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
    step = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    w = np.asarray(jnp.asarray(w - step.astype(np.float32), jnp.float32).astype(jnp.bfloat16),
                   np.float32)
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    np.testing.assert_allclose(np.asarray(adam.mu["w"]), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adam.nu["w"]), v, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.params["w"], np.float32), w)
  assert state.params["w"].dtype == jnp.bfloat16


def test_master_weights_keep_updates_that_bf16_storage_loses():
  """lr = 1e-3 on a bf16 weight of 1.0 (spacing 2^-8 below 1): each AdamW step (≈ lr, the sign of a
  constant gradient) rounds away in bf16 storage; fp32 master weights accumulate 3 of them,
  1 − 0.003 = 0.997, whose bf16 rounding is 1 − 2^-8."""
  params = {"w": jnp.ones((2,), jnp.bfloat16)}
  optimizer = ts.make_optimizer(1e-3, max_grad_norm=0.0)
  plain = ts.init_train_state(params, optimizer, 0)
  master = ts.init_train_state(params, optimizer, 0, master_weights=True)
  assert plain.master is None and master.master["w"].dtype == jnp.float32
  grads = {"w": jnp.ones((2,), jnp.float32)}
  for _ in range(3):
    plain, _ = ts.apply_gradients(plain, grads, optimizer, jnp.float32(1.0))
    master, _ = ts.apply_gradients(master, grads, optimizer, jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(plain.params["w"], np.float32), [1.0, 1.0])
  np.testing.assert_allclose(np.asarray(master.master["w"]), [0.997, 0.997], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(master.params["w"], np.float32), [1 - 2 ** -8] * 2)
  before = dtypes(master)
  skipped, metrics = ts.apply_gradients(master, {"w": jnp.full((2,), jnp.inf)}, optimizer,
                                        jnp.float32(1.0))
  assert float(metrics["train/skipped_nonfinite"]) == 1.0 and dtypes(skipped) == before
  assert_same_tree(skipped.replace(step=master.step), master)


def test_a_skipped_update_keeps_every_bit_where_optax_apply_if_finite_does_not():
  """The hand-written skip keeps a bf16 -0.0 (0x8000) and the optimizer state bit-identical and
  counts the step; `optax.apply_if_finite` adds zero updates (-0.0 + 0.0 = +0.0), wraps the
  state (old checkpoints would not restore) and sees only the gradient, not the loss."""
  params = {"w": jnp.asarray([-0.0, 1.0, -2.0], jnp.bfloat16)}
  bad_grads = {"w": jnp.asarray([np.nan, 1.0, 1.0], jnp.float32)}
  optimizer = ts.make_optimizer(1e-2)
  state = ts.init_train_state(params, optimizer, 0)
  skipped, metrics = ts.apply_gradients(state, bad_grads, optimizer, jnp.float32(1.0))
  assert np.asarray(skipped.params["w"]).view(np.uint16).tolist() == [0x8000, 0x3F80, 0xC000]
  assert_same_tree(skipped.opt_state, state.opt_state)
  assert float(metrics["train/skipped_nonfinite"]) == 1.0 and int(skipped.step) == 1
  _, metrics = ts.apply_gradients(state, {"w": jnp.ones(3)}, optimizer, jnp.float32(np.nan))
  assert float(metrics["train/skipped_nonfinite"]) == 1.0  # a non-finite loss skips too

  wrapped = optax.apply_if_finite(optimizer, max_consecutive_errors=3)
  wrapped_state = wrapped.init(params)
  updates, _ = wrapped.update(bad_grads, wrapped_state, params)
  library = optax.apply_updates(params, updates)
  assert np.asarray(library["w"]).view(np.uint16).tolist() == [0x0000, 0x3F80, 0xC000]
  assert type(wrapped_state).__name__ == "ApplyIfFiniteState"
  updates, _ = wrapped.update({"w": jnp.ones(3)}, wrapped_state, params)
  assert bool(jnp.any(updates["w"] != 0))  # it cannot see a NaN loss


def test_bad_state_dtype_is_rejected():
  with pytest.raises(ValueError, match="state_dtype"):
    ts.make_optimizer(1e-3, state_dtype="int8")
  config = small_config(**{"optimizer.state_dtype": "float64", "model.dtype": "bf16"})
  with pytest.raises(loop.ConfigError) as err:
    loop.validate_config(config, num_devices=1)
  assert "optimizer.state_dtype" in str(err.value) and "model.dtype" in str(err.value)


# ------------------------------------------------------------------------------------------------
# The AOT-compiled RL train step and SFT in bf16 (full fine-tuning and LoRA)
# ------------------------------------------------------------------------------------------------

def bf16_model(lora_rank):
  model = create_model(get_preset("tiny", **BF16), seed=0)
  if lora_rank:
    model = lora.add_adapters(model, rank=lora_rank, alpha=8.0, targets=("q_proj", "ff_out"), seed=0)
  return nnx.split(model)


def synthetic_batch(vocab, batch=4, prompt=6, gen=10, seed=0):
  rng = np.random.default_rng(seed)
  seqs = rng.integers(0, min(vocab - 8, 200), (batch, prompt + gen)).astype(np.int32)
  mask = np.ones((batch, prompt), bool)
  groups = np.repeat(np.arange(batch // 2), 2)
  out = rollout.rl_batch(seqs, mask, np.asarray([1.0, 0.0, 0.0, 1.0], np.float32), groups,
                         np.arange(batch))
  return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("lora_rank,master_weights", [(0, False), (4, True)])
@pytest.mark.slow
def test_bf16_train_step_three_updates_and_a_skipped_one_keep_dtypes(lora_rank, master_weights):
  graphdef, params = bf16_model(lora_rank)
  objective = registry.get_objective("bgpo")
  ocfg = objective.make_config({"num_mc": 2})
  optimizer = ts.make_optimizer(1e-3)
  state = ts.init_train_state(params, optimizer, 0, master_weights=master_weights)
  assert moment_dtypes(state) == {jnp.dtype(jnp.float32)}
  batch = synthetic_batch(get_preset("tiny").vocab_size)
  prepared = jax.jit(functools.partial(train_step.prepare_rollout, graphdef, objective, ocfg))(
      state.params, None if lora_rank else state.params, batch, state.key, jnp.int32(0))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  compiled, _ = train_step.compile_ahead_of_time(
      train_step.jit_rl_update(graphdef, objective, ocfg, optimizer, shardings),
      train_step.abstract(state), batch, prepared.per_example, train_step.SCALAR_INT32,
      train_step.SCALAR_INT32)
  before = dtypes(state)
  frozen_before = lora.split_trainable(state.params)[1]
  frozen_before = None if frozen_before is None else jax.tree.map(np.asarray, frozen_before)
  nan_advantages = {**prepared.per_example,
                    "advantages": jnp.full_like(prepared.per_example["advantages"], jnp.nan)}
  first = jax.tree.map(np.asarray, lora.split_trainable(state.params)[0])
  for i, per_example in enumerate([prepared.per_example] * 2 + [nan_advantages, prepared.per_example]):
    kept = jax.tree.map(np.asarray, state)
    state, metrics = compiled(state, batch, per_example, jnp.int32(0), jnp.int32(i))
    assert dtypes(state) == before, f"update {i} changed a state dtype"
    if i == 2:
      assert float(metrics["train/skipped_nonfinite"]) == 1.0
      assert_same_tree(state.replace(step=kept.step), kept)
    else:
      assert float(metrics["train/skipped_nonfinite"]) == 0.0
      assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/grad_norm"]) > 0
  assert int(state.step) == 4
  changed = jax.tree.map(lambda new, old: bool(np.any(np.asarray(new) != old)),
                         lora.split_trainable(state.params)[0], first)
  assert sum(jax.tree.leaves(changed)) > 0  # real updates reached the stored parameters
  if frozen_before is not None:  # LoRA: the bf16 base is untouched
    assert_same_tree(lora.split_trainable(state.params)[1], frozen_before)
  if master_weights:  # the stored parameters are the rounding of the master copy
    assert_same_tree(lora.split_trainable(state.params)[0],
                     jax.tree.map(lambda m, p: np.asarray(m.astype(p.dtype)), state.master,
                                  lora.split_trainable(state.params)[0]))


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.slow
def test_bf16_sft_warmup_updates_keep_dtypes(lora_rank):
  graphdef, params = bf16_model(lora_rank)
  optimizer = ts.make_optimizer(1e-3)
  state = ts.init_train_state(params, optimizer, 1)
  assert moment_dtypes(state) == {jnp.dtype(jnp.float32)}
  batch = synthetic_batch(get_preset("tiny").vocab_size)
  batch = {k: batch[k] for k in ("sequences", "attention_mask", "completion_mask")}
  step = jax.jit(functools.partial(sft.sft_step, graphdef, optimizer))
  before = dtypes(state)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    assert dtypes(state) == before
    losses.append(float(metrics["sft/loss"]))
    assert float(metrics["sft/skipped_nonfinite"]) == 0.0
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  # A forced non-finite gradient: skipped, every leaf (and dtype) kept.
  trainable = lora.split_trainable(state.params)[0]
  bad = jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, jnp.float32), trainable)
  skipped, metrics = jax.jit(functools.partial(ts.apply_gradients, optimizer=optimizer))(
      state, bad, loss=jnp.float32(1.0))
  assert float(metrics["train/skipped_nonfinite"]) == 1.0 and dtypes(skipped) == before
  assert_same_tree(skipped.replace(step=state.step), state)


# ------------------------------------------------------------------------------------------------
# The RL loop in bf16: updates with a forced skip, checkpoint resume (the loop's SFT warm-up runs
# `sft.sft_step`, tested above; it is left out here to keep the test's compile time down)
# ------------------------------------------------------------------------------------------------

LOOP = {**{f"model.{k}": v for k, v in BF16.items()}, "num_steps": 3, "updates_per_rollout": 2,
        "eval.every_steps": 0, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 3}


@pytest.mark.parametrize("overrides", [
    {"optimizer.master_weights": True},
    {"model.lora_rank": 4, "model.lora_targets": ("q_proj", "ff_out"),
     "optimizer.state_dtype": "bfloat16"},
], ids=["full_master_weights", "lora_bf16_moments"])
@pytest.mark.slow
def test_bf16_loop_keeps_dtypes_and_resumes_bit_identically(tmp_path, monkeypatch, overrides):
  """3 RL steps x 2 updates in bf16 (update (1, 0) gets NaN per-example inputs: a forced skip),
  then a resume from the step-2 checkpoint of a copy of the run: every update keeps every state
  dtype, and the resumed step 3 is bit-identical to the uninterrupted one."""
  records = []
  compiled_once = {}
  original = loop.Trainer.compile_steps

  def recording(self, ref_params):
    # The resumed run reuses the straight run's ahead-of-time executable (same config, shapes and
    # shardings): it accepts the restored state only if every dtype and sharding still matches.
    if not compiled_once:
      original(self, ref_params)
      compiled_once.update(step=self._train_step, prepare=self._prepare)
    self._train_step, self._prepare = compiled_once["step"], compiled_once["prepare"]
    compiled = self._train_step
    reference = dtypes(self.state)
    records.append(("init", reference, moment_dtypes(self.state)))

    def step(state, batch, per_example, rollout_step, iteration):
      if (int(rollout_step), int(iteration)) == (1, 0):
        per_example = jax.tree.map(
            lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            per_example)
      state, metrics = compiled(state, batch, per_example, rollout_step, iteration)
      records.append(((int(rollout_step), int(iteration)), dtypes(state) == reference,
                      float(metrics["train/skipped_nonfinite"]), float(metrics["train/loss"])))
      return state, metrics

    self._train_step = step
    return {}

  monkeypatch.setattr(loop.Trainer, "compile_steps", recording)
  config = small_config(**LOOP, **overrides)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  loop.train(config, str(straight))
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "3")
  loop.train(config, str(resumed))

  inits = [r for r in records if r[0] == "init"]
  updates = [r for r in records if r[0] != "init"]
  assert len(inits) == 2 and [r[0] for r in updates] == [(s, i) for s in range(3) for i in (0, 1)] + [(2, 0), (2, 1)]
  expected_moments = {jnp.dtype(overrides.get("optimizer.state_dtype", "float32"))}
  assert all(r[2] == expected_moments for r in inits)
  assert jnp.dtype(jnp.bfloat16) in set(jax.tree.leaves(inits[0][1].params))  # a bf16 model
  assert (inits[0][1].master is not None) == overrides.get("optimizer.master_weights", False)
  for where, unchanged, skipped, loss in updates:
    assert unchanged, f"update {where} changed a state dtype"
    assert skipped == (1.0 if where == (1, 0) else 0.0), where
    if where != (1, 0):
      assert np.isfinite(loss), where
  a, b = final_params(straight), final_params(resumed)
  assert int(a["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert metrics_without_times(straight) == metrics_without_times(resumed)
