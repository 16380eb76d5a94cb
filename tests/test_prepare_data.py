"""launch/prepare_data.py offline: a local mirror in the hub's layout (parquet shards named
``<split>-00000-of-00001.parquet`` under the config folder, MATH-500's root ``test.jsonl``, raw
GitHub files by URL path) is built from tests/fixtures/data; the script must write back a data
folder that every task loader reads exactly as it reads the fixture folder.

Needs the `datasets` package (the `data` extra; the `test` extra includes it). Nothing else in the
suite imports it.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from dmpo_jax.tasks import base, get_task, hub_sources
from dmpo_jax.tasks.code_tasks import MBPP_SPLITS

pytest.importorskip("datasets", reason="launch/prepare_data.py needs `datasets` "
                    "(pip install -e \".[data]\")")
import pyarrow  # noqa: E402  pylint: disable=wrong-import-position
import pyarrow.parquet as pq  # noqa: E402  pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parquet(rows, path: pathlib.Path, schema=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pyarrow.Table.from_pylist(rows, schema=schema), path)


def _copy(source: pathlib.Path, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy(source, path)


def _mirror_path(mirror: pathlib.Path, spec: hub_sources.DataFile) -> pathlib.Path:
  if spec.is_url:
    return mirror / spec.source.split("://", 1)[1]
  return mirror / spec.source / (spec.config or "")


def _hub_readme(folder: pathlib.Path, configs) -> None:
  """The YAML header a hub repository's README.md uses to map configs and splits to files."""
  lines = ["---", "configs:"]
  for config, splits in configs.items():
    lines += [f"- config_name: {config}", "  data_files:"]
    for split in splits:
      lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "README.md").write_text("\n".join(lines + ["---", "", "Test mirror.", ""]))


def build_mirror(fixture: pathlib.Path, mirror: pathlib.Path) -> None:
  """The hub layout of every source in `hub_sources.DATA_FILES`, with the fixture's rows."""
  specs = {spec.path: spec for specs in hub_sources.DATA_FILES.values() for spec in specs}
  shard = "{}-00000-of-00001.parquet"
  _hub_readme(mirror / "openai" / "gsm8k", {"main": ("train", "test")})
  _hub_readme(mirror / "google-research-datasets" / "mbpp",
              {"sanitized": ("train", "test", "validation", "prompt")})
  _hub_readme(mirror / "openai" / "openai_humaneval", {"openai_humaneval": ("test",)})
  for name in ("train", "test"):
    rows = base.read_records(fixture / "gsm8k" / f"{name}.jsonl")
    _parquet(rows, _mirror_path(mirror, specs[f"gsm8k/{name}.jsonl"]) / shard.format(name))
  _parquet(base.read_records(fixture / "math" / "train.jsonl"),
           mirror / "ankner" / "math-500" / "data" / shard.format("train"))
  _copy(fixture / "math500" / "test.jsonl", mirror / "HuggingFaceH4" / "MATH-500" / "test.jsonl")
  countdown_rows = base.read_records(fixture / "countdown" / "train.jsonl")
  # A 4-number row, which prepare_data drops (d1 trains on three numbers).
  countdown_rows.insert(1, {"nums": [1, 2, 3, 4], "target": 24})
  _parquet(countdown_rows, mirror / "Jiayi-Pan" / "Countdown-Tasks-3to4" / "data" / shard.format("train"))
  for relative in ("countdown/cd3_test.jsonl", "sudoku/d1_4x4_test.csv", "sudoku/spg_4x4_test.csv"):
    _copy(fixture / relative, _mirror_path(mirror, specs[relative]))
  mbpp = base.read_records(fixture / "mbpp" / "sanitized-mbpp.json")
  folder = _mirror_path(mirror, specs["mbpp/sanitized-mbpp.json"])
  schema = pyarrow.Table.from_pylist(mbpp).schema  # one schema for all splits, as on the hub
  for split in ("prompt", "train", "validation", "test"):
    low, high = MBPP_SPLITS[split]
    # Reversed, so the written file is in task-id order only because prepare_data sorts it.
    _parquet([r for r in reversed(mbpp) if low <= r["task_id"] <= high], folder / shard.format(split),
             schema)
  _parquet(base.read_records(fixture / "humaneval" / "test.jsonl"),
           mirror / "openai" / "openai_humaneval" / "openai_humaneval" / shard.format("test"))


def _run(args, tmp_path):
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
         "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  return subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), *args],
                        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_prepare_data_from_a_hub_mirror(fixture_data_dir, tmp_path):
  mirror, out = tmp_path / "mirror", tmp_path / "out"
  build_mirror(fixture_data_dir, mirror)
  result = _run(["--task=all", f"--out={out}", f"--mirror={mirror}"], tmp_path)
  assert result.returncode == 0, result.stderr
  reports = [json.loads(line) for line in result.stdout.splitlines()]
  written = {r["file"]: r["rows"] for r in reports}
  expected_rows = {"gsm8k/train.jsonl": 3, "gsm8k/test.jsonl": 2, "math/train.jsonl": 3,
                   "math500/test.jsonl": 3, "countdown/train.jsonl": 3,
                   "countdown/cd3_test.jsonl": 3, "sudoku/d1_4x4_test.csv": 3,
                   "sudoku/spg_4x4_test.csv": 2, "mbpp/sanitized-mbpp.json": 7,
                   "humaneval/test.jsonl": 2}
  assert written == {str(out / k): v for k, v in expected_rows.items()}
  # Every loader reads the prepared folder exactly as the hand-written one.
  for name in ("gsm8k", "math", "countdown", "sudoku", "mbpp"):
    task = get_task(name)
    assert task.load_eval(data_dir=out) == task.load_eval(data_dir=fixture_data_dir), name
  for name in ("gsm8k", "math", "mbpp"):
    task = get_task(name)
    assert task.load_train(data_dir=out) == task.load_train(data_dir=fixture_data_dir), name
  mbpp = get_task("mbpp")
  assert mbpp.load_eval(data_dir=out, split="all") == mbpp.load_eval(data_dir=fixture_data_dir,
                                                                      split="all")
  for relative in ("countdown/train.jsonl", "sudoku/spg_4x4_test.csv", "humaneval/test.jsonl"):
    assert base.read_records(out / relative) == base.read_records(fixture_data_dir / relative)
  # Existing files are kept unless --overwrite.
  again = _run(["--task=sudoku", f"--out={out}", f"--mirror={mirror}"], tmp_path)
  assert again.returncode == 0 and again.stdout.count("exists") == 2


@pytest.mark.slow
def test_prepare_data_errors(fixture_data_dir, tmp_path):
  result = _run([f"--out={tmp_path / 'out'}"], tmp_path)
  assert result.returncode == 2 and result.stderr.startswith("error: --task is required")
  result = _run(["--task=gsm8k,nope", f"--out={tmp_path / 'out'}"], tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: unknown task(s) ['nope']; known: {sorted(hub_sources.DATA_FILES)} or 'all'"]
  result = _run(["--task=gsm8k", f"--out={tmp_path / 'out'}", f"--mirror={tmp_path / 'empty'}"],
                tmp_path)
  assert result.returncode == 2 and "mirror folder" in result.stderr
  assert "openai/gsm8k" in result.stderr and "Traceback" not in result.stderr
  # Rows the task cannot read (no 'answer' column) are refused; nothing is left in the folder.
  mirror = tmp_path / "bad"
  _hub_readme(mirror / "openai" / "gsm8k", {"main": ("train", "test")})
  _parquet([{"question": "q", "response": "7"}],
           mirror / "openai" / "gsm8k" / "main" / "train-00000-of-00001.parquet")
  _parquet([{"question": "q2", "response": "8"}],
           mirror / "openai" / "gsm8k" / "main" / "test-00000-of-00001.parquet")
  result = _run(["--task=gsm8k", f"--out={tmp_path / 'out'}", f"--mirror={mirror}"], tmp_path)
  assert result.returncode == 2 and "does not give valid gsm8k rows" in result.stderr
  assert not list((tmp_path / "out").rglob("*.jsonl*"))
