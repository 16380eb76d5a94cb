"""launch/eval.py end to end on a randomly initialised tiny model (byte tokenizer), and
launch/score.py on hand-written generations."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import score as score_script  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  from dmpo_jax import checkpointing
  from dmpo_jax.models.config import get_preset
  from dmpo_jax.models.transformer import create_model
  config = get_preset("tiny")
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  checkpointing.save_model_checkpoint(path, create_model(config, seed=0), config)
  return path


@pytest.mark.slow
def test_eval_end_to_end_sudoku(tiny_checkpoint, tmp_path, fixture_data_dir):
  from dmpo_jax.models.tokenizer import load_tokenizer
  import eval as eval_script  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  code = eval_script.main([f"--checkpoint={tiny_checkpoint}", "--task=sudoku", "--tokenizer=byte",
                           "--gen_lengths=32", "--block_length=32", "--steps=half",
                           "--batch_size=2", "--limit=3", f"--output_dir={out}",
                           f"--data_dir={fixture_data_dir}", "--no_progress"])
  assert code == 0
  for length in (32,):
    rows = [json.loads(l) for l in (out / f"sudoku_L{length}.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
      assert {"puzzle", "solution", "prompt", "completion", "score", "correct_cells",
              "empty_cells"} <= set(row)
      assert row["prompt"].endswith("<reasoning>")
      assert len(load_tokenizer("byte").encode(row["completion"])) <= length
    summary = json.loads((out / f"sudoku_L{length}_summary.json").read_text())
    assert summary["num_examples"] == 3 and summary["gen_length"] == length
    assert summary["steps"] == length // 2 and summary["block_length"] == 32
    assert 0.0 <= summary["cell_accuracy"] <= 100.0 and "solve_rate" in summary
  assert len(json.loads((out / "sudoku_summary.json").read_text())) == 1


def test_score_script_cli(tmp_path):
  rows = [{"completion": "<answer>\n\\boxed{3*5+7}\n</answer>", "numbers": [3, 5, 7], "target": 22},
          {"completion": "<answer>3+5+7</answer>", "numbers": "3,5,7", "target": 22}]
  path = tmp_path / "gen.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  result = subprocess.run([sys.executable, str(REPO / "launch" / "score.py"), "--task=countdown",
                           f"--input={path}", "--rewards", "--reward_style=d1"],
                          capture_output=True, text=True, check=True, timeout=120)
  lines = [json.loads(l) for l in result.stdout.splitlines()]
  assert [l["score"] for l in lines[:2]] == [1.0, 0.0]
  assert [l["reward"] for l in lines[:2]] == [0.1, 0.1]  # boxed inside <answer> is not an expression
  assert lines[-1]["accuracy"] == 50.0 and lines[-1]["mean_reward"] == pytest.approx(0.1)


def test_score_rows_sudoku_and_mbpp(fixture_data_dir):
  results, summary = score_script.score_rows(
      "sudoku", [{"completion": "<answer>1234342121434312</answer>", "puzzle": "1034002130004300",
                  "solution": "1234342121434312"}])
  assert results[0]["score"] == 1.0 and summary["cell_accuracy"] == 100.0
  # Rows that carry only a task_id are looked up in the data folder's MBPP file.
  results, summary = score_script.score_rows(
      "mbpp", [{"completion": "[BEGIN]\n 'def larger(a, b):\n  return max(a, b)' \n[DONE]", "task_id": 2},
               {"completion": "[BEGIN]\n 'def larger(a, b):\n  return min(a, b)' \n[DONE]", "task_id": 2}],
      data_dir=str(fixture_data_dir))
  assert [r["score"] for r in results] == [1.0, 0.0] and summary["accuracy"] == 50.0
  results, summary = score_script.score_rows("gsm8k", [{"completion": "x"}])
  assert results == [{"index": 0, "skipped": "KeyError: row 0 lacks field(s) ['answer'] needed by "
                                             "task gsm8k; has ['completion']"}]
  assert summary["skipped_rows"] == 1 and summary["num_examples"] == 0


def test_score_rows_mbpp_benchmark_file(benchmark_data_dir):
  results, _ = score_script.score_rows(
      "mbpp", [{"completion": "[BEGIN]\n 'def similar_elements(a, b):\n  return tuple(set(a) & set(b))' \n[DONE]",
                "task_id": 2}], data_dir=str(benchmark_data_dir))
  assert results[0]["score"] == 1.0


@pytest.mark.slow
def test_eval_script_eval_style_d1(tiny_checkpoint, tmp_path, fixture_data_dir):
  """launch/eval.py --eval_style=d1: every row's score is d1's (`d1_eval.score_row`)."""
  from dmpo_jax.tasks import d1_eval  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), f"--checkpoint={tiny_checkpoint}",
                  "--task=sudoku", "--tokenizer=byte", "--gen_lengths=32", "--block_length=32",
                  "--steps=half", "--batch_size=2", "--limit=2", f"--output_dir={out}",
                  f"--data_dir={fixture_data_dir}", "--no_progress", "--eval_style=d1"],
                 check=True, capture_output=True, timeout=600,
                 env={**os.environ, "PYTHONPATH": str(REPO)})
  rows = [json.loads(l) for l in (out / "sudoku_L32.jsonl").read_text().splitlines()]
  assert len(rows) == 2
  for row in rows:
    expected = d1_eval.score_row("sudoku", row["completion"], row)
    assert row["correct_cells"] == expected["correct_cells"]
    assert row["extracted"] == expected["extracted"]
  assert json.loads((out / "sudoku_L32_summary.json").read_text())["eval_style"] == "d1"


def test_score_script_scores_each_row_on_its_own(tmp_path):
  """Every kind of bad row is skipped with its row number and reason, counted in the summary;
  the good rows are scored as if alone; the exit status is non-zero only with --strict."""
  good = {"completion": "<answer>3*5+7</answer>", "numbers": [3, 5, 7], "target": 22}
  lines = [json.dumps(good).encode(),
           b"\xff\xfe\x00binary\x9c",                                       # binary data
           b'{"completion": "\\ud800", "numbers": [3, 5, 7], "target": 22}',  # lone surrogate
           b"42",                                                            # bare number
           b"[" * 5000 + b"]" * 5000,                                        # deep nesting
           b'{"completion": "x", "numbers": [3, 5, 7], "target": NaN}',      # NaN target
           b'{"completion": "x", "numbers": [3, 5, 7]}',                     # missing field
           b'{"completion": 7, "numbers": [3, 5, 7], "target": 22}',         # not a string
           b'{"completion": "x", "numbers": "a,b", "target": 22}',           # unparsable numbers
           b"{oops",                                                          # broken JSON
           b"",
           json.dumps(dict(good, completion="<answer>3+5+7</answer>")).encode()]
  path = tmp_path / "gen.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  command = [sys.executable, str(REPO / "launch" / "score.py"), "--task=countdown", f"--input={path}"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  out = [json.loads(l) for l in result.stdout.splitlines()]
  rows, summary = out[:-1], out[-1]
  assert [r["index"] for r in rows] == list(range(11))
  assert [r.get("score") for r in rows] == [1.0] + [None] * 9 + [0.0]
  reasons = {r["index"]: r["skipped"] for r in rows if "skipped" in r}
  assert reasons[1].startswith("binary data: not UTF-8 text (byte 0xff at offset 0)")
  assert reasons[2] == "field 'completion' is not valid Unicode (lone surrogate)"
  assert reasons[3] == "expected a JSON object, got int 42"
  assert reasons[4].startswith("JSON nested too deeply")
  assert reasons[5] == "field 'target' is nan (not a finite number)"
  assert "lacks field(s) ['target']" in reasons[6]
  assert reasons[7] == "TypeError: completion must be a string, got int"
  assert reasons[8].startswith("ValueError: invalid literal for int()")
  assert reasons[9].startswith("not valid JSON")
  assert rows[1]["line"] == 2 and rows[9]["line"] == 10  # file lines, 1-based (blank line 11)
  assert summary["input_rows"] == 11 and summary["skipped_rows"] == 9
  assert summary["num_examples"] == 2 and summary["accuracy"] == 50.0
  strict = subprocess.run(command + ["--strict"], capture_output=True, text=True, timeout=120)
  assert strict.returncode == 1 and strict.stdout == result.stdout
