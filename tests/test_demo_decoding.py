"""`benchmarks/demo_decoding.py` end to end on a saved tiny model (random weights, so the
accuracy is about 0; the point is the modes, the NFE accounting and the JSON)."""

import json
import pathlib
import subprocess
import sys

import pytest

from dmpo_jax import checkpointing
from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model, split_model

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_mode_reports_accuracy_and_counted_nfe(tmp_path):
  config = get_preset("tiny", initializer_range=0.1)
  model = create_model(config, 0)
  checkpointing.save_model_checkpoint(tmp_path / "model", split_model(model)[1], config)
  result = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "demo_decoding.py"),
       f"--checkpoint={tmp_path / 'model'}", "--thresholds=0.9", "--factors=1.0", "--repeats=1",
       "--num_examples=16"],
      capture_output=True, text=True, timeout=900, cwd=tmp_path,
      env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  rows = {r["mode"]: r for r in lines if "mode" in r}
  assert list(rows) == ["standard", "prefix_cache", "dual_cache", "threshold 0.9",
                        "dual_cache+threshold 0.9", "factor 1.0", "dual_cache+factor 1.0"]
  for row in rows.values():
    assert row["num_examples"] == 16 and 0 <= row["accuracy"] <= 100
    # One block of 5 tokens: between 1 and 5 passes; the batch runs until its slowest row is
    # done. (A random model can commit the mask id itself, which is committed again later: the
    # per-row count from the trace then misses that step, so only <= holds here.)
    assert 1 <= row["nfe_per_sequence"] <= row["nfe_per_sequence_max"] <= row["nfe_batched"] <= 5
  assert rows["standard"]["nfe_batched"] == 5 and rows["standard"]["relative_flops"] == 1.0
  assert rows["dual_cache"]["relative_flops"] < 1.0  # later passes run the block's 5 queries only
  assert "checkpoint" in lines[-1] and lines[-1]["seed"] == 0
