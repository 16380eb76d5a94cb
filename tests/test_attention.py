"""The attention implementations (`dmpo_jax.models.attention`) against the XLA path and numpy:
splash (Pallas interpret mode on CPU) and the cuDNN path's key reordering, fp32 and bf16, with
key padding, GQA and lengths that are not tile multiples; the per-platform choice; the config
key; the transformer with each implementation; and the splash kernel under a 4-device mesh."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmpo_jax.models import attention as A
from dmpo_jax.models.config import ModelConfig, get_preset
from dmpo_jax.models.transformer import create_model

HERE = pathlib.Path(__file__).resolve().parent
# Max |error| / max |reference| per dtype: fp32 reorders sums only; bf16 rounds q/√hd and the
# probabilities to bf16 before the value matmul (8 mantissa bits: 2^-8 ≈ 0.4 %, summed over keys).
REL_TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def np_attention(q, k, v, key_mask):
  """float64 reference: softmax over the real keys of q·k/√hd, GQA by repeating kv heads."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(key_mask, bool)[:, None, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def inputs(dtype, b=2, t=160, s=160, h=4, kvh=2, hd=16, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((b, t, h, hd), (b, s, kvh, hd), (b, s, kvh, hd)))
  key_mask = np.ones((b, s), bool)
  key_mask[1, :37] = False            # left padding (prompts are left-padded)
  key_mask[0, 50:53] = False          # and a hole: any mask, not only a prefix
  return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(key_mask))


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_resolve_impl_per_platform_and_dtype():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert A.resolve_impl("auto", bf16, "tpu") == "splash"
  assert A.resolve_impl("auto", f32, "tpu") == "splash"
  assert A.resolve_impl("auto", bf16, "gpu") == "cudnn"
  assert A.resolve_impl("auto", jnp.float16, "cuda") == "cudnn"
  assert A.resolve_impl("auto", f32, "gpu") == "xla"   # cuDNN's flash kernel has no fp32
  assert A.resolve_impl("auto", bf16, "cpu") == "xla"
  assert A.resolve_impl(None, bf16, "tpu") == "splash"
  assert A.resolve_impl("cudnn", f32, "cpu") == "cudnn"  # explicit choices are kept
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    A.resolve_impl("flash", bf16, "cpu")


def test_splash_needs_a_tile_of_queries_and_auto_needs_a_mesh_context():
  bf16 = jnp.bfloat16
  assert A.choose("auto", bf16, 1024, has_mesh=True, platform="tpu") == "splash"
  assert A.choose("auto", bf16, 32, has_mesh=True, platform="tpu") == "xla"   # dual-cache steps
  # Outside a mesh context the compiler would have to partition the kernel, which it cannot.
  assert A.choose("auto", bf16, 1024, has_mesh=False, platform="tpu") == "xla"
  assert A.choose("splash", bf16, 1024, has_mesh=False, platform="tpu") == "splash"
  assert A.choose("auto", bf16, 1024, has_mesh=False, platform="gpu") == "cudnn"
  assert A.choose("xla", bf16, 1024, has_mesh=True, platform="tpu") == "xla"


def test_platform_errors_name_the_problem():
  assert A.platform_error("auto", "cpu", jnp.float32) is None
  assert A.platform_error("splash", "cpu", jnp.float32) is None  # interpreted
  assert A.platform_error("cudnn", "gpu", jnp.bfloat16) is None
  assert "needs an NVIDIA GPU; this process runs on cpu" in A.platform_error("cudnn", "cpu", jnp.bfloat16)
  assert "bf16 or fp16" in A.platform_error("cudnn", "gpu", jnp.float32)
  assert "TPU kernel" in A.platform_error("splash", "gpu", jnp.bfloat16)


def test_model_config_attention_impl_is_validated():
  assert ModelConfig().attention_impl == "auto"
  assert ModelConfig(attention_impl=None).attention_impl == "auto"  # older checkpoints
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    ModelConfig(attention_impl="flash")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_splash_matches_xla_and_numpy_with_padding(dtype):
  q, k, v, key_mask = inputs(dtype)
  splash = jax.jit(A.splash_attention)(q, k, v, key_mask)
  xla = jax.jit(lambda *a: A.attention(*a, impl="xla"))(q, k, v, key_mask)
  want = np_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), key_mask)
  assert splash.dtype == q.dtype and splash.shape == q.shape
  assert rel_err(splash, want) < REL_TOL[dtype]
  assert rel_err(splash, xla) < REL_TOL[dtype]
  # The gradient (splash's own backward kernels) against XLA's, under a random cotangent.
  cot = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)

  def loss(impl):
    fn = A.splash_attention if impl == "splash" else (lambda *a: A.attention(*a, impl="xla"))
    return lambda q, k, v: jnp.sum(fn(q, k, v, key_mask).astype(jnp.float32) * cot)

  grads = {impl: jax.jit(jax.grad(loss(impl), (0, 1, 2)))(q, k, v) for impl in ("splash", "xla")}
  for got, want in zip(grads["splash"], grads["xla"]):
    assert rel_err(got, want) < 2 * REL_TOL[dtype]
  # Masked keys get no gradient.
  assert float(jnp.abs(grads["splash"][1][1, :37]).max()) == 0.0


def test_splash_short_query_window_takes_the_xla_path():
  q, k, v, key_mask = inputs("float32", t=32)
  got = A.attention(q, k, v, key_mask, impl="splash")
  np.testing.assert_array_equal(got, A.attention(q, k, v, key_mask, impl="xla"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_cudnn_key_reordering_is_exact(dtype):
  # The cuDNN path's transformation (real keys first + per-row lengths), run through XLA.
  q, k, v, key_mask = inputs(dtype, t=24, s=40)
  key_mask = key_mask[:, :40]
  k2, v2, lengths = A.keys_real_first(k, v, key_mask)
  np.testing.assert_array_equal(lengths, np.asarray(key_mask).sum(1))
  real = np.asarray(key_mask)
  for row in range(2):  # the real keys, in order, then the masked ones
    np.testing.assert_array_equal(k2[row, :lengths[row]], np.asarray(k)[row][real[row]])
  got = A.cudnn_attention(q, k, v, key_mask, implementation="xla")
  want = A.attention(q, k, v, key_mask, impl="xla")
  assert rel_err(got, want) < REL_TOL[dtype]
  grad = lambda fn: jax.grad(lambda k, v: jnp.sum(fn(k, v).astype(jnp.float32) ** 2), (0, 1))(k, v)  # noqa: E731
  got_g = grad(lambda k, v: A.cudnn_attention(q, k, v, key_mask, implementation="xla"))
  want_g = grad(lambda k, v: A.attention(q, k, v, key_mask, impl="xla"))
  for a, b in zip(got_g, want_g):
    assert rel_err(a, b) < 2 * REL_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_transformer_splash_matches_xla(dtype):
  # One 128-row tile (the padding to tiles is tested above), left-padded second row.
  ids = jax.random.randint(jax.random.key(1), (2, 128), 0, 250)
  mask = jnp.ones((2, 128), jnp.int32).at[1, :37].set(0)
  results = {}
  for impl in ("xla", "splash"):
    config = get_preset("tiny", attention_impl=impl, dtype=dtype, param_dtype=dtype)
    graphdef, params = nnx.split(create_model(config, 0))

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params).token_log_probs(ids, ids, mask))

    results[impl] = jax.jit(jax.value_and_grad(loss))(params)
  (value_x, grads_x), (value_s, grads_s) = results["xla"], results["splash"]
  assert abs(float(value_s) - float(value_x)) <= REL_TOL[dtype] * abs(float(value_x))
  for got, want in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_x)):
    assert rel_err(got, want) < 4 * REL_TOL[dtype]


def test_splash_under_a_mesh_matches_single_device():
  """4 fake CPU devices, mesh (data 1, fsdp 2, tensor 2): the kernel runs under shard_map, split
  over the batch and the heads, and equals the unsharded XLA attention (forward and gradient)."""
  script = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dmpo_jax import sharding
from dmpo_jax.models import attention as A
mesh = sharding.create_mesh((1, 2, 2))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 128, 4, 16), (4, 128, 2, 16), (4, 128, 2, 16)))
key_mask = jnp.asarray(np.arange(128)[None] >= np.array([0, 5, 40, 90])[:, None])
loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) ** 2))
def sharded(q, k, v):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return A.splash_attention(q, k, v, key_mask)
put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))
fn = jax.jit(jax.value_and_grad(loss(sharded), (0, 1, 2)))
hlo = fn.lower(put(q), put(k), put(v)).compile().as_text()
got = fn(put(q), put(k), put(v))
want = jax.jit(jax.value_and_grad(loss(lambda q, k, v: A.attention(q, k, v, key_mask, impl="xla")), (0, 1, 2)))(q, k, v)
err = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
print(json.dumps({"err": err, "all_gathers": hlo.count(" all-gather(")}))
"""
  env = {**os.environ, "PYTHONPATH": str(HERE.parent), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env, cwd=HERE.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert max(out["err"]) < 2e-5, out
  # Inputs arrive split over batch and heads as the kernel wants them: nothing is gathered.
  assert out["all_gathers"] == 0, out
