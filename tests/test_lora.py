"""LoRA adapters (`dmpo_jax.models.lora`) on the tiny preset.

Independent computations: the adapted forward is compared with the *base* forward whose kernels
were replaced in NumPy (float64) by W + A B · alpha / r (reshaped matrix products, not the
module's einsums); the trainable count with a hand count; gradients with the full-parameter
gradient restricted to the adapters. Two compiled forwards (base / LoRA graph) are reused.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmpo_jax import checkpointing, sharding
from dmpo_jax.models import lora
from dmpo_jax.models.config import ModelConfig, get_preset
from dmpo_jax.models.transformer import create_model

RANK, ALPHA = 4, 8.0
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
IDS = np.array([[259, 72, 105, 256, 256, 33, 257, 10],
                [257, 257, 259, 65, 256, 66, 256, 258]], np.int32)
MASK = np.array([[1] * 8, [0, 0] + [1] * 6], bool)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, ids, mask):
  return nnx.merge(graphdef, params)(ids, mask)


def logits_of(graphdef, params):
  return np.asarray(_logits(graphdef, params, IDS, MASK))


def _neg_log_lik(graphdef, params, ids, mask):
  log_probs = jax.nn.log_softmax(nnx.merge(graphdef, params)(ids, mask), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, ids[..., None], axis=-1))


@pytest.fixture(scope="module")
def base():
  model = create_model(get_preset("tiny"), seed=0)
  graphdef, params = nnx.split(model)
  return model, graphdef, params, logits_of(graphdef, params)


def _randomize_b(params, seed=1, std=0.05):
  """A copy of the state with every B factor ~ N(0, std²) (A keeps its initialisation)."""
  rng = np.random.default_rng(seed)

  def fill(path, variable):
    if isinstance(variable, lora.LoRAParam) and str(path[-1].key) == "b":
      shape = variable.get_value().shape
      return variable.replace(jnp.asarray(rng.normal(0.0, std, shape), jnp.float32))
    return variable
  return jax.tree_util.tree_map_with_path(fill, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.fixture(scope="module")
def adapted(base):
  model = lora.add_adapters(base[0], rank=RANK, alpha=ALPHA, targets=ALL_TARGETS, seed=3)
  graphdef, params = nnx.split(model)
  random_params = _randomize_b(params)
  return model, graphdef, params, random_params, logits_of(graphdef, random_params)


def _flat(state):
  return {tuple(str(k) for k in path): v.get_value() for path, v in state.flat_state()}


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def test_config_canonicalizes_hf_aliases_and_survives_json():
  config = get_preset("tiny", lora_rank=8, lora_alpha=16.0,
                      lora_targets=["down_proj", "q_proj", "o_proj", "gate_proj"])
  assert config.lora_targets == ("q_proj", "attn_out", "ff_proj", "ff_out")
  assert config.lora_scale == 2.0
  assert set(config.lora_shapes()) == {"q_proj", "o_proj", "gate_proj", "down_proj"}
  again = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
  assert again == config and hash(again) == hash(config)


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_rank=4), "needs lora_targets"),
    (dict(lora_targets=("q_proj",)), "lora_rank is 0"),
    (dict(lora_rank=4, lora_targets=("wq",)), "unknown module 'wq'"),
    (dict(lora_rank=4, lora_targets=("o_proj", "attn_out")), "twice"),
    (dict(lora_rank=4, lora_targets="q_proj"), "string"),
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_rank=4, lora_alpha=0.0, lora_targets=("q_proj",)), "lora_alpha must be positive"),
])
def test_config_rejects_bad_lora_settings(overrides, message):
  with pytest.raises(ValueError, match=message):
    get_preset("tiny", **overrides)


def test_trainable_count_matches_hand_formula(adapted):
  # tiny: D=64, H=4, Hkv=2, hd=16, F=128, 2 layers. Per layer and unit rank, fan_in + fan_out:
  # q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 1024.
  expected = 2 * RANK * 1024
  _, _, params, _, _ = adapted
  trainable, frozen = lora.split_trainable(params)
  assert lora.count_params(trainable) == expected == adapted[0].config.num_lora_params()
  assert lora.count_params(frozen) == get_preset("tiny").num_params()
  one = get_preset("tiny", lora_rank=16, lora_targets=("q_proj", "ff_out"))
  assert one.num_lora_params() == 2 * 16 * ((64 + 64) + (128 + 64))


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def test_fresh_adapters_leave_the_model_unchanged(base, adapted):
  _, _, _, base_logits = base
  model, graphdef, params, _, _ = adapted
  flat = _flat(params)
  for kernel in ("q_proj", "o_proj", "down_proj"):
    a, b = flat[("blocks", "lora", kernel, "a")], flat[("blocks", "lora", kernel, "b")]
    assert not np.any(np.asarray(b))
    fan_in = np.prod(a.shape[1:-1])
    assert 0 < np.abs(np.asarray(a)).max() <= 1 / np.sqrt(fan_in)  # PEFT kaiming-uniform bound
  np.testing.assert_array_equal(logits_of(graphdef, params), base_logits)
  # The same seed gives the same base weights with or without adapters.
  direct = _flat(nnx.split(create_model(model.config, seed=0))[1])
  for key, value in _flat(base[2]).items():
    np.testing.assert_array_equal(np.asarray(direct[key]), np.asarray(value))


def _numpy_merged_kernels(params, scale):
  """{kernel: W + A B · scale} in float64 via [L, fan_in, r] @ [L, r, fan_out] matrix products."""
  flat = _flat(params)
  out = {}
  for kernel in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
    w = np.asarray(flat[("blocks", kernel)], np.float64)
    a = np.asarray(flat[("blocks", "lora", kernel, "a")], np.float64)
    b = np.asarray(flat[("blocks", "lora", kernel, "b")], np.float64)
    layers, rank = a.shape[0], a.shape[-1]
    delta = a.reshape(layers, -1, rank) @ b.reshape(layers, rank, -1)
    out[kernel] = w + scale * delta.reshape(w.shape)
  return out


def test_random_adapters_equal_base_with_numpy_updated_kernels(base, adapted):
  _, base_graphdef, base_params, base_logits = base
  _, _, _, random_params, lora_logits = adapted
  updated = _numpy_merged_kernels(random_params, ALPHA / RANK)
  manual = jax.tree.map(lambda x: x, base_params)
  for kernel, value in updated.items():
    manual["blocks"][kernel] = manual["blocks"][kernel].replace(jnp.asarray(value, jnp.float32))
  expected = logits_of(base_graphdef, manual)
  assert np.abs(lora_logits - base_logits).max() > 1e-2  # the adapters do change the model
  np.testing.assert_allclose(lora_logits, expected, atol=2e-5, rtol=1e-5)


def test_disabled_adapters_equal_base_and_share_its_arrays(base, adapted):
  _, _, base_params, base_logits = base
  _, graphdef, _, random_params, _ = adapted
  off = lora.disabled(random_params)
  np.testing.assert_array_equal(logits_of(graphdef, off), base_logits)
  flat_off, flat_on = _flat(off), _flat(random_params)
  assert flat_off[("blocks", "q_proj")] is flat_on[("blocks", "q_proj")]  # no copy of the base
  assert flat_off[("blocks", "lora", "q_proj", "a")] is flat_on[("blocks", "lora", "q_proj", "a")]
  assert np.any(np.asarray(flat_on[("blocks", "lora", "q_proj", "b")]))  # input untouched
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora.disabled(base_params)
  # Also pure under jit (how the trainer uses it for the reference policy).
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda p: _logits(graphdef, lora.disabled(p), IDS, MASK))(random_params)),
      base_logits)


def test_merge_into_base_equals_adapted_forward(base, adapted):
  _, base_graphdef, base_params, _ = base
  model, graphdef, _, random_params, lora_logits = adapted
  merged_state = lora.merge_into_base(random_params, model.config)
  assert jax.tree.structure(merged_state) == jax.tree.structure(base_params)
  np.testing.assert_allclose(logits_of(base_graphdef, merged_state), lora_logits, atol=2e-5, rtol=1e-5)
  exported = lora.merged_model(nnx.merge(graphdef, random_params))
  assert exported.config.lora_rank == 0 and exported.config.lora_targets == ()
  graphdef_e, state_e = nnx.split(exported)
  np.testing.assert_allclose(logits_of(graphdef_e, state_e), lora_logits, atol=2e-5, rtol=1e-5)
  # The input state still holds the unmerged kernels.
  np.testing.assert_array_equal(np.asarray(_flat(random_params)[("blocks", "q_proj")]),
                                np.asarray(_flat(base_params)[("blocks", "q_proj")]))
  with pytest.raises(ValueError, match="do not match config.lora_targets"):
    lora.merge_into_base(random_params, model.config.replace(lora_targets=("q_proj",)))


# ------------------------------------------------------------------------------------------------
# Trainable / frozen split and gradients
# ------------------------------------------------------------------------------------------------

def test_split_merge_round_trip(base, adapted):
  _, _, base_params, _ = base
  _, _, _, random_params, _ = adapted
  trainable, frozen = lora.split_trainable(random_params)
  assert all(isinstance(v, lora.LoRAParam) for _, v in trainable.flat_state())
  assert not any(isinstance(v, lora.LoRAParam) for _, v in frozen.flat_state())
  merged = lora.merge_trainable(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(random_params)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(random_params)):
    assert x is y
  # Under jit too (the train step splits and merges traced states).
  rejoined = jax.jit(lambda p: lora.merge_trainable(*lora.split_trainable(p)))(random_params)
  assert jax.tree.structure(rejoined) == jax.tree.structure(random_params)
  # Without adapters everything is trainable (full fine-tuning).
  everything, nothing = lora.split_trainable(base_params)
  assert everything is base_params and nothing is None
  assert lora.merge_trainable(everything, nothing) is base_params


@pytest.fixture(scope="module")
def adapter_grads(adapted):
  """(value, grads w.r.t. adapters only, full-parameter grads) at the random-B state, and the
  jitted adapters-only gradient function."""
  _, graphdef, _, random_params, _ = adapted
  loss = functools.partial(_neg_log_lik, graphdef)
  only = jax.jit(lora.value_and_grad_trainable(lambda p, i, m: loss(p, i, m)))
  full = jax.jit(jax.value_and_grad(lambda p, i, m: loss(p, i, m)))
  (value, grads), (value_full, grads_full) = only(random_params, IDS, MASK), full(random_params, IDS, MASK)
  return value, grads, value_full, grads_full, only


def test_gradients_cover_only_the_adapters_and_match_full_gradient(adapted, adapter_grads):
  _, _, _, random_params, _ = adapted
  value, grads, value_full, grads_full, _ = adapter_grads
  trainable, _ = lora.split_trainable(random_params)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert float(value) == pytest.approx(float(value_full), rel=1e-6)
  full_adapter_part, _ = lora.split_trainable(grads_full)
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(full_adapter_part)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-7, rtol=1e-5)
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_fresh_adapters_have_zero_grad_in_a_and_nonzero_in_b(adapted, adapter_grads):
  # dL/dA = xᵀ (dL/dy) Bᵀ · s = 0 while B = 0; dL/dB = (x A)ᵀ (dL/dy) · s != 0.
  _, _, params, _, _ = adapted
  grads = adapter_grads[-1](params, IDS, MASK)[1]
  for path, g in grads.flat_state():
    g = np.asarray(g.get_value())
    if str(path[-1]) == "a":
      assert not np.any(g), path
    else:
      assert np.abs(g).max() > 0, path


def test_optimizer_state_covers_only_adapters_and_update_keeps_base(adapted, adapter_grads):
  model, _, _, random_params, _ = adapted
  grads = adapter_grads[1]
  optimizer = optax.adamw(1e-2)
  trainable, frozen = lora.split_trainable(random_params)
  opt_state = optimizer.init(trainable)
  n_adapter = model.config.num_lora_params()
  # AdamW: two moments per adapter scalar plus one int32 step count.
  assert lora.count_params(opt_state) == 2 * n_adapter + 1
  updates, _ = optimizer.update(grads, opt_state, trainable)
  new_params = lora.merge_trainable(optax.apply_updates(trainable, updates), frozen)
  before, after = _flat(random_params), _flat(new_params)
  for key in before:
    if "lora" in key:
      assert not np.array_equal(np.asarray(before[key]), np.asarray(after[key])), key
    else:
      assert after[key] is before[key], key


# ------------------------------------------------------------------------------------------------
# Sharding and checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_adapters_get_shardings_and_round_trip_through_checkpoints(adapted, tmp_path):
  model, graphdef, _, random_params, lora_logits = adapted
  mesh = sharding.create_mesh((1, 1, 1))
  shardings = sharding.state_shardings(random_params, mesh)
  placed = jax.device_put(random_params, shardings)
  np.testing.assert_array_equal(logits_of(graphdef, placed), lora_logits)
  folder = checkpointing.save_model_checkpoint(tmp_path / "m", random_params, model.config)
  restored = checkpointing.load_model_checkpoint(folder)
  assert restored.config == model.config
  graphdef_r, state_r = nnx.split(restored)
  assert jax.tree.structure(state_r) == jax.tree.structure(random_params)
  np.testing.assert_array_equal(logits_of(graphdef_r, state_r), lora_logits)
