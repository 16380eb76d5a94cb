"""Checks of the FSDP layouts on 8 fake CPU devices, printed as one JSON line; run as a subprocess
by tests/test_fsdp.py (the device count is fixed at jax import).

  sampler: the rollout sampler on the sampling layout (replicated, and split over tensor groups
           of 2) gives the tokens of the single-device sampler, and its program gathers no
           weights per denoising step;
  reduce:  weight gradients are reduce-scattered in the compute dtype by default and in fp32
           with model.grad_reduce_dtype=float32, and match the single-device gradients.
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax import hlo_collectives, sampling_layout, sharding  # noqa: E402
from dmpo_jax.diffusion import sampler as sampler_lib  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.transformer import create_model  # noqa: E402
from dmpo_jax.rl import train_step  # noqa: E402


def check_sampler():
  config = get_preset("tiny")
  graphdef, params = nnx.split(create_model(config, seed=3))
  mesh = sharding.create_mesh((1, 8, 1))
  train_params = jax.device_put(params, sharding.state_shardings(params, mesh))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 250, (8, 12)).astype(np.int32)
  mask = np.ones((8, 12), bool)
  mask[:3, :4] = False
  scfg = sampler_lib.SamplerConfig(gen_length=16, steps=8, block_length=8)
  key = jax.random.key(1)
  single = np.asarray(sampler_lib.generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask),
                                           key, scfg).sequences)
  out = {}
  for tensor in (1, 2):
    layout = sampling_layout.layout_for(mesh, config, tensor, 0, 0)
    copy = sampling_layout.reshard(train_params, layout)
    ids_on, mask_on = (sampling_layout._put_rows(x, layout) for x in (ids, mask))
    with jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh):
      compiled = sampler_lib.generate.lower(graphdef, copy, ids_on, mask_on, key, scfg).compile()
    sequences = compiled(copy, ids_on, mask_on, key).sequences
    items = hlo_collectives.collectives(compiled.as_text(), scfg.num_blocks)
    out[f"tensor{tensor}"] = {
        "mesh": dict(layout.mesh.shape), "equal": bool(np.array_equal(np.asarray(sequences), single)),
        "q_proj_spec": str(copy["blocks"]["q_proj"][...].sharding.spec),
        "embed_spec": str(copy["embed"][...].sharding.spec),
        "rows_spec": str(sequences.sharding.spec),
        "collectives": sorted({f"{c.opcode} {c.operands}" for c in items}),
        "bytes_per_step": hlo_collectives.total_bytes(items) // scfg.steps}
  return out


def check_reduce():
  """bf16 tiny, fsdp over 8: gradient of Σ token log-probs of 8 rows, sharded vs one device, and
  the dtype of the storage-layout constraint on each kernel's cotangent (the reduce-scatter XLA
  emits; XLA's CPU backend then runs bf16 collectives in fp32 anyway, so the optimized CPU HLO
  cannot show the difference)."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 250, (8, 24)), jnp.int32)
  mesh = sharding.create_mesh((1, 8, 1))
  out = {}
  for reduce in ("", "float32"):
    config = get_preset("tiny", param_dtype="bfloat16", dtype="bfloat16", grad_reduce_dtype=reduce)
    graphdef, params = nnx.split(create_model(config, seed=0))

    def loss(p, x):
      return jnp.sum(nnx.merge(graphdef, p).token_log_probs(x, x))

    on_mesh = jax.jit(train_step.on_mesh(jax.grad(loss), mesh))
    sharded_params = jax.device_put(params, sharding.state_shardings(params, mesh))
    sharded_ids = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    lowered = on_mesh.lower(sharded_params, sharded_ids).as_text()
    # q_proj [64, 4, 16] per layer, split over fsdp on its first dimension.
    constraint = re.compile(r'sharding_constraint .*<@mesh, \[\{"fsdp"\}, \{\}, \{\}\]> : '
                            r"tensor<64x4x16x(\w+)>")
    got = on_mesh(sharded_params, sharded_ids)["blocks"]["q_proj"][...]
    want = jax.jit(jax.grad(loss))(params, ids)["blocks"]["q_proj"][...]
    out[reduce or "compute"] = {
        "grad_dtype": str(got.dtype), "reduce_dtypes": sorted(set(constraint.findall(lowered))),
        "q_proj_max_diff": float(np.max(np.abs(np.asarray(got, np.float32)
                                               - np.asarray(want, np.float32)))),
        "q_proj_max": float(np.max(np.abs(np.asarray(want, np.float32))))}
  return out


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  print(json.dumps({name: {"sampler": check_sampler, "reduce": check_reduce}[name]()
                    for name in sys.argv[1:]}))
