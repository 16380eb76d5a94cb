"""`benchmarks/gpu_check.sh` runs end to end on CPU with the tiny preset and small shapes (every
step exits 0 and writes its JSON lines to $OUT), and a step that does not fit the remaining
budget is skipped, not started. Without grain and ml_collections (not on the GPU machine)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"GPU_CHECK_PRESET": "tiny", "GPU_CHECK_TRAIN_PRESET": "tiny", "GPU_CHECK_BATCH": "2",
         "GPU_CHECK_PROMPT": "8", "GPU_CHECK_GEN": "64", "GPU_CHECK_STEPS": "32",
         "GPU_CHECK_TRAIN_BATCH": "4", "GPU_CHECK_TRAIN_PROMPT": "8", "GPU_CHECK_TRAIN_GEN": "16",
         "GPU_CHECK_ATTENTION": "--seq=128 --heads=4 --head_dim=16 --batch=2 --pad=20",
         "GPU_CHECK_ATTENTION_IMPLS": "xla,splash", "JAX_PLATFORMS": "cpu"}
STEPS = ["machine", "attention", "sampler_standard_prefix", "sampler_dual", "train_step",
         "sampler_threshold", "sampler_factor", "sampler_standard_xla_attention"]


def _without_grain_and_ml_collections(tmp_path):
  """A sitecustomize that makes `import grain` / `import ml_collections` fail, as on the GPU
  machine, for every Python process the script starts."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(textwrap.dedent("""
      import importlib.abc, sys
      class _Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in ("grain", "ml_collections"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the GPU machine)")
      sys.meta_path.insert(0, _Missing())
  """))
  return str(site)


def _run(tmp_path, **env):
  out = tmp_path / "out"
  full_env = {**os.environ, **SMALL, **env, "OUT": str(out),
              "PYTHONPATH": _without_grain_and_ml_collections(tmp_path)}
  result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True,
                          text=True, env=full_env, timeout=1800, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
  return rows, result.stderr


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_cpu(tmp_path):
  # The steps' caps are sized for the GPU; on a shared CPU each may take several times longer.
  rows, stderr = _run(tmp_path, GPU_CHECK_BUDGET_S="6000", GPU_CHECK_CAP_SCALE="10")
  steps = {r["step"]: r for r in rows if "step" in r}
  assert list(steps) == STEPS, stderr[-3000:]
  assert all(s["exit_code"] == 0 for s in steps.values()), steps
  modes = [r["mode"] for r in rows if "mode" in r]
  assert modes == ["standard", "prefix_cache", "dual_cache", "dual_cache+threshold", "threshold",
                   "factor", "standard"]
  sampler_rows = [r for r in rows if "mode" in r]
  assert all(r["warmup_calls"] == 1 and r["forward_passes"] >= 1 for r in sampler_rows)
  assert sampler_rows[-1]["attention_impl"] == "xla"
  attention = [r for r in rows if "impl" in r]
  assert [a["impl"] for a in attention] == ["xla", "splash"] and attention[1]["ok"], attention
  train = next(r for r in rows if "objective" in r)
  assert train["preset"] == "tiny" and train["time_update_s"] > 0 and "mfu_update" in train
  assert "# [" in stderr and "done in" in stderr


def test_gpu_check_skips_what_does_not_fit_the_budget(tmp_path):
  rows, stderr = _run(tmp_path, GPU_CHECK_BUDGET_S="12")
  steps = {r["step"]: r for r in rows if "step" in r}
  assert list(steps) == STEPS
  # 12 s minus the 5 s margin leaves less than any step's minimum: nothing starts.
  assert all(s.get("skipped") == "budget" for s in steps.values()), steps
  assert "skip sampler_standard_prefix" in stderr
