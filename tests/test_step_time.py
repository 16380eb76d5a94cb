"""`benchmarks/step_time.py`: the analytic sampler FLOPs equal the matmul FLOPs read from the
compiled sampler (every cache), the roofline arithmetic, and the table / re-analysis of runs."""

import gzip
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import hlo_cost  # noqa: E402
import memory  # noqa: E402
import step_time  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cache", ["none", pytest.param("prefix", marks=pytest.mark.slow),
                                   pytest.param("dual", marks=pytest.mark.slow)])
def test_sampler_model_flops_equal_the_compiled_matmuls(cache, tmp_path):
  # The demo's rollout (tiny model, 128 rows, prompt 5, 10 generated tokens in 2 blocks of 5,
  # 2 steps per block), compiled for this CPU; the head runs on the block only.
  config = memory.load_config(str(REPO / "configs" / "demo.py"),
                              [f"rollout.cache={cache}", "rollout.gen_length=10",
                               "rollout.steps=4", "eval.gen_length=10", "eval.steps=4"])
  run = step_time.step_time(config, jax.devices(), {"data": 1, "fsdp": 1, "tensor": 1},
                            step_time.CHIPS["v5p"], ["sampler"], hlo_dir=str(tmp_path),
                            hlo_prefix="demo")
  sampler = run["programs"]["sampler"]
  assert sampler["hlo"]["flops"] == sampler["model_flops"] > 0
  assert run["step"]["denoising_steps"] == 4
  # The HLO was kept: the same cost again from the file.
  with gzip.open(tmp_path / "demo_sampler.hlo.gz", "rt") as f:
    again = hlo_cost.module_cost(f.read(), 1, run["unknown_trip_counts"]["sampler"])
  assert again["flops"] == sampler["hlo"]["flops"]


def test_roofline_terms_and_devices_sharing_a_chip():
  chip = step_time.Chip("test", peak_bf16_flops=100.0, hbm_bytes_per_s=10.0, ici_bytes_per_s=5.0,
                        source="-")
  hlo = {"flops": 200.0, "hbm_bytes": 30.0, "ici_bytes": 5.0}
  one = step_time.roofline(hlo, None, 1, chip, 1.0)
  assert (one["compute_s"], one["hbm_s"], one["ici_s"]) == (2.0, 3.0, 1.0)
  assert one["bound_s"] == 3.0 and one["serial_s"] == 6.0 and one["limited_by"] == "hbm"
  # The analytic count is the floor of the compute term (kernels the HLO cannot see).
  assert step_time.roofline(hlo, 1000.0, 2, chip, 1.0)["compute_s"] == 5.0
  # Two devices per chip get half a chip each.
  assert step_time.roofline(hlo, None, 2, chip, 2.0)["hbm_s"] == 6.0


def test_table_lists_runs_and_failures(tmp_path):
  path = tmp_path / "runs.jsonl"
  run = {"config": "bgpo_math.py", "topology": "v5p:2x2x1", "chips": 4, "attention_impl": "xla",
         "updates_per_rollout": 1,
         "step": {"sampler_s": 10.0, "prepare_s": 0.5, "update_s": 20.0, "bound_s": 30.5,
                  "serial_s": 40.0, "mfu_bound": 0.5, "mfu_serial": 0.25,
                  "per_denoising_step": {"bound_s": 0.0391, "ici_bytes": 2.5e9}},
         "programs": {p: {"time": {"limited_by": "compute"}} for p in ("sampler", "prepare", "update")}}
  failed = {"config": "dmpo_gsm8k.py", "topology": "v4:2x2x4", "error": "Check failed: x"}
  path.write_text(json.dumps(run) + "\n" + json.dumps(failed) + "\n")
  rows = step_time.table(str(path)).splitlines()
  assert rows[2].startswith("| bgpo_math | v5p-8 `v5p:2x2x1` (4) | xla | 10.0 | 0.039 (2.5) | 0.5 | "
                            "20.0 (x1) | 30.5 | 40.0 | 50.0 % | 25.0 % | compute / compute / compute |")
  assert "compile failed: Check failed: x" in rows[3]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "jax[tpu]==<jax version>")')
def test_auto_attention_is_the_splash_kernel_in_a_tpu_update(tmp_path):
  """Compiled for a TPU topology from this CPU host, the update (traced in its mesh context)
  runs `auto` attention as the splash kernel (a Mosaic custom call per layer pass), `xla` runs
  none; 128-token sequences (one tile)."""
  calls = {}
  for impl in ("auto", "xla"):
    out = tmp_path / f"{impl}.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--config=configs/demo.py",
         "--topology=v5e:2x2", "--programs=update", f"--output={out}",
         "--override=task.prompt_length=123", "--override=bgpo.num_mc=1",
         f"--override=model.attention_impl={impl}"],
        capture_output=True, text=True, timeout=1200, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(out.read_text())
    calls[impl] = run["programs"]["update"]["hlo"]["kernel_calls"]
    assert run["attention_resolved"] == ("splash" if impl == "auto" else "xla")
  assert calls["xla"] == 0 and calls["auto"] > 0, calls
