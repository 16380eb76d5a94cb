"""The HLO cost walker of `benchmarks/step_time.py` (`benchmarks/hlo_cost.py`) on programs whose
FLOPs, HBM bytes and collective bytes are counted by hand: a shard_map program compiled for 4
fake CPU devices, and a hand-written TPU-style module (no trip count recorded, sliced and
in-place-updated fusion operands, VMEM operands)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import hlo_cost  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

# On each of 4 devices: x [8, 16] f32 (rows split), w [16, 16] replicated. A 5-trip loop of
# x <- psum(tanh(x @ w)) (one all-reduce of [8, 16] per trip), a ppermute of x to the next
# device, an n-trip loop of x <- tanh(x @ w) (n a runtime value: no trip count in the HLO), and
# an all-gather of x over the 4 devices.
PROGRAM = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("i",))
def local(w, x, n):
  x = jax.lax.fori_loop(0, 5, lambda _, x: jax.lax.psum(jnp.tanh(x @ w), "i"), x)
  x = jax.lax.ppermute(x, "i", [(j, (j + 1) % 4) for j in range(4)])
  x = jax.lax.fori_loop(0, n, lambda _, x: jnp.tanh(x @ w), x)
  return jax.lax.all_gather(x, "i", tiled=True)
f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("i"), P()), out_specs=P(), check_vma=False))
print(f.lower(jnp.zeros((16, 16)), jnp.zeros((32, 16)), 3).compile().as_text())
"""


@pytest.fixture(scope="module")
def fake_device_hlo():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_collectives_and_flops_of_a_shard_map_program_by_hand(fake_device_hlo):
  out = hlo_cost.module_cost(fake_device_hlo, num_devices=4, unknown_trip_counts=[7])
  row = 8 * 16 * 4  # one device's x: [8, 16] f32 = 512 bytes
  assert out["collectives"]["all-reduce"] == {"count": 5, "operand_bytes": 5 * row,
                                              "ici_bytes": 5 * 2 * row * 3 / 4}
  assert out["collectives"]["collective-permute"] == {"count": 1, "operand_bytes": row,
                                                      "ici_bytes": row}
  # all-gather: each device receives the other 3 shards of the [32, 16] result.
  assert out["collectives"]["all-gather"] == {"count": 1, "operand_bytes": row, "ici_bytes": 3 * row}
  assert out["collective_operand_bytes"] == 7 * row
  # (5 + 7) matmuls of [8, 16] x [16, 16]: 2·8·16·16 FLOPs each.
  assert out["flops"] == (5 + 7) * 2 * 8 * 16 * 16
  sources = sorted((loop["trip_count"], loop["source"]) for loop in out["loops"])
  assert sources == [(5, "xla"), (7, "given")]


def test_trip_count_from_a_fused_loop_condition(fake_device_hlo):
  # Without XLA's recorded count, the 5-trip loop's count comes from its condition (the CPU
  # compiler fuses the compare `i < 5`), the other loop's from the caller.
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\}', '"x":1', fake_device_hlo)
  assert stripped != fake_device_hlo
  out = hlo_cost.module_cost(stripped, num_devices=4, unknown_trip_counts=[7])
  assert sorted((loop["trip_count"], loop["source"]) for loop in out["loops"]) == [
      (5, "condition"), (7, "given")]
  assert out["flops"] == (5 + 7) * 2 * 8 * 16 * 16


def test_a_loop_without_a_trip_count_must_be_given_one(fake_device_hlo):
  with pytest.raises(hlo_cost.UnknownTripCount, match="unknown_trip_counts"):
    hlo_cost.module_cost(fake_device_hlo, num_devices=4)
  # XLA's own count of the same program counts each loop body once.
  once = hlo_cost.module_cost(fake_device_hlo, num_devices=4, unknown_trip_counts=[1])
  assert once["flops"] == (5 + 1) * 2 * 8 * 16 * 16


# A TPU-style module: a 6-trip layer loop (count only in the condition) that slices one layer of
# a stacked weight, multiplies (a convolution, as TPU lowers dots), converts, and writes the row
# into a stacked accumulator in place.
TPU_STYLE = """HloModule test, is_scheduled=true

%fused_slice (p0: bf16[6,128,512], p1: s32[]) -> bf16[1,128,512] {
  %p0 = bf16[6,128,512]{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[]{:T(128)} parameter(1)
  %c0 = s32[]{:T(128)} constant(0)
  ROOT %ds = bf16[1,128,512]{2,1,0:T(8,128)(2,1)} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,128,512}
}

%fused_update (p0: f32[6,16,512], p1: f32[16,512], p2: s32[]) -> f32[6,16,512] {
  %p0 = f32[6,16,512]{2,1,0} parameter(0)
  %p1 = f32[16,512]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %b = f32[1,16,512]{2,1,0} bitcast(%p1)
  %c0 = s32[] constant(0)
  ROOT %dus = f32[6,16,512]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %c0, %c0)
}

%fused_matmul (p0: bf16[16,128], p1: bf16[1,128,512]) -> bf16[16,512] {
  %p0 = bf16[16,128]{1,0} parameter(0)
  %p1 = bf16[1,128,512]{2,1,0} parameter(1)
  %w = bf16[128,512]{1,0} bitcast(%p1)
  ROOT %conv = bf16[16,512]{1,0} convolution(%p0, %w), dim_labels=bf_io->bf
}

%body (param: (s32[], bf16[16,128], bf16[6,128,512], f32[6,16,512])) -> (s32[], bf16[16,128], bf16[6,128,512], f32[6,16,512]) {
  %param = (s32[], bf16[16,128]{1,0}, bf16[6,128,512]{2,1,0}, f32[6,16,512]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %x = bf16[16,128]{1,0} get-tuple-element(%param), index=1
  %w = bf16[6,128,512]{2,1,0} get-tuple-element(%param), index=2
  %acc = f32[6,16,512]{2,1,0} get-tuple-element(%param), index=3
  %wi = bf16[1,128,512]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %y = bf16[16,512]{1,0} fusion(%x, %wi), kind=kOutput, calls=%fused_matmul
  %y32 = f32[16,512]{1,0} convert(%y)
  %acc2 = f32[6,16,512]{2,1,0} fusion(%acc, %y32, %i), kind=kLoop, calls=%fused_update
  %onv = f32[16,512]{1,0:T(8,128)S(1)} copy(%y32)
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[16,128]{1,0}, bf16[6,128,512]{2,1,0}, f32[6,16,512]{2,1,0}) tuple(%i2, %x, %w, %acc2)
}

%cond (param: (s32[], bf16[16,128], bf16[6,128,512], f32[6,16,512])) -> pred[] {
  %param = (s32[], bf16[16,128]{1,0}, bf16[6,128,512]{2,1,0}, f32[6,16,512]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[16,128], w: bf16[6,128,512]) -> f32[6,16,512] {
  %x = bf16[16,128]{1,0} parameter(0)
  %w = bf16[6,128,512]{2,1,0} parameter(1)
  %zero = s32[] constant(0)
  %start = s32[] copy(%zero)
  %z = f32[] constant(0)
  %acc = f32[6,16,512]{2,1,0} broadcast(%z), dimensions={}
  %init = (s32[], bf16[16,128]{1,0}, bf16[6,128,512]{2,1,0}, f32[6,16,512]{2,1,0}) tuple(%start, %x, %w, %acc)
  %loop = (s32[], bf16[16,128]{1,0}, bf16[6,128,512]{2,1,0}, f32[6,16,512]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[6,16,512]{2,1,0} get-tuple-element(%loop), index=3
}
"""


def test_hbm_bytes_and_trip_count_of_a_tpu_style_module_by_hand():
  out = hlo_cost.module_cost(TPU_STYLE, num_devices=1)
  assert out["loops"] == [{"loop": "loop", "trip_count": 6, "source": "condition", "op_name": ""}]
  layer = 128 * 512 * 2                     # one layer of the stacked bf16 weight
  row = 16 * 512                            # elements of y
  per_trip = (
      (layer + 4) + layer                   # fused_slice: reads the slice (+ index), writes it
      + (16 * 128 * 2 + layer) + row * 2    # fused_matmul: x and the layer in, bf16 y out
      + row * 2 + row * 4                   # convert: bf16 in, f32 out
      + (row * 4 + 4) + row * 4             # fused_update: the row (+ index) in, the row written
      + row * 4                             # copy into VMEM (S(1)): the read only
      + 3 * 4                               # i + 1
      + (4 + 4 + 1))                        # the condition's compare
  entry = 4 + 4 + 4 + 6 * row * 4           # copy of the start index, broadcast of zeros
  assert out["hbm_bytes"] == 6 * per_trip + entry
  assert out["flops"] == 6 * 2 * 16 * 512 * 128
  assert out["collectives"] == {}


def test_shape_bytes_and_replica_groups():
  assert hlo_cost.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0}, s32[])") == 2 * 6 + 4 * 4 + 4
  assert hlo_cost.shape_bytes("f32[4]{0:T(128)S(1)}") == 0               # VMEM
  assert hlo_cost.shape_bytes("f32[4]{0:T(128)S(1)}", skip_memory_space=False) == 16
  parse = lambda attrs: hlo_cost.Instruction("c", "f32[1]", "all-reduce", [], attrs)  # noqa: E731
  assert hlo_cost.group_size(parse("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}"), 8) == 4
  assert hlo_cost.group_size(parse("replica_groups=mesh['a'=4,'b'=2] {'a','b'}"), 8) == 8
  assert hlo_cost.group_size(parse("replica_groups=[2,4]<=[8], dimensions={0}"), 8) == 4
  assert hlo_cost.group_size(parse("replica_groups={{0,1},{2,3},{4,5},{6,7}}"), 8) == 2
  assert hlo_cost.group_size(parse("replica_groups={}, to_apply=%add"), 8) == 8


def test_cli_prints_the_cost(tmp_path):
  path = tmp_path / "m.hlo"
  path.write_text(TPU_STYLE)
  result = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "hlo_cost.py"),
                           str(path), "1"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["flops"] == 6 * 2 * 16 * 512 * 128


TPU_PROGRAM = r"""
import json, os
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
mesh = jax.sharding.Mesh(np.array(devices), ("b",))
def loss(q, k, v, w, c):
  s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1).astype(q.dtype), v)
  return jnp.sum(jnp.einsum("btnh,nhd->btd", o, w, preferred_element_type=jnp.float32) * c)
row = NamedSharding(mesh, P("b"))
spec = lambda shape, sharding=row: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
args = (spec((8, 256, 8, 128)), spec((8, 256, 8, 128)), spec((8, 256, 8, 128)),
        spec((8, 128, 256), NamedSharding(mesh, P())), spec((8, 256, 256)))
compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
print(json.dumps({"hlo": compiled.as_text(), "xla_flops": compiled.cost_analysis()["flops"]}))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "jax[tpu]==<jax version>")')
@pytest.mark.slow
def test_tpu_batched_matmuls_count_their_matmul_flops():
  """Attention's batched matmuls, which the TPU compiler writes as convolutions with windows
  over the batch and head dims, count exactly the matmul FLOPs (by hand), within XLA's own
  count (which adds the elementwise work)."""
  env = {**os.environ, "JAX_PLATFORMS": ""}
  result = subprocess.run([sys.executable, "-c", TPU_PROGRAM], capture_output=True, text=True,
                          timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  b, t, n, h, d = 8, 256, 8, 128, 256
  # Scores and probs @ v: forward + two backward matmuls each. The projection's output only
  # meets the cotangent, so only its two backward matmuls run (d o = c wᵀ, d w = oᵀ c).
  by_hand = (3 * 2 * (2 * b * n * t * t * h) + 2 * (2 * b * t * n * h * d)) / 4  # per device
  assert hlo_cost.module_cost(out["hlo"], num_devices=4)["flops"] == by_hand
  assert by_hand <= out["xla_flops"] <= 1.1 * by_hand


# A Pallas kernel's custom call prints its backend config over several lines; the instructions
# after it (a matmul and an all-gather inside a loop of 3) belong to the same computation.
MULTILINE = """HloModule m, entry_computation_layout={()->f32[]}

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,16]{1,0} get-tuple-element(%p), index=1
  %k = bf16[8,16]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "TUxJUgA=",
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="splash"}
  %w = bf16[16,16]{1,0} constant({...})
  %y = bf16[8,16]{1,0} dot(%k, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = bf16[32,16]{1,0} all-gather(%y), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8,16]{1,0}) tuple(%i2, %y)
}

%cond (q: (s32[], bf16[8,16])) -> pred[] {
  %q = (s32[], bf16[8,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: bf16[8,16]) -> f32[] {
  %a = bf16[8,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,16]{1,0}) tuple(%zero, %a)
  %loop = (s32[], bf16[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_instructions_after_a_multiline_custom_call_are_read():
  from dmpo_jax import hlo_collectives  # pylint: disable=import-outside-toplevel
  out = hlo_cost.module_cost(MULTILINE, num_devices=4)
  assert out["kernel_calls"] == 3
  assert out["flops"] == 3 * 2 * 8 * 16 * 16
  gathered = 8 * 16 * 2  # one device's bf16 [8, 16]
  assert out["collectives"]["all-gather"] == {"count": 3, "operand_bytes": 3 * gathered,
                                              "ici_bytes": 3 * 3 * gathered}
  # The collective reader of `benchmarks/memory.py` is the same parser: same count, same bytes.
  (item,) = hlo_collectives.collectives(MULTILINE, num_devices=4)
  assert (item.name, item.executions, item.payload_bytes) == ("g", 3, 4 * gathered)
  assert item.ici_bytes * item.executions == out["ici_bytes"]


# The sampler's layer loop on a resident weight stack: XLA fuses the layer's dynamic-slice of
# the stacked weights [6, 128, 512] into the matmul fusion as a nested fusion.
NESTED_SLICE = """HloModule m, entry_computation_layout={()->bf16[16,512]}

%slice_layer (w.1: bf16[6,128,512], i.1: s32[]) -> bf16[128,512] {
  %w.1 = bf16[6,128,512]{2,1,0} parameter(0)
  %i.1 = s32[] parameter(1)
  %z.1 = s32[] constant(0)
  %ds = bf16[1,128,512]{2,1,0} dynamic-slice(%w.1, %i.1, %z.1, %z.1), dynamic_slice_sizes={1,128,512}
  ROOT %b = bf16[128,512]{1,0} bitcast(%ds)
}

%matmul (x.2: bf16[16,128], w.2: bf16[6,128,512], i.2: s32[]) -> bf16[16,512] {
  %x.2 = bf16[16,128]{1,0} parameter(0)
  %w.2 = bf16[6,128,512]{2,1,0} parameter(1)
  %i.2 = s32[] parameter(2)
  %layer = bf16[128,512]{1,0} fusion(%w.2, %i.2), kind=kLoop, calls=%slice_layer
  ROOT %y = bf16[16,512]{1,0} dot(%x.2, %layer), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[16,128], w: bf16[6,128,512], i: s32[]) -> bf16[16,512] {
  %x = bf16[16,128]{1,0} parameter(0)
  %w = bf16[6,128,512]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = bf16[16,512]{1,0} fusion(%x, %w, %i), kind=kOutput, calls=%matmul
}
"""


def test_a_slice_in_a_nested_fusion_reads_one_layer():
  out = hlo_cost.module_cost(NESTED_SLICE, num_devices=1)
  layer = 128 * 512 * 2
  # x and one layer in (+ the index, read by the fusion's parameter), y out: not all 6 layers.
  assert out["hbm_bytes"] == 16 * 128 * 2 + layer + 4 + 16 * 512 * 2
  assert out["flops"] == 2 * 16 * 512 * 128
