"""Checkpoints on a mesh of 4 fake CPU devices (a fresh subprocess: the device count is fixed when
JAX initialises): a model checkpoint loads straight into its FSDP layout (each device holds only
its shard: never a replicated copy), also through the trainer's load path; a train checkpoint
saved from one sharding restores into another, each array in exactly the target sharding, with
the file digests verified whatever the layout, and a damaged shard is still caught."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_sharded_checkpoints_restore_into_their_layout(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert "SHARDED CHECKPOINT CHECKS PASSED" in result.stdout


def _assert_in_layout(array, sharding, value):
  """``array`` has exactly ``sharding``, and every device holds only its own slice of ``value``:
  value.nbytes / (number of distinct slices) bytes per device."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  assert array.sharding == sharding, (array.sharding, sharding)
  slices = {str(index) for index in sharding.devices_indices_map(value.shape).values()}
  assert len(array.addressable_shards) == len(sharding.device_set)
  for shard in array.addressable_shards:
    assert shard.data.nbytes * len(slices) == value.nbytes, (shard.data.shape, len(slices))
    assert np.asarray(shard.data).tobytes() == np.ascontiguousarray(value[shard.index]).tobytes()


def _run_checks(workdir: pathlib.Path) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from configs import demo
  from dmpo_jax import checkpointing as ckpt, sharding as sharding_lib
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.transformer import create_model
  from dmpo_jax.rl import loop

  assert jax.device_count() == 4, jax.devices()

  # 1) Model checkpoints (fp32 and bf16) load into the FSDP layout of the logical rules.
  mesh = sharding_lib.create_mesh({"data": 1, "fsdp": 4, "tensor": 1})
  for dtype in ("float32", "bfloat16"):
    config = get_preset("tiny", param_dtype=dtype, remat=False)
    model = create_model(config, seed=3)
    saved = {"/".join(str(k) for k in p): np.asarray(v.get_value())
             for p, v in nnx.state(model, nnx.Param).flat_state()}
    folder = ckpt.save_model_checkpoint(workdir / f"model_{dtype}", model, config)
    expected = sharding_lib.state_shardings(nnx.state(model), mesh)
    expected = {"/".join(str(k) for k in p): v.get_value() for p, v in expected.flat_state()}
    loaded = ckpt.load_model_checkpoint(folder, mesh=mesh)
    config_for_loop = demo.get_config()
    config_for_loop.model.checkpoint = str(folder)
    config_for_loop.model.remat = False
    through_loop, _ = loop.load_model_and_tokenizer(config_for_loop, mesh)
    for restored in (loaded, through_loop):
      flat = {"/".join(str(k) for k in p): v.get_value()
              for p, v in nnx.state(restored, nnx.Param).flat_state()}
      assert flat.keys() == saved.keys()
      split = 0
      for name, array in flat.items():
        _assert_in_layout(array, expected[name], saved[name])
        split += not array.sharding.is_fully_replicated
      assert flat["embed"].sharding.spec == P(None, "fsdp")  # (vocab, embed): embed over fsdp
      assert split >= 8, split  # every matrix is split; never a replicated copy per device

  # 2) A train checkpoint saved from one layout restores into others, verified and exact.
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  # Random bits (incompressible: zstd stores the chunks verbatim, so their bytes can be found).
  x = np.frombuffer(rng.bytes(64 * 128 * 4), np.float32).reshape(64, 128).copy()
  y = rng.standard_normal((4, 6, 8)).astype(jnp.bfloat16)
  layouts = {"2d": NamedSharding(mesh, P("data", "fsdp")), "rows": NamedSharding(mesh, P("fsdp")),
             "replicated": NamedSharding(mesh, P())}
  state = {"x": jax.device_put(x, layouts["2d"]), "y": jax.device_put(y, layouts["rows"])}
  with ckpt.TrainCheckpointer(workdir / "ckpt") as checkpointer:
    checkpointer.save(1, state, force=True)
  for x_layout, y_layout in (("rows", "2d"), ("2d", "replicated"), ("replicated", "rows")):
    other = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layouts[x_layout]),
             "y": jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=layouts[y_layout])}
    with ckpt.TrainCheckpointer(workdir / "ckpt") as checkpointer:
      restored = checkpointer.restore(abstract_state=other).state
    _assert_in_layout(restored["x"], layouts[x_layout], x)
    _assert_in_layout(restored["y"], layouts[y_layout], y)

  # Damage one saved shard of x: flip one bit where its bytes are stored.
  raw = np.ascontiguousarray(x[32:, 64:]).tobytes()[:16]
  hits = [f for f in (workdir / "ckpt" / "1" / "state").rglob("*") if f.is_file() and raw in f.read_bytes()]
  assert len(hits) == 1, hits
  data = bytearray(hits[0].read_bytes())
  data[data.find(raw) + 2] ^= 0x01
  hits[0].write_bytes(bytes(data))
  name = hits[0].relative_to(workdir / "ckpt" / "1").as_posix()
  for layout in layouts.values():
    other = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout),
             "y": jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=layout)}
    with ckpt.TrainCheckpointer(workdir / "ckpt") as checkpointer:
      with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"step 1 .*item 'state': file .*/1/{name}"):
        checkpointer.restore(abstract_state=other)
  print("SHARDED CHECKPOINT CHECKS PASSED")


if __name__ == "__main__":
  _run_checks(pathlib.Path(sys.argv[1]))
