"""Memory plan of the RL programs (`benchmarks/memory.py --config`): optimizer moments split like
the parameters, compiler byte counts that match an independent count of the sharded state, and an
ahead-of-time compile of the tiny train step and sampler for a real TPU topology (needs libtpu:
``pip install "jax[tpu]==<installed jax version>"``; skipped without it)."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(code_or_args, devices=None, timeout=600):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
  if devices:
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
  result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


MOMENT_SPECS = r"""
import functools, json, jax
from flax import nnx
from dmpo_jax import sharding
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import train_state as ts, train_step
mesh = sharding.create_mesh((1, 4, 1))
config = get_preset("tiny", param_dtype="bfloat16", dtype="bfloat16")
_, params = nnx.split(create_model(config, 0))
params = jax.device_put(params, sharding.state_shardings(params, mesh))
optimizer = ts.make_optimizer(1e-3)
init = functools.partial(ts.init_train_state, optimizer=optimizer, seed=0)
_, shardings = train_step.state_shardings(init, params, mesh)
state = jax.jit(init, out_shardings=shardings)(params)
flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
param_specs = {k: str(v.sharding.spec) for k, v in flat(state.params).items()}
adam = state.opt_state[1][0]
out = {"params": param_specs, "mu": {k: str(v.sharding.spec) for k, v in flat(adam.mu).items()},
       "nu": {k: str(v.sharding.spec) for k, v in flat(adam.nu).items()},
       "mu_shard_elems": sum(v.addressable_shards[0].data.size for v in flat(adam.mu).values()),
       "param_elems": sum(v.size for v in flat(state.params).values())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_adam_moments_are_split_like_the_parameters():
  out = _run(MOMENT_SPECS, devices=4)
  assert out["mu"] == out["params"] and out["nu"] == out["params"]
  assert out["params"]["['blocks']['q_proj'].value"] == "P(None, 'fsdp', None, None)"
  # Everything but the norms ([layers, 64] and [64], replicated) is split 4 ways over fsdp.
  norms = 2 * 2 * 64 + 64
  assert out["mu_shard_elems"] == (out["param_elems"] - norms) // 4 + norms


ACCUMULATOR_SPECS = r"""
import json, jax, jax.numpy as jnp
from flax import nnx
from dmpo_jax import sharding
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import grad
mesh = sharding.create_mesh((1, 4, 1))
config = get_preset("tiny")
graphdef, params = nnx.split(create_model(config, 0))
params = jax.device_put(params, sharding.state_shardings(params, mesh))
batch = {"x": jax.device_put(jnp.ones((8, 64)), sharding.batch_sharding(mesh, 2))}

def loss(p, mb, j):  # touches every parameter; the batch is split over fsdp
  total = sum(jnp.sum(jnp.tanh(v)) for v in jax.tree.leaves(p))
  return total * jnp.sum(mb["x"]) * (j + 1), {}

def accumulate(p, b):
  return grad.accumulate_gradients(loss, p, b, num_samples=3, micro_batch_size=4,
                                   denominator_fn=lambda mb: 1.0)[0]

def with_mesh(p, b):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return accumulate(p, b)

def trimmed(spec):  # P(None, 'fsdp', None) and P(None, 'fsdp') are the same sharding
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return str(spec)

named = lambda tree: {jax.tree_util.keystr(k): trimmed(s.spec)
                      for k, s in jax.tree_util.tree_leaves_with_path(tree)}
print(json.dumps({"params": named(jax.tree.map(lambda v: v.sharding, params)),
                  "with_mesh": named(jax.jit(with_mesh).lower(params, batch).compile().output_shardings)}))
"""


@pytest.mark.slow
def test_gradient_accumulator_is_split_like_the_parameters():
  """Under the update's mesh the fp32 accumulator of the MC / micro-batch loop comes out with
  the parameters' shardings (XLA is otherwise free to replicate a buffer built from zeros)."""
  out = _run(ACCUMULATOR_SPECS, devices=4)
  assert out["with_mesh"] == out["params"], out
  assert out["params"]["['blocks']['q_proj'].value"] == "[None, 'fsdp']"


@pytest.mark.slow
def test_plan_bytes_match_the_sharded_state_on_cpu_devices():
  """The compiler's argument bytes of the update = params + AdamW state + batch, each counted
  per device independently here (CPU XLA adds no layout padding)."""
  out = _run([str(REPO / "benchmarks" / "memory.py"), "--config=configs/demo.py", "--num_devices=2",
              "--programs=update", "--override=bgpo.num_mc=1"])
  assert out["num_devices"] == 2 and out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  # tiny: fp32 parameters, every kernel and embedding split over fsdp (d_model 64), norms not.
  num_params = 264 * 64 * 2 + 2 * (64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128 + 2 * 64) + 64
  norms = 2 * 2 * 64 + 64
  params = 4 * ((num_params - norms) // 2 + norms)
  resident = out["resident_bytes"]
  assert resident["params"] == resident["reference"] == params
  assert resident["opt_state"] == 2 * params + 4 + 4  # mu, nu, and two int32 counts
  rows, tokens = 64, 10  # 128 rows over 2 devices, prompt 5 + generation 5
  batch = rows * tokens * (4 + 1 + 1 + 1) + rows * (4 + 4 + 4)
  state = params + resident["opt_state"] + 4 + 8  # + step, rng
  update = out["programs"]["update"]
  assert update["alias"] == state, update  # the donated state is updated in place
  # The rest of the arguments: this device's rows of the batch (jit drops the inputs BGPO does
  # not read, e.g. the prompt mask) and a few fp32 numbers per row (advantages), two scalars.
  assert batch // 2 <= update["argument"] - state <= batch + rows * 4 * 8 + 8, update
  assert update["peak"] == update["total"] + resident["reference"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "jax[tpu]==<jax version>")')
@pytest.mark.slow
def test_tiny_train_step_and_sampler_compile_for_a_tpu_topology():
  out = _run([str(REPO / "benchmarks" / "memory.py"), "--config=configs/demo.py",
              "--topology=v5e:2x2", "--programs=update,sampler", "--override=bgpo.num_mc=1"])
  assert out["device_kind"].startswith("TPU v5") and out["num_devices"] == 4, out
  update, sampler = out["programs"]["update"], out["programs"]["sampler"]
  state = out["resident_bytes"]["params"] + out["resident_bytes"]["opt_state"]
  assert update["argument"] >= state and update["alias"] >= state  # TPU tiles pad small arrays
  assert sampler["argument"] >= out["resident_bytes"]["params"]
  assert update["flops"] > 0 and sampler["flops"] > 0 and out["fits"]
