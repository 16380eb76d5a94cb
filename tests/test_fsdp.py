"""Batch-split FSDP (`docs/scaling.md`): the HLO collective reader, the sampling layout's choice,
and on 8 fake CPU devices the published programs at their shapes with the `tiny` model.

The compile checks run `benchmarks/memory.py` in subprocesses (the device count is fixed at jax
import): no collective of the optimized HLO carries an activation of every row, and the compiled
temp memory falls at least 3.3× from 2 to 8 devices.
"""

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import pytest

from dmpo_jax import hlo_collectives, sampling_layout, sharding
from dmpo_jax.models.config import get_preset

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024 ** 3

# A module in the form of XLA's optimized HLO text: an outer loop with a known trip count (3)
# around an inner `counter < 4` loop, an async all-reduce, and a loop whose count is unknown.
HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_cond (p.1: (s32[], f32[16,4,8])) -> pred[] {
  %p.1 = (s32[], f32[16,4,8]{2,1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  %n = s32[]{:T(128)} constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_body (p.2: (s32[], f32[16,4,8])) -> (s32[], f32[16,4,8]) {
  %p.2 = (s32[], f32[16,4,8]{2,1,0}) parameter(0)
  %x = f32[16,4,8]{2,1,0} get-tuple-element(%p.2), index=1
  %ag = f32[128,4,8]{2,1,0} all-gather(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %w = bf16[128,2,8]{2,1,0} parameter(1)
  %agw = bf16[1024,2,8]{2,1,0} all-gather(%w), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[16,4,8]{2,1,0}) tuple(%i, %x)
}

%outer_cond (p.3: (s32[], f32[16,4,8])) -> pred[] {
  %p.3 = (s32[], f32[16,4,8]{2,1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (p.4: (s32[], f32[16,4,8])) -> (s32[], f32[16,4,8]) {
  %p.4 = (s32[], f32[16,4,8]{2,1,0}) parameter(0)
  %inner = (s32[], f32[16,4,8]{2,1,0}) while(%p.4), condition=%inner_cond, body=%inner_body
  %y = f32[16,4,8]{2,1,0} get-tuple-element(%inner), index=1
  %ars = f32[16,4,8]{2,1,0} all-reduce-start(%y), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  %ard = f32[16,4,8]{2,1,0} all-reduce-done(%ars)
  ROOT %t.2 = (s32[], f32[16,4,8]{2,1,0}) tuple(%i, %ard)
}

%open_cond (p.5: (s32[], s32[], f32[16,4,8])) -> pred[] {
  %p.5 = (s32[], s32[], f32[16,4,8]{2,1,0}) parameter(0)
  %j = s32[] get-tuple-element(%p.5), index=0
  %m = s32[] get-tuple-element(%p.5), index=1
  ROOT %lt.2 = pred[] compare(%j, %m), direction=LT
}

%open_body (p.6: (s32[], s32[], f32[16,4,8])) -> (s32[], s32[], f32[16,4,8]) {
  %p.6 = (s32[], s32[], f32[16,4,8]{2,1,0}) parameter(0)
  %z = f32[16,4,8]{2,1,0} get-tuple-element(%p.6), index=2
  %rs = f32[2,4,8]{2,1,0} reduce-scatter(%z), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
  ROOT %t.3 = (s32[], s32[], f32[16,4,8]{2,1,0}) tuple(%j, %m, %z)
}

ENTRY %main (arg: f32[16,4,8]) -> f32[] {
  %arg = f32[16,4,8]{2,1,0} parameter(0)
  %loop = (s32[], f32[16,4,8]{2,1,0}) while(%arg), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  %open = (s32[], s32[], f32[16,4,8]{2,1,0}) while(%arg), condition=%open_cond, body=%open_body
  ROOT %r = f32[] constant(0)
}
"""


def test_hlo_reader_counts_loop_trips_and_bytes():
  items = {c.name: c for c in hlo_collectives.collectives(HLO, unknown_trip_count=5)}
  assert sorted(items) == ["ag", "agw", "ars", "rs"]  # the -done half is not a second collective
  assert (items["ag"].opcode, items["ars"].opcode) == ("all-gather", "all-reduce")
  assert items["ag"].executions == 3 * 4 and items["agw"].executions == 12  # known 3 × (i < 4)
  assert items["ars"].executions == 3 and items["rs"].executions == 5  # count not in the program
  # Payload: the larger side; an all-gather's output, a reduce-scatter's input.
  assert items["ag"].payload_bytes == 128 * 4 * 8 * 4
  assert items["agw"].payload_bytes == 1024 * 2 * 8 * 2
  assert items["rs"].payload_bytes == 16 * 4 * 8 * 4
  total = sum(c.payload_bytes * c.executions for c in items.values())
  assert hlo_collectives.total_bytes(list(items.values())) == total
  # Rank >= 3 with the 128 global rows leading is an activation of every row; a weight of that
  # shape (given) is not.
  hits = hlo_collectives.full_batch_arrays(list(items.values()), rows=128)
  assert [c.name for c, _ in hits] == ["ag", "agw"]
  hits = hlo_collectives.full_batch_arrays(list(items.values()), 128, weight_shapes=[(128, 2, 8)])
  assert [c.name for c, _ in hits] == ["ag"]
  # Nor are token ids (XLA's embedding-gradient scatter gathers every row's ids).
  ids = hlo_collectives.Collective("ids", "all-gather", "main", (("s32", (16, 4, 1)),),
                                   (("s32", (128, 4, 1)),), 1, "")
  assert hlo_collectives.full_batch_arrays([ids], rows=128) == []
  assert hlo_collectives.summary(list(items.values()))["all-gather"] == {
      "count": 2, "executions": 24, "bytes": 12 * (128 * 4 * 8 * 4 + 1024 * 2 * 8 * 2)}


def test_sampling_tensor_size_is_the_smallest_that_fits():
  llada = get_preset("llada_8b")
  assert sampling_layout.valid_tensor_sizes(llada, 32) == [1, 2, 4, 8, 16, 32]
  assert sampling_layout.valid_tensor_sizes(get_preset("tiny"), 8) == [1, 2]  # 2 KV heads
  weights = 16_031_162_368  # LLaDA-8B in bf16
  # v5p (95 GiB per chip), 32 chips: 2.8 GiB of training state, a whole copy fits.
  assert sampling_layout.choose_tensor(llada, 32, weights, 95 * GIB, int(2.8 * GIB)) == 1
  # v4-32 (16 GiB per TensorCore): half of 16 - 2.8 GiB is 6.6 GiB; 14.9 / 2 = 7.5 does not fit,
  # 14.9 / 4 = 3.7 does.
  assert sampling_layout.choose_tensor(llada, 32, weights, 16 * GIB, int(2.8 * GIB)) == 4
  # Unknown device memory (CPU): replicated.
  assert sampling_layout.choose_tensor(llada, 32, weights, None, 0) == 1
  with pytest.raises(ValueError, match="sampling_tensor=3"):
    sampling_layout.layout_for(sharding.create_mesh((1, 1, 1)), llada, 3, weights, 0)


def test_without_a_mesh_the_constraints_are_the_identity():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((4, 3, 2))
  assert sharding.constrain_batch(x) is x
  assert sharding.batch_partials((3, 2), None, 4) == (1, None)
  w = jnp.ones((4, 6), jnp.float32)
  assert sharding.gather_for_compute(w, ("embed", "mlp"), jnp.bfloat16).dtype == jnp.bfloat16


def _run(args, devices=None, timeout=900):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _plan(config, programs, devices):
  return _run([str(REPO / "benchmarks" / "memory.py"), f"--config=configs/{config}.py",
               f"--num_devices={devices}", f"--programs={programs}",
               "--override=model.preset=tiny", "--override=model.init=random"])


# (config, programs): the update, sampler and SFT step of bgpo_math (128 rows x 1024 tokens, SFT
# 64 rows) and DMPO's prepare of dmpo_gsm8k (128 rows x 456 tokens).
PLANS = [("bgpo_math", "update,sampler,sft"), ("dmpo_gsm8k", "prepare")]


@pytest.mark.slow
def test_published_programs_split_activations_over_the_batch():
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    plans = {(config, devices): pool.submit(_plan, config, programs, devices)
             for config, programs in PLANS for devices in (2, 8)}
    plans = {key: future.result() for key, future in plans.items()}
  for config, _ in PLANS:
    two, eight = plans[(config, 2)], plans[(config, 8)]
    assert eight["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for name, program in eight["programs"].items():
      # (a) no collective carries an activation of all rows (rank >= 3, the rows leading);
      assert program["full_batch_collectives"] == [], (config, name, program)
      # (b) per-device scratch memory falls with the rows per device.
      ratio = two["programs"][name]["temp"] / program["temp"]
      assert ratio >= 3.3, (config, name, two["programs"][name]["temp"], program["temp"])
  # The sampler runs on the replicated sampling copy: no collective in its denoising steps.
  sampler = plans[("bgpo_math", 8)]["programs"]["sampler"]
  assert plans[("bgpo_math", 8)]["sampling_mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sampler["collective_bytes_per_step"] == 0, sampler


@pytest.mark.slow
def test_sampling_layout_and_gradient_reduction_on_8_devices():
  out = _run([str(REPO / "tests" / "helpers" / "fsdp_check.py"), "sampler", "reduce"])
  one, two = out["sampler"]["tensor1"], out["sampler"]["tensor2"]
  # The sampling copy gives the single-device tokens: replicated (8 data-parallel groups) ...
  assert one["equal"] and one["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert one["q_proj_spec"] == "P(None, None, None, None)" and one["rows_spec"] == "P('data',)"
  assert one["collectives"] == [] and one["bytes_per_step"] == 0
  # ... and split over tensor groups of 2 (4 groups): heads and vocabulary split, rows over data;
  # a step all-reduces activations of its own rows within a group and gathers no weight.
  assert two["equal"] and two["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert two["q_proj_spec"] == "P(None, None, 'tensor', None)"
  assert two["embed_spec"] == "P('tensor', None)"
  assert "all-reduce (('f32', (2, 28, 64)),)" in two["collectives"], two  # 2 rows, 12 + 16 tokens
  assert all(c.startswith("all-reduce") or "(2, 8, 1)" in c for c in two["collectives"]), two
  # Weight gradients: reduced in the compute dtype by default, in fp32 with the option; both
  # equal the single-device bf16 gradient within one bf16 rounding of its largest entry.
  reduce = out["reduce"]
  assert reduce["compute"]["reduce_dtypes"] == ["bf16"]
  assert reduce["float32"]["reduce_dtypes"] == ["f32"]
  for r in reduce.values():
    assert r["grad_dtype"] == "bfloat16"
    assert r["q_proj_max_diff"] <= 2 ** -8 * r["q_proj_max"], r
