"""Loading a HF checkpoint straight into sharded arrays on a mesh of 8 fake CPU devices.

The device count is fixed when JAX initialises, and another test module of the same pytest process
may already have imported JAX with one device; so the check runs in a fresh subprocess (this file
run as a script) with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_sharded_load_matches_unsharded_load(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert "SHARDED CHECKS PASSED" in result.stdout


def _run_checks(workdir: pathlib.Path) -> None:
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from tests.helpers import hf_fixtures
  from dmpo_jax import sharding as sharding_lib
  from dmpo_jax.models import hf_io

  assert jax.device_count() == 8, jax.devices()
  folder = workdir / "llada"
  hf_fixtures.make_llada_checkpoint(folder, sharded=True)
  reference, info = hf_io.load_pretrained(folder)
  ref = {p: np.asarray(v.get_value()) for p, v in nnx.state(reference, nnx.Param).flat_state()}

  # 1) mesh + the project's logical rules: data 1 x fsdp 2 x tensor 4.
  mesh = sharding_lib.create_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  reads = []  # (tensor name, HF-layout index, shape read): the loader reads per device block
  read = hf_io.SafetensorsFiles.read

  def spy(self, entry, index):
    out = read(self, entry, index)
    reads.append((entry.name, index, out.shape))
    return out
  hf_io.SafetensorsFiles.read = spy
  model, _ = hf_io.load_pretrained(folder, mesh=mesh, rules=sharding_lib.TRAIN_RULES)
  hf_io.SafetensorsFiles.read = read
  q0 = [(index, shape) for name, index, shape in reads if name == "model.transformer.blocks.0.q_proj.weight"]
  # q_proj [n, D=32, H=4, hd=8] as P(None, fsdp, tensor, None): each of the 8 devices reads the
  # 8 rows of its one head and the 16 columns of its half of D from the HF [H*hd, D] tensor.
  assert len(q0) == 8 and all(shape == (8, 16) for _, shape in q0), q0
  assert sorted((i[0].start, i[1].start) for i, _ in q0) == [(h * 8, d) for h in range(4) for d in (0, 16)]
  lm_head = [shape for name, _, shape in reads if name == "model.transformer.ff_out.weight"]
  assert lm_head == [(128 // 4, 32 // 2)] * 8, lm_head  # [V, D] stored, P(fsdp, tensor) on [D, V]
  _, abstract = hf_io.abstract_model(info.model_config)
  expected = sharding_lib.state_shardings(abstract, mesh, sharding_lib.TRAIN_RULES)
  expected = {p: v.get_value() for p, v in expected.flat_state()}
  got = {p: v.get_value() for p, v in nnx.state(model, nnx.Param).flat_state()}
  assert got.keys() == ref.keys()
  n_split = 0
  for path, array in got.items():
    assert array.sharding.is_equivalent_to(expected[path], array.ndim), (path, array.sharding)
    np.testing.assert_array_equal(np.asarray(array), ref[path])
    for shard in array.addressable_shards:  # every device holds exactly its slice
      np.testing.assert_array_equal(np.asarray(shard.data), ref[path][shard.index])
    n_split += len({str(s.index) for s in array.addressable_shards}) > 1
  assert got[("blocks", "q_proj")].sharding.spec == P(None, "fsdp", "tensor", None)
  assert got[("embed",)].sharding.spec == P("tensor", "fsdp")
  assert n_split == 9, n_split  # all but the three norms

  # 2) explicit shardings (a nested dict), including the stacked layer axis split over devices.
  mesh2 = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
  explicit = jax.tree.map(lambda _: NamedSharding(mesh2, P()), abstract.to_pure_dict())
  explicit["blocks"]["gate_proj"] = NamedSharding(mesh2, P("x", None, "y"))
  explicit["lm_head"] = NamedSharding(mesh2, P("y", "x"))
  # head_dim split (the rules never do this): whole heads are read, then cut.
  explicit["blocks"]["q_proj"] = NamedSharding(mesh2, P(None, "x", None, "y"))
  explicit["blocks"]["o_proj"] = NamedSharding(mesh2, P(None, "x", "y", None))
  model2, _ = hf_io.load_pretrained(folder, shardings=explicit)
  for name in ("q_proj", "o_proj"):
    array = getattr(model2.blocks, name)[...]
    assert len({str(s.index) for s in array.addressable_shards}) == 8, name
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), ref[("blocks", name)][shard.index])
  gate = model2.blocks.gate_proj[...]
  assert gate.sharding.spec == P("x", None, "y")
  for shard in gate.addressable_shards:
    assert shard.data.shape == (1, 32, 16)
    np.testing.assert_array_equal(np.asarray(shard.data), ref[("blocks", "gate_proj")][shard.index])
  np.testing.assert_array_equal(np.asarray(model2.lm_head[...]), ref[("lm_head",)])

  # 3) saving the sharded model reproduces the original tensor bytes.
  out = hf_io.save_pretrained(model, workdir / "out", info=info)
  original, saved = hf_fixtures.read_all_tensors(folder), hf_fixtures.read_all_tensors(out)
  assert original.keys() == saved.keys()
  for name in original:
    assert original[name].tobytes() == saved[name].tobytes(), name
  print("SHARDED CHECKS PASSED")


if __name__ == "__main__":
  _run_checks(pathlib.Path(sys.argv[1]))
