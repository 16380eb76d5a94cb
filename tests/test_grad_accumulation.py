"""Scan-accumulated gradients (`dmpo_jax.rl.grad`): equality with unrolled and full-batch
computations on a toy differentiable function, and compiled memory independent of the number of
MC samples (AOT, tiny model)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import grad as G
from dmpo_jax.rl import registry, scoring

RNG = np.random.default_rng(0)
# Host arrays (jax converts them on use), so that building them compiles nothing at import.
PARAMS = {"w": RNG.normal(size=(3, 2)).astype(np.float32),
          "b": RNG.normal(size=(2,)).astype(np.float32)}
BATCH = {"x": RNG.normal(size=(8, 3)).astype(np.float32),
         "y": RNG.normal(size=(8, 2)).astype(np.float32),
         "count": RNG.integers(1, 4, size=(8,)).astype(np.float32)}
NUM_SAMPLES = 3


def toy_sample_loss(p, mb, j):
  """Σ_rows count·‖tanh(x w + b)·(1 + 0.3 j) − y‖², a nonlinear per-sample term."""
  pred = jnp.tanh(mb["x"] @ p["w"] + p["b"]) * (1.0 + 0.3 * j)
  err = jnp.sum(jnp.square(pred - mb["y"]), axis=-1)
  return jnp.sum(mb["count"] * err), {"err": G.WeightedMetric.mean_of(err)}


def toy_denominator(mb):
  return jnp.sum(mb["count"])


def unrolled_reference():
  """Python loops over rows and samples, one jax.grad per (row, sample), summed."""
  total_grad = jax.tree.map(jnp.zeros_like, PARAMS)
  total_loss = 0.0
  errs = []
  for i in range(8):
    row = jax.tree.map(lambda x: x[i:i + 1], BATCH)
    for j in range(NUM_SAMPLES):
      value, grad = jax.value_and_grad(lambda p: toy_sample_loss(p, row, j)[0])(PARAMS)
      total_loss += float(value)
      total_grad = jax.tree.map(jnp.add, total_grad, grad)
      errs.append(float(toy_sample_loss(PARAMS, row, j)[1]["err"].total))
  den = float(jnp.sum(BATCH["count"]))
  return jax.tree.map(lambda g: g / den, total_grad), total_loss, den, float(np.mean(errs))


@pytest.mark.parametrize("micro_batch_size", [None, 4, 2, 1])
def test_scan_accumulation_equals_unrolled_and_full_batch(micro_batch_size):
  ref_grad, ref_loss, ref_den, ref_err = unrolled_reference()
  fn = jax.jit(functools.partial(G.accumulate_gradients, toy_sample_loss, num_samples=NUM_SAMPLES,
                                 micro_batch_size=micro_batch_size, denominator_fn=toy_denominator))
  grads, out = fn(PARAMS, BATCH)
  for key in PARAMS:
    np.testing.assert_allclose(grads[key], ref_grad[key], rtol=1e-5, atol=1e-6)
    assert grads[key].dtype == jnp.float32
  np.testing.assert_allclose(out.numerator, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(out.denominator, ref_den, rtol=1e-6)
  np.testing.assert_allclose(out.metric_values()["err"], ref_err, rtol=1e-5)
  np.testing.assert_allclose(out.loss, ref_loss / ref_den, rtol=1e-5)


def test_unnormalized_and_zero_denominator():
  grads, out = G.accumulate_gradients(toy_sample_loss, PARAMS, BATCH, num_samples=2,
                                      micro_batch_size=4, denominator_fn=lambda mb: 0.0,
                                      normalize=False)
  direct = jax.grad(lambda p: toy_sample_loss(p, BATCH, 0)[0] + toy_sample_loss(p, BATCH, 1)[0])(PARAMS)
  np.testing.assert_allclose(grads["w"], direct["w"], rtol=1e-5)
  grads0, out0 = G.accumulate_gradients(lambda p, mb, j: (0.0 * jnp.sum(p["w"]), {}), PARAMS, BATCH,
                                        num_samples=1, micro_batch_size=None,
                                        denominator_fn=lambda mb: 0.0)
  assert np.all(np.isfinite(np.asarray(grads0["w"]))) and float(out0.loss) == 0.0


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_single_pass_losses(micro_batch_size):
  # num_samples=None: a loss without an MC axis. Equal to the direct gradient; with one
  # micro-batch it compiles without a loop, while an MC loss keeps its loop even at n = 1.
  fn = functools.partial(G.accumulate_gradients, toy_sample_loss, micro_batch_size=micro_batch_size,
                         denominator_fn=toy_denominator)
  grads, out = jax.jit(functools.partial(fn, num_samples=None))(PARAMS, BATCH)
  den = float(jnp.sum(BATCH["count"]))
  direct = jax.grad(lambda p: toy_sample_loss(p, BATCH, 0)[0] / den)(PARAMS)
  for key in PARAMS:
    np.testing.assert_allclose(grads[key], direct[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.numerator, toy_sample_loss(PARAMS, BATCH, 0)[0], rtol=1e-5)
  has_loop = lambda n: "while" in jax.jit(functools.partial(fn, num_samples=n)).lower(
      PARAMS, BATCH).compile().as_text()
  assert has_loop(None) == (micro_batch_size is not None)
  assert has_loop(1)


def test_micro_batches_are_strided_and_round_trip():
  tree = {"a": jnp.arange(12).reshape(6, 2), "b": jnp.arange(6)}
  micro = G.split_micro_batches(tree, 2)
  np.testing.assert_array_equal(micro["b"], [[0, 3], [1, 4], [2, 5]])
  back = G.merge_micro_batches(micro)
  np.testing.assert_array_equal(back["a"], tree["a"])
  mapped = G.micro_batch_map(lambda mb: {"s": mb["a"].sum(-1) * 10 + mb["b"]}, tree, 3)
  np.testing.assert_array_equal(mapped["s"], np.arange(12).reshape(6, 2).sum(-1) * 10 + np.arange(6))
  with pytest.raises(ValueError, match="divide"):
    G.split_micro_batches(tree, 4)
  with pytest.raises(ValueError, match="leading batch axis"):
    G.split_micro_batches({"a": jnp.zeros((6,)), "b": jnp.zeros((5,))}, 2)


def test_value_with_surrogate_grad():
  f = lambda x: G.value_with_surrogate_grad(jnp.float32(7.0), 3.0 * x ** 2)
  value, grad = jax.value_and_grad(f)(2.0)
  assert float(value) == 7.0 and float(grad) == 12.0


# -- compiled memory (AOT, nothing executed) -------------------------------------------------------

COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# Parameter-heavy like the real models (bf16 weights, a vocabulary far larger than the batch's
# tokens), where a loop-free one-sample program and the accumulation loop differ by more than
# 2x: the memory tests below would catch the loop being dropped at n_t = 1.
MODEL = get_preset("tiny", n_layers=1, d_model=128, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden_size=64, vocab_size=8192, param_dtype="bfloat16",
                   dtype="bfloat16")


@functools.lru_cache(maxsize=None)
def compiled_temp_bytes(objective_name: str, n_mc: int, micro_batch_size: int = 0) -> int:
  abstract = nnx.eval_shape(lambda: create_model(MODEL, 0))
  graphdef, params = nnx.split(abstract)
  b, t = 4, 24
  s = jax.ShapeDtypeStruct
  batch = {"sequences": s((b, t), jnp.int32), "attention_mask": s((b, t), jnp.bool_),
           "prompt_mask": s((b, t), jnp.bool_), "completion_mask": s((b, t), jnp.bool_),
           "rewards": s((b,), jnp.float32), "group_ids": s((b,), jnp.int32),
           "example_ids": s((b,), jnp.int32)}
  keys = jax.eval_shape(lambda: scoring.make_keys(jax.random.key(0), 0))
  objective = registry.get_objective(objective_name)
  field = {"dmpo": "loss_num_mc"}.get(objective_name, "num_mc")
  overrides = {field: n_mc}
  if objective_name == "dmpo":
    overrides["mask_scheme"] = "uniform_count"  # antithetic masks need an even count
  if micro_batch_size:
    overrides["micro_batch_size"] = micro_batch_size
  cfg = objective.make_config(overrides)
  aux = jax.eval_shape(lambda p, bt, k: objective.prepare(graphdef, p, p, bt, k, cfg), params,
                       batch, keys)
  # Faster-compiling code generation (LLVM level 0, no CPU fusion emitters); the property
  # tested (no growth with n_t) holds for the default pipeline too (benchmarks/memory.py).
  compiled = jax.jit(objective.grads, static_argnums=(0, 5)).lower(
      graphdef, params, batch, aux, keys, cfg).compile(
          COMPILE_OPTIONS)
  return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("objective_name", ["bgpo", "dmpo", "vrpo_ol_two_pass"])
@pytest.mark.slow
def test_temp_memory_independent_of_mc_samples(objective_name):
  # The accumulation loop's trip count is a runtime value, so n_t = 1 keeps the loop (and its
  # working set) and every n_t compiles to the same buffers: the bound is 5 %.
  one, many = compiled_temp_bytes(objective_name, 1), compiled_temp_bytes(objective_name, 16)
  assert many <= 1.05 * one, (objective_name, one, many)


@pytest.mark.slow
def test_temp_memory_independent_of_micro_batches():
  full, micro = compiled_temp_bytes("bgpo", 2), compiled_temp_bytes("bgpo", 2, micro_batch_size=1)
  # Micro-batches of 1 row of 4 need less activation memory; never more than the full batch.
  assert micro <= 1.05 * full, (full, micro)


@pytest.mark.slow
def test_direct_vrpo_ol_memory_grows_with_mc_samples():
  # The direct form keeps all n_t forward graphs alive for exp(mean_j d_j): the problem BGPO
  # and the two-pass form solve.
  sizes = [compiled_temp_bytes("vrpo_ol", n) for n in (2, 8, 16)]
  assert sizes[0] < sizes[1] < sizes[2] and sizes[2] > 1.3 * sizes[0], sizes
  assert sizes[2] > 1.3 * compiled_temp_bytes("bgpo", 16)
