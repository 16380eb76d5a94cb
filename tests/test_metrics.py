"""Tests for dmpo_jax.metrics: JSONL/TensorBoard/W&B fan-out, resume, timers, statistics."""

import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dmpo_jax import metrics as M


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _tensorboard_scalars(logdir, tag):
  acc = event_accumulator.EventAccumulator(str(logdir), purge_orphaned_data=True)
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


# -- MetricWriter ----------------------------------------------------------------------------------

def test_jsonl_and_tensorboard_fan_out(tmp_path):
  with M.MetricWriter(tmp_path, config={"lr": 1e-6}) as writer:
    writer.write(1, {"reward/mean": 0.5, "loss": np.float32(2.0), "count": jnp.asarray(3), "ok": True})
    # Readable immediately (flushed per write): a crash after this line loses nothing.
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.5, "loss": 2.0, "count": 3.0, "ok": 1.0}]
    writer.write(2, {"reward/mean": 0.75})
    writer.write(2, {"eval/accuracy": 0.25})
  assert len(_lines(tmp_path / "metrics.jsonl")) == 3
  assert M.read_metrics(tmp_path) == [
      {"step": 1, "reward/mean": 0.5, "loss": 2.0, "count": 3.0, "ok": 1.0},
      {"step": 2, "reward/mean": 0.75, "eval/accuracy": 0.25}]
  assert _tensorboard_scalars(tmp_path / "tensorboard", "reward/mean") == [(1, 0.5), (2, 0.75)]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert "config" in acc.Tags()["tensors"]


def test_resume_drops_steps_after_resume_step_and_torn_lines(tmp_path):
  with M.MetricWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write(step, {"x": step * 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "x": 6.')  # torn line of a crashed run
  # Resume from the checkpoint at step 3: steps 4, 5 (and the torn 6) are recomputed.
  with M.MetricWriter(tmp_path, resume_step=3) as writer:
    writer.write(4, {"x": 40.0})
  assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
  assert M.read_metrics(tmp_path)[-1] == {"step": 4, "x": 40.0}
  # TensorBoard purges the orphaned points 4, 5 of the first run.
  assert _tensorboard_scalars(tmp_path / "tensorboard", "x") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  # resume_step=None appends (only unreadable lines are removed).
  with M.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(5, {"x": 50.0})
  assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_only_process_zero_writes(tmp_path):
  with M.MetricWriter(tmp_path / "p1", process_index=1) as writer:
    writer.write(1, {"x": 1.0})
    writer.write_text(1, "sample", "hello")
  assert not (tmp_path / "p1").exists()


def test_bad_metric_values_are_named(tmp_path):
  with M.MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match=r"'reward' must be a scalar.*\(2,\)"):
      writer.write(1, {"reward": np.ones(2)})
    with pytest.raises(TypeError, match="'name' must be a number"):
      writer.write(1, {"name": "dmpo"})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 1})
    with pytest.raises(TypeError, match="step must be an int"):
      writer.write(1.5, {"x": 1.0})
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty/metrics.jsonl not found"):
    M.read_metrics(tmp_path / "empty")


def test_wandb_absent_is_a_warning_and_present_is_used(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with M.MetricWriter(tmp_path / "absent", wandb=True, tensorboard=False) as writer:
    assert not writer.wandb_enabled
    writer.write(1, {"x": 1.0})
  assert "wandb" in caplog.text

  calls = []

  class FakeRun:
    id = "run123"

    def log(self, values, step):
      calls.append(("log", dict(values), step))

    def finish(self):
      calls.append(("finish",))

  def fake_init(**kwargs):
    calls.append(("init", kwargs["project"], kwargs["id"], kwargs["config"]))
    return FakeRun()

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init))
  with M.MetricWriter(tmp_path / "w", wandb=True, wandb_project="dmpo", tensorboard=False,
                      config={"lr": 0.1}) as writer:
    assert writer.wandb_enabled
    writer.write(3, {"x": 2.0})
  assert calls == [("init", "dmpo", None, {"lr": 0.1}), ("log", {"x": 2.0}, 3), ("finish",)]
  # A resumed run re-attaches to the same W&B run id.
  calls.clear()
  M.MetricWriter(tmp_path / "w", wandb=True, tensorboard=False, resume_step=3).close()
  assert calls[0] == ("init", None, "run123", None)


# -- progress and timing ---------------------------------------------------------------------------

def test_phase_timer_accumulates_with_fake_clock():
  now = [0.0]
  timer = M.PhaseTimer(clock=lambda: now[0])
  with timer.phase("rollout"):
    now[0] += 2.5
  with timer.phase("train"):
    now[0] += 1.0
  with timer.phase("rollout"):
    now[0] += 0.5
  with pytest.raises(RuntimeError):
    with timer.phase("eval"):
      now[0] += 0.25
      raise RuntimeError("the time until the error still counts")
  assert timer.counts == {"rollout": 2, "train": 1, "eval": 1}
  assert timer.metrics() == {"time/rollout": 3.0, "time/train": 1.0, "time/eval": 0.25}
  assert timer.metrics() == {}


def test_progress_bar(capsys):
  bar = M.ProgressBar(10, initial=2, disable=False, postfix_keys=("loss",))
  bar.update(5, {"loss": 0.125, "ignored": 1.0})
  assert bar.n == 5
  bar.close()
  err = capsys.readouterr().err
  assert "5/10" in err and "loss=0.125" in err and "ignored" not in err
  # Auto mode under pytest (stderr captured, not a TTY) is disabled, as on process > 0.
  assert M.ProgressBar(10).disabled
  assert M.ProgressBar(10, process_index=1).disabled


# -- statistics ------------------------------------------------------------------------------------

def test_throughput():
  assert M.tokens_per_second(1000, 4.0) == 250.0
  with pytest.raises(ValueError, match="positive"):
    M.tokens_per_second(10, 0.0)


# -- launch/plot.py --------------------------------------------------------------------------------

def _load_plot_module():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "launch" / "plot.py"
  spec = importlib.util.spec_from_file_location("dmpo_plot", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
  assert data[12:16] == b"IHDR"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), len(data)


def test_plot_cli_writes_png(tmp_path):
  import subprocess
  with M.MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in range(1, 21):
      writer.write(step, {"reward/mean": step / 20, "reward/std": 0.1})
      if step % 5 == 0:
        writer.write(step, {"eval/accuracy": step / 40})
  script, _ = _load_plot_module()
  output = tmp_path / "out" / "curves.png"
  result = subprocess.run([sys.executable, str(script), f"--workdir={tmp_path}", f"--output={output}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  width, height, nbytes = _png_size(output)
  assert (width, height) == (1200, 400)  # two 6x4 inch panels at 100 dpi
  assert nbytes > 10_000


def test_plot_errors_and_single_panel(tmp_path, capsys):
  _, plot = _load_plot_module()
  assert plot.main([f"--workdir={tmp_path}"]) == 2
  assert "metrics.jsonl not found" in capsys.readouterr().err
  with M.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {"loss": 1.0})
  with pytest.raises(ValueError, match=r"none of the plotted keys.*keys present: \['loss'\]"):
    plot.plot_curves(tmp_path)
  with M.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(2, {"eval/accuracy": 0.5})
    writer.write(3, {"eval/accuracy": 0.75})
  width, height, _ = _png_size(plot.plot_curves(tmp_path))
  assert (width, height) == (600, 400)
