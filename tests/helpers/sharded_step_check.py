"""Runs the RL train step on a ('data','fsdp','tensor') = (2,2,2) mesh of 8 fake CPU devices and on
one device, and prints JSON with both losses, the max parameter difference and the compile counts.
Run as a subprocess by tests/test_sharded_train_step.py (the device count is fixed at jax import)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax import sharding  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.transformer import create_model  # noqa: E402
from dmpo_jax.rl import registry, rollout, train_state as ts, train_step  # noqa: E402


def run(mesh, objective_name):
  model = create_model(get_preset("tiny", n_layers=1), seed=0)
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, sharding.state_shardings(params, mesh))
  objective = registry.get_objective(objective_name)
  ocfg = objective.make_config({"num_mc": 2} if objective_name == "bgpo" else {})
  optimizer = ts.make_optimizer(1e-3)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer, 0))(params)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  rng = np.random.default_rng(0)
  b, p, l = 8, 6, 4
  seqs = np.concatenate([rng.integers(0, 256, (b, p)), rng.integers(48, 58, (b, l))], 1)
  prompt_mask = np.ones((b, p), bool)
  prompt_mask[:2, :2] = False  # left padding
  batch_np = rollout.rl_batch(seqs, prompt_mask, rng.random(b).astype(np.float32),
                              np.repeat(np.arange(2), 4), np.arange(b))
  put = lambda v: jax.device_put(jnp.asarray(v), sharding.batch_sharding(mesh, np.ndim(v)))
  batch = {k: put(v) for k, v in batch_np.items()}
  prepared = jax.jit(lambda prm, bt: train_step.prepare_rollout(
      graphdef, objective, ocfg, prm, prm, bt, state.key, jnp.int32(0)))(state.params, batch)
  per_example = {k: put(v) for k, v in prepared.per_example.items()}
  update = train_step.jit_rl_update(graphdef, objective, ocfg, optimizer, state_shardings)
  losses = []
  for iteration in range(2):
    state, metrics = update(state, batch, per_example, jnp.int32(0), jnp.int32(iteration))
    losses.append(float(metrics["train/loss"]))
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  return losses, leaves, update._cache_size(), str(state.params["blocks"]["q_proj"][...].sharding.spec)


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  for objective_name in sys.argv[1:]:
    sharded = run(sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2}), objective_name)
    single = run(sharding.create_mesh((1, 1, 1), devices=devices[:1]), objective_name)
    out[objective_name] = {
        "sharded_losses": sharded[0], "single_losses": single[0],
        "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(sharded[1], single[1])),
        "max_param_change": max(float(np.max(np.abs(a))) for a in sharded[1]),
        "compiles": [sharded[2], single[2]], "q_proj_spec": sharded[3]}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
