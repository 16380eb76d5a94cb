"""benchmarks/demo.py's reading of metrics.jsonl and its summary, on hand-written files (the
benchmark itself runs full demos and is not run by the tests)."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import demo  # noqa: E402  pylint: disable=wrong-import-position


def test_accuracy_curve_and_summary(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  rows = [{"step": 0, "eval/accuracy": 10.0, "sft/loss": 1.0}, {"step": 5, "train/reward": 0.3},
          {"step": 10, "eval/accuracy": 50.0}, {"step": 10, "eval/accuracy": 55.0},  # re-written
          {"step": 20, "eval/accuracy": 80.0}]
  metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert demo.accuracy_curve(metrics) == [(0, 10.0), (10, 55.0), (20, 80.0)]
  runs = [{"objective": "bgpo", "accuracy_after_warmup": 10.0, "accuracy_end_of_rl": 80.0, "wall_s": 60.0},
          {"objective": "bgpo", "accuracy_after_warmup": 20.0, "accuracy_end_of_rl": 90.0, "wall_s": 90.0},
          {"objective": "dmpo", "accuracy_after_warmup": 5.0, "accuracy_end_of_rl": 70.0, "wall_s": 50.0}]
  summary = demo.summarize(runs)
  assert summary["bgpo"] == {"num_runs": 2,
                             "accuracy_after_warmup": {"mean": 15.0, "min": 10.0, "max": 20.0},
                             "accuracy_end_of_rl": {"mean": 85.0, "min": 80.0, "max": 90.0},
                             "wall_s": {"mean": 75.0, "min": 60.0, "max": 90.0}}
  assert summary["dmpo"]["num_runs"] == 1 and summary["dmpo"]["wall_s"]["mean"] == 50.0
  metrics.write_text(json.dumps({"step": 10, "eval/accuracy": 50.0}) + "\n")
  with pytest.raises(ValueError, match="step 0"):
    demo.accuracy_curve(metrics)
  with pytest.raises(SystemExit):
    demo.main(["--seeds=0", "--bogus=1"])
