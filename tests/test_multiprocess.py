"""Two processes of `launch/train.py --distributed` on one machine (CPU, one device each, gloo
collectives, localhost coordinator), the path Cloud TPU pod jobs take: the metrics equal a
single-process run on two devices with the same global batch, only process 0 writes metrics,
and checkpoints save and resume from both processes."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dmpo_jax import checkpointing
from tests.helpers.small_runs import metrics_without_times, small_config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
# SFT warm-up, initial held-out eval, 2 RL steps (global batch 4 prompts x 4), checkpoint each step.
RUN = {"sft.num_steps": 2, "sft.batch_size": 16, "num_steps": 3, "updates_per_rollout": 1,
       "eval.every_steps": 0, "eval.num_examples": 16, "eval.batch_size": 16,
       "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 4}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, devices, overrides, distributed=None):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/demo.py",
         f"--workdir={workdir}", "--plot=false"] + small_config_flags(**{**RUN, **overrides})
  if distributed:
    port, pid = distributed
    cmd += ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={pid}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _results(process):
  try:
    stdout, stderr = process.communicate(timeout=600)
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  assert process.returncode == 0, stderr[-4000:]
  return json.loads(stdout[stdout.index("{"):])


def _run_pair(workdir, overrides):
  port = _free_port()
  pair = [_start(workdir, 1, overrides, (port, pid)) for pid in (0, 1)]
  try:
    return [_results(p) for p in pair]
  finally:
    for p in pair:
      if p.poll() is None:
        p.kill()
        p.communicate()


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
  single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
  single = _start(single_dir, 2, {})
  try:
    first = _run_pair(multi_dir, {"num_steps": 2})  # stops after step 2 ...
    assert "final_model" in first[0] and "final_model" not in first[1]
    steps = sorted(int(p.name) for p in (multi_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2]
    second = _run_pair(multi_dir, {})  # ... and both processes resume from it to step 3
    assert "eval/accuracy_start" not in second[0]  # resumed: no fresh warm-up / initial eval
  finally:
    single_results = _results(single)

  # Only process 0 writes metrics: one row per step, none duplicated.
  multi_rows, single_rows = metrics_without_times(multi_dir), metrics_without_times(single_dir)
  assert [r["step"] for r in multi_rows] == [0, 1, 2, 3]
  assert len(list(multi_dir.glob("metrics*.jsonl"))) == 1
  # The same numbers as one process on two devices with the same global batch.
  assert multi_rows == single_rows, (multi_rows, single_rows)
  assert all(r["train/grad_norm"] > 0 for r in multi_rows[1:])
  # The trained models (written cooperatively by both processes) are bit-identical.
  a = nnx.split(checkpointing.load_model_checkpoint(single_results["final_model"]))[1]
  b = nnx.split(checkpointing.load_model_checkpoint(second[0]["final_model"]))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)
