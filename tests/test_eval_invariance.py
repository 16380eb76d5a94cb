"""Batch- and mesh-invariant evaluation (`docs/tasks.md` §7.2).

With the exact sampler at τ = 0 and ``batch_invariant``, a row's completion must not depend on the
eval batch size (1 / 8 / 32), on the lengths of its batch-mates (left padding) or on the number of
data-parallel devices (1 vs 8 fake CPU devices): tokens identical and, stronger, the log-probs of
every committed token bit-identical, at fp32 and bf16. The 8-device check runs in a fresh
subprocess (the device count is fixed when JAX initialises): this file run as a script.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "launch"))

GEN, BLOCK = 16, 8
NUM_ROWS = 32


def mixed_prompts(num=NUM_ROWS, seed=0):
  """Byte-level digit prompts of 2 to 44 digits: batches of 8 need different paddings."""
  rng = np.random.default_rng(seed)
  return [list(rng.integers(48, 58, int(n))) + [ord("=")] for n in rng.integers(2, 45, num)]


def model_and_params(dtype):
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.transformer import create_model, split_model
  config = get_preset("tiny", dtype=dtype, param_dtype=dtype)
  return split_model(create_model(config, seed=3))


def decode(prompts, batch_size, dtype, mesh=None):
  """(sequences' completions [N, GEN], committed-token log-probs [N, GEN]) of batches of
  ``batch_size`` rows padded to the whole set's bucket, as launch/eval.py pads them."""
  import contextlib

  import jax
  import jax.numpy as jnp
  import eval as eval_script  # pylint: disable=import-outside-toplevel
  from dmpo_jax import sharding
  from dmpo_jax.diffusion import sampler

  graphdef, params = model_and_params(dtype)
  config = sampler.SamplerConfig(gen_length=GEN, steps=GEN, block_length=BLOCK, temperature=0.0,
                                 return_trace=True, batch_invariant=True)
  bucket = eval_script.prompt_bucket(prompts)
  context = contextlib.nullcontext()
  if mesh is not None:
    params = jax.device_put(params, sharding.state_shardings(params, mesh, sharding.SAMPLING_RULES))
    context = jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
  tokens, log_probs = [], []
  for start in range(0, len(prompts), batch_size):
    ids, mask = eval_script.left_pad(prompts[start:start + batch_size], 257, length=bucket)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    if mesh is not None:
      ids = jax.device_put(ids, sharding.batch_sharding(mesh))
      mask = jax.device_put(mask, sharding.batch_sharding(mesh))
    with context:
      out = sampler.generate(graphdef, params, ids, mask, jax.random.key(0), config)
    tokens.append(np.asarray(out.sequences)[:, bucket:])
    log_probs.append(np.asarray(out.commit_log_prob))
  return np.concatenate(tokens), np.concatenate(log_probs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_batch_size_invariance(dtype):
  prompts = mixed_prompts()
  tokens, log_probs = decode(prompts, 1, dtype)
  for batch_size in (8, NUM_ROWS):
    other_tokens, other_log_probs = decode(prompts, batch_size, dtype)
    np.testing.assert_array_equal(other_tokens, tokens)
    np.testing.assert_array_equal(other_log_probs, log_probs)


@pytest.mark.slow
def test_launch_eval_completions_do_not_depend_on_batch_size():
  """launch/eval.py end to end (padding, batching, decoding, scoring) on the digit-sort task with
  prompts of 2 to 44 digits: identical completions and scores for --batch_size 1, 8 and 32. In
  bf16, where the batch-shaped decoding changes most rows' text (it did before this mode)."""
  import eval as eval_script  # pylint: disable=import-outside-toplevel
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.tokenizer import load_tokenizer
  from dmpo_jax.models.transformer import create_model
  from dmpo_jax.tasks import digit_sort

  rng = np.random.default_rng(1)
  examples = []
  for n in rng.integers(2, 45, NUM_ROWS):
    examples += digit_sort.generate_examples(1, num_digits=int(n), split="test", seed=int(n))
  model = create_model(get_preset("tiny", dtype="bfloat16", param_dtype="bfloat16"), seed=3)
  tokenizer = load_tokenizer("byte")
  task = digit_sort.DigitSortTask()
  results = {}
  for batch_size in (1, 8, NUM_ROWS):
    rows, summary = eval_script.evaluate(model, tokenizer, task, examples, GEN, BLOCK, "full",
                                         batch_size, progress=False)
    results[batch_size] = ([r["completion"] for r in rows], summary["accuracy"])
  assert results[8] == results[1] and results[NUM_ROWS] == results[1]


@pytest.mark.slow
def test_one_vs_eight_devices(tmp_path):
  """The trainer's evaluation layout on 8 fake devices (batch split over ``fsdp``, weights
  replicated, the mesh in scope) against one device."""
  prompts = mixed_prompts()
  for dtype in ("float32", "bfloat16"):
    tokens, log_probs = decode(prompts, 1, dtype)
    np.savez(tmp_path / f"{dtype}.npz", tokens=tokens, log_probs=log_probs)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert "8-DEVICE CHECKS PASSED" in result.stdout


def _eight_device_checks(folder: pathlib.Path) -> None:
  import jax
  from dmpo_jax import sharding

  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  prompts = mixed_prompts()
  for dtype in ("float32", "bfloat16"):
    want = np.load(folder / f"{dtype}.npz")
    for batch_size in (8, NUM_ROWS):  # 1 and 4 rows per device
      tokens, log_probs = decode(prompts, batch_size, dtype, mesh)
      np.testing.assert_array_equal(tokens, want["tokens"])
      np.testing.assert_array_equal(log_probs, want["log_probs"])
  print("8-DEVICE CHECKS PASSED")


if __name__ == "__main__":
  _eight_device_checks(pathlib.Path(sys.argv[1]))
