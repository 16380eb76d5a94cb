"""Loaders, prompts and the offline generators (`docs/tasks.md` §0-§5).

Every loader format and task is tested on the hand-written files in tests/fixtures/data. The
checks on the full benchmark files (row counts, every gold answer scoring as correct) run when
DMPO_JAX_DATA_DIR names the data folder (`.ci/run` sets it); otherwise they report a skip.
"""

import collections
import gzip
import json

import pytest

from dmpo_jax.tasks import base, countdown, generators, get_task, sudoku


# ---- the fixture data folder (always runs) ---------------------------------------------------

def test_gsm8k_fixture(fixture_data_dir):
  task = get_task("gsm8k")
  train = task.load_train(data_dir=fixture_data_dir)
  test = task.load_eval(data_dir=fixture_data_dir)
  assert [e["answer"] for e in train] == ["24", "8", "1,280"]
  assert [e["answer"] for e in test] == ["60", "-7"]
  assert test[0]["question"].startswith("Tom reads 12 pages")
  assert test[0]["solution"].endswith("#### 60")
  assert task.score("so <answer>\\boxed{1280}</answer>", train[2])["correct"]
  assert not task.score("<answer>\\boxed{61}</answer>", test[0])["correct"]


def test_math_fixture(fixture_data_dir):
  task = get_task("math")
  train = task.load_train(data_dir=fixture_data_dir)
  # Gold = the answer field, else the last \boxed{} of the solution.
  assert [e["answer"] for e in train] == ["25", "\\frac{3}{4}", "3"]
  test = task.load_eval(data_dir=fixture_data_dir)
  assert [(e["answer"], e["level"], e["subject"]) for e in test] == [
      ("56", 1, "Prealgebra"), ("7", 2, "Algebra"), ("\\frac{1}{2}", 1, "Prealgebra")]
  assert task.score("\\boxed{\\frac12}", test[2])["correct"]
  assert not task.score("\\boxed{8}", test[1])["correct"]


def test_countdown_fixture(fixture_data_dir):
  task = get_task("countdown")
  test = task.load_eval(data_dir=fixture_data_dir)
  assert test == [{"numbers": [8, 3, 5], "target": 29}, {"numbers": [10, 2, 7], "target": 13},
                  {"numbers": [50, 25, 1], "target": 3}]
  train = task.load_train(source=str(fixture_data_dir / "countdown" / "train.jsonl"))
  assert train == [{"numbers": [4, 9, 2], "target": 17}, {"numbers": [25, 5, 3], "target": 8},
                   {"numbers": [6, 7, 1], "target": 43}]
  assert all(generators.is_solvable(e["numbers"], e["target"]) for e in train + test)
  assert task.score("<answer>8*3+5</answer>", test[0])["correct"]


def test_sudoku_fixture_both_layouts(fixture_data_dir):
  task = get_task("sudoku")
  d1 = task.load_eval(data_dir=fixture_data_dir)
  spg = task.load_eval(source=str(fixture_data_dir / "sudoku" / "spg_4x4_test.csv"))
  # Leading zeros survive the CSV reader (grids are text, not numbers).
  assert [e["puzzle"] for e in d1] == ["0234300220430320", "0043341002044001", "0301204334100230"]
  assert [e["solution"] for e in spg] == ["3412124321344321", "1234341221434321"]
  grids = set(generators.all_sudoku_grids())
  for example in d1 + spg:
    assert example["solution"] in grids and generators.count_solutions(example["puzzle"]) == 1
  assert task.score(f"<answer>{d1[0]['solution']}</answer>", d1[0])["score"] == 1.0
  # The JSONL layout (lower-case keys) reads the same.
  assert task.normalize({"puzzle": d1[1]["puzzle"], "solution": d1[1]["solution"]}) == d1[1]


def test_code_fixtures(fixture_data_dir, monkeypatch):
  mbpp = get_task("mbpp")
  assert [e["task_id"] for e in mbpp.load_eval(data_dir=fixture_data_dir)] == [11, 12]
  assert [e["task_id"] for e in mbpp.load_train(data_dir=fixture_data_dir)] == [601]
  assert [e["task_id"] for e in mbpp.load_eval(data_dir=fixture_data_dir, split="prompt")] == [2, 3, 4]
  assert mbpp.load_eval(data_dir=fixture_data_dir)[0]["test_imports"] == ["import math"]
  monkeypatch.setenv("DMPO_JAX_DATA_DIR", str(fixture_data_dir))
  prompt = mbpp.eval_prompt(mbpp.load_eval(data_dir=fixture_data_dir)[1])
  assert [m["role"] for m in prompt.messages] == ["user", "assistant"] * 3 + ["user"]
  assert "larger of two numbers" in prompt.messages[0]["content"]
  assert "def reverse_text(s)" in prompt.messages[3]["content"]
  assert "assert evens([1, 2, 3, 4]) == [2, 4]" in prompt.messages[-1]["content"]
  assert prompt.prefill == "[BEGIN]\n"
  humaneval = get_task("humaneval").load_eval(
      source=str(fixture_data_dir / "humaneval" / "test.jsonl"))
  assert [e["entry_point"] for e in humaneval] == ["double", "total"]
  assert {"task_id", "prompt", "entry_point", "test", "canonical_solution"} == set(humaneval[0])


def test_read_records_formats(fixture_data_dir, tmp_path):
  """JSONL, JSONL.gz, a JSON array, a JSON {"data": [...]} object, CSV and parquet read alike."""
  rows = base.read_records(fixture_data_dir / "gsm8k" / "test.jsonl")
  assert [r["answer"][-2:] for r in rows] == ["60", "-7"]
  packed = tmp_path / "test.jsonl.gz"
  with gzip.open(packed, "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  assert base.read_records(packed) == rows
  (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
  assert base.read_records(tmp_path / "wrapped.json") == rows
  assert base.read_records(fixture_data_dir / "sudoku" / "spg_4x4_test.csv")[1] == {
      "Puzzle": "0004041201404001", "Solution": "1234341221434321"}
  pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (from the `data` extra) reads parquet")
  import pyarrow  # pylint: disable=import-outside-toplevel
  pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "test.parquet")
  assert base.read_records(tmp_path / "test.parquet") == rows


def test_default_data_folder_and_missing_file_hint(tmp_path, monkeypatch):
  monkeypatch.delenv("DMPO_JAX_DATA_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert base.data_dir_from_env() == tmp_path / ".cache" / "dmpo_jax" / "data"
  with pytest.raises(FileNotFoundError, match=r"prepare_data.py --task=gsm8k"):
    get_task("gsm8k").load_eval()
  monkeypatch.setenv("DMPO_JAX_DATA_DIR", str(tmp_path / "d"))
  assert base.data_dir_from_env() == tmp_path / "d"
  assert base.data_dir_from_env("~/x") == tmp_path / "x"
  for name, call in [("math", lambda t: t.load_train()), ("sudoku", lambda t: t.load_eval()),
                     ("countdown", lambda t: t.load_eval()), ("mbpp", lambda t: t.load_eval())]:
    with pytest.raises(FileNotFoundError, match=rf"--task={name} --out={tmp_path / 'd'}"):
      call(get_task(name))


# ---- the full benchmark files (when DMPO_JAX_DATA_DIR is set) --------------------------------

def test_gsm8k_files(benchmark_data_dir):
  task = get_task("gsm8k")
  train = task.load_train(data_dir=benchmark_data_dir)
  test = task.load_eval(data_dir=benchmark_data_dir)
  assert (len(train), len(test)) == (7473, 1319)
  assert set(test[0]) == {"question", "answer", "solution"}
  assert test[0]["answer"] == test[0]["solution"].split("####")[-1].strip()
  assert all(task.score(f"\\boxed{{{e['answer']}}}", e)["correct"] for e in test)


def test_math500_file(benchmark_data_dir):
  task = get_task("math")
  test = task.load_eval(data_dir=benchmark_data_dir)
  assert len(test) == 500 and len({e["unique_id"] for e in test}) == 500
  assert collections.Counter(e["level"] for e in test) == {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}
  assert all(task.score(f"\\boxed{{{e['answer']}}}", e)["correct"] for e in test)
  with pytest.raises(FileNotFoundError):
    task.load_train(source="/nonexistent/math_train.jsonl")


def test_math_train_from_local_file(tmp_path):
  path = tmp_path / "math_train.jsonl"
  path.write_text('{"problem": "1+1?", "solution": "It is $\\\\boxed{2}$."}\n')
  (example,) = get_task("math").load_train(source=str(path))
  assert example["answer"] == "2"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"problem": "1+1?"}\n')
  with pytest.raises(ValueError, match="row 0"):
    get_task("math").load_train(source=str(bad))


def test_countdown_file(benchmark_data_dir):
  test = get_task("countdown").load_eval(data_dir=benchmark_data_dir)
  assert len(test) == 256
  assert all(len(e["numbers"]) == 3 and generators.is_solvable(e["numbers"], e["target"])
             for e in test)


def test_sudoku_files(benchmark_data_dir):
  task = get_task("sudoku")
  d1 = task.load_eval(data_dir=benchmark_data_dir)
  spg = task.load_eval(source=str(benchmark_data_dir / "sudoku" / "spg_4x4_test.csv"))
  assert (len(d1), len(spg)) == (500, 256)
  assert not {e["puzzle"] for e in d1} & {e["puzzle"] for e in spg}
  assert len(base.select_subset(d1, 256, seed=42)) == 256
  grids = set(generators.all_sudoku_grids())
  assert all(e["solution"] in grids and generators.count_solutions(e["puzzle"]) == 1 for e in spg)


def test_code_files(benchmark_data_dir, monkeypatch):
  humaneval = get_task("humaneval").load_eval()
  assert len(humaneval) == 164
  assert {"task_id", "prompt", "entry_point", "test"} <= set(humaneval[0])
  mbpp = get_task("mbpp")
  assert len(mbpp.load_eval(data_dir=benchmark_data_dir)) == 257
  assert len(mbpp.load_eval(data_dir=benchmark_data_dir, split="all")) == 427
  monkeypatch.setenv("DMPO_JAX_DATA_DIR", str(benchmark_data_dir))
  messages = mbpp.eval_prompt(mbpp.load_eval(data_dir=benchmark_data_dir)[0]).messages
  assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
  assert "similar_elements" in messages[0]["content"]


def test_prompts_follow_the_protocol():
  gsm = get_task("gsm8k")
  train = gsm.train_prompt({"question": "Q?"})
  assert train.prefill == "" and train.messages == [
      {"role": "user", "content": base.SYSTEM_PROMPT + "\n\nQ?"}]
  assert gsm.eval_prompt({"question": "Q?"}).prefill == "<reasoning>"
  cd = get_task("countdown").eval_prompt({"numbers": [1, 2, 3], "target": 6})
  assert cd.messages[0]["content"].endswith("</answer>\n\nNumbers: [1, 2, 3]\nTarget: 6")
  assert "\\boxed{a + b * c}Respond" in countdown.CTD_SYSTEM_PROMPT
  assert "[44, 19, 35]" in get_task("countdown").train_prompt(
      {"numbers": [44, 19, 35], "target": 1}).messages[0]["content"]
  sd = get_task("sudoku").train_prompt({"puzzle": "0" * 16})
  assert sd.messages[0]["content"] == (sudoku.SUDOKU_SYSTEM_PROMPT +
                                       "\n\nSolve the following Sudoku puzzle: " + "0" * 16 + "\n")
  for name in base.task_names():
    assert get_task(name).name == name


def test_read_records_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    base.read_records(tmp_path / "missing.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"a": 1}\n{oops\n')
  with pytest.raises(ValueError, match="line 2"):
    base.read_records(bad)
  with pytest.raises(ValueError, match="unsupported"):
    (tmp_path / "x.txt").write_text("x")
    base.read_records(tmp_path / "x.txt")


def test_sudoku_generator_unique_and_leak_free():
  grids = generators.all_sudoku_grids()
  assert len(grids) == len(set(grids)) == 288
  train, test = generators.sudoku_split(num_train_grids=200, puzzles_per_train_grid=2,
                                        puzzles_per_test_grid=2, seed=3)
  assert len(train) == 400 and len(test) == 176
  assert not {e["solution"] for e in train} & {e["solution"] for e in test}
  for example in train + test:
    assert example["puzzle"].count("0") == 8
    assert generators.count_solutions(example["puzzle"]) == 1
    assert all(p in ("0", s) for p, s in zip(example["puzzle"], example["solution"]))
  assert generators.count_solutions("0" * 16, limit=1000) == 288


def test_countdown_generator_solvable_and_disjoint():
  train, test = generators.countdown_split(num_train=300, num_test=50, seed=1)
  keys = [(tuple(sorted(e["numbers"])), e["target"]) for e in train + test]
  assert len(set(keys)) == 350
  for example in train + test:
    assert generators.is_solvable(example["numbers"], example["target"])
    assert all(1 <= n <= 100 for n in example["numbers"]) and 1 <= example["target"] <= 100
  # Independent brute force over every ordering and bracketing for a few instances.
  import itertools
  from fractions import Fraction
  def brute(numbers):
    values = set()
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b,
           lambda a, b: a / b if b else None]
    for a, b, c in itertools.permutations([Fraction(n) for n in numbers]):
      for f, g in itertools.product(ops, ops):
        inner = f(a, b)
        if inner is not None and g(inner, c) is not None:
          values.add(g(inner, c))
        inner = f(b, c)
        if inner is not None and g(a, inner) is not None:
          values.add(g(a, inner))
    return values
  for numbers in ([3, 5, 7], [1, 1, 1], [10, 2, 5], [0, 4, 9]):
    assert generators.reachable_values(numbers) == brute(numbers)
  assert not generators.is_solvable([1, 1, 1], 7)


def test_loaders_skip_each_bad_row_with_its_reason(tmp_path, caplog):
  path = tmp_path / "cd.jsonl"
  path.write_bytes(b"\n".join([
      b'{"input": "30,100,93", "output": "23"}',
      b"\x80\x81 binary",
      b'{"numbers": [1, 2, 3], "target": NaN}',
      b'{"numbers": [1, 2, 3], "target": "\\udc00"}',
      b"7",
      b"[" * 3000 + b"]" * 3000,
      b'{"numbers": [1, 2], "nope": 1}',
      b'{"numbers": [4, 5, 6], "target": 15}']) + b"\n")
  task = get_task("countdown")
  with caplog.at_level("WARNING"):
    examples = task.load_eval(str(path))
  assert examples == [{"numbers": [30, 100, 93], "target": 23}, {"numbers": [4, 5, 6], "target": 15}]
  message = caplog.text
  assert "skipped 6 of 8 row(s)" in message
  assert "row 1 (line 2): binary data" in message and "row 2 (line 3): field 'target' is nan" in message
  assert "row 3 (line 4): field 'target' is not valid Unicode" in message
  assert "row 4 (line 5): expected a JSON object, got int 7" in message
  assert "row 5 (line 6): JSON nested too deeply" in message  # the first five are listed
  with pytest.raises(ValueError, match=r"6 of 8 row\(s\) unusable; first: row 1 \(line 2\): binary"):
    task.load_rows(str(path), strict=True)
  table = base.read_rows(path)
  assert [i for i, _ in table.rows] == [0, 6, 7] and [b.index for b in table.bad] == [1, 2, 3, 4, 5]
  # Only bad rows: an error, not an empty dataset.
  path.write_bytes(b"1\n2\n")
  with pytest.raises(ValueError, match="2 of 2 row"):
    task.load_eval(str(path))
