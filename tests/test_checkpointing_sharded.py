"""Checkpoint checksums of sharded arrays on a mesh of 4 fake CPU devices (a fresh subprocess:
the device count is fixed when JAX initialises): the checksum of a 2-D-sharded array equals a
plain-Python computation on its global value, and a train checkpoint saved from one sharding
restores and verifies into another (and still catches a damaged shard)."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_sharded_checksums_are_layout_independent(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert "SHARDED CHECKSUM CHECKS PASSED" in result.stdout


def _fletcher_by_hand(words) -> str:
  """s1 = sum of all words, s2 = sum over rows (last axis) of (row + 1) * row sum, mod 2^32."""
  rows = [[int(w) for w in row] for row in words.reshape(-1, words.shape[-1])]
  s1 = sum(sum(row) for row in rows) % 2**32
  s2 = sum((r + 1) * sum(row) for r, row in enumerate(rows)) % 2**32
  return f"fletcher32x2:{s1:08x}{s2:08x}"


def _run_checks(workdir: pathlib.Path) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest
  from jax.sharding import NamedSharding, PartitionSpec as P

  from dmpo_jax import checkpointing as ckpt

  assert jax.device_count() == 4, jax.devices()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  # Random bits (incompressible: zstd stores the chunks verbatim, so their bytes can be found).
  x = np.frombuffer(rng.bytes(64 * 128 * 4), np.float32).reshape(64, 128).copy()
  y = rng.standard_normal((4, 6, 8)).astype(jnp.bfloat16)
  layouts = {"2d": NamedSharding(mesh, P("data", "fsdp")), "rows": NamedSharding(mesh, P("fsdp")),
             "replicated": NamedSharding(mesh, P())}
  expected = {"x": _fletcher_by_hand(x.view(np.uint32)), "y": _fletcher_by_hand(y.view(np.uint16))}
  for layout in layouts.values():
    sums = ckpt.array_checksums({"x": jax.device_put(x, layout), "y": jax.device_put(y, layout)})
    assert {k: v["checksum"] for k, v in sums.items()} == expected, layout

  state = {"x": jax.device_put(x, layouts["2d"]), "y": jax.device_put(y, layouts["rows"])}
  with ckpt.TrainCheckpointer(workdir / "ckpt") as checkpointer:
    checkpointer.save(1, state, force=True)
  other = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layouts["rows"]),
           "y": jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=layouts["2d"])}
  with ckpt.TrainCheckpointer(workdir / "ckpt") as checkpointer:
    restored = checkpointer.restore(abstract_state=other).state
  assert restored["x"].sharding == layouts["rows"] and restored["y"].sharding == layouts["2d"]
  assert np.asarray(restored["x"]).tobytes() == x.tobytes()
  # Damage one saved shard of x: flip one bit where its bytes are stored.
  raw = np.ascontiguousarray(x[32:, 64:]).tobytes()[:16]
  hits = [f for f in (workdir / "ckpt" / "1" / "state").rglob("*") if f.is_file() and raw in f.read_bytes()]
  assert len(hits) == 1, hits
  for file in hits:
    data = bytearray(file.read_bytes())
    data[data.find(raw) + 2] ^= 0x01
    file.write_bytes(bytes(data))
  with ckpt.TrainCheckpointer(workdir / "ckpt") as checkpointer:
    with pytest.raises(ckpt.CheckpointIntegrityError, match=r"step 1 .*item 'state': array 'x'"):
      checkpointer.restore(abstract_state=other)
  print("SHARDED CHECKSUM CHECKS PASSED")


if __name__ == "__main__":
  _run_checks(pathlib.Path(sys.argv[1]))
