"""Loaders on the real offline files, prompts, and the offline generators (`tasks.md` §0-§5)."""

import collections

import pytest

from dmpo_jax.tasks import base, countdown, generators, get_task, sudoku


def test_gsm8k_files(data_dir):
  task = get_task("gsm8k")
  train, test = task.load_train(data_dir=data_dir), task.load_eval(data_dir=data_dir)
  assert (len(train), len(test)) == (7473, 1319)
  assert set(test[0]) == {"question", "answer", "solution"}
  assert test[0]["answer"] == test[0]["solution"].split("####")[-1].strip()
  assert all(task.score(f"\\boxed{{{e['answer']}}}", e)["correct"] for e in test)


def test_math500_file(data_dir):
  task = get_task("math")
  test = task.load_eval(data_dir=data_dir)
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


def test_countdown_file(data_dir):
  test = get_task("countdown").load_eval(data_dir=data_dir)
  assert len(test) == 256
  assert all(len(e["numbers"]) == 3 and generators.is_solvable(e["numbers"], e["target"])
             for e in test)


def test_sudoku_files(data_dir):
  task = get_task("sudoku")
  d1 = task.load_eval(data_dir=data_dir)
  spg = task.load_eval(source=str(data_dir / "sudoku" / "spg_4x4_test.csv"))
  assert (len(d1), len(spg)) == (500, 256)
  assert not {e["puzzle"] for e in d1} & {e["puzzle"] for e in spg}
  assert len(base.select_subset(d1, 256, seed=42)) == 256
  grids = set(generators.all_sudoku_grids())
  assert all(e["solution"] in grids and generators.count_solutions(e["puzzle"]) == 1 for e in spg)


def test_code_files(data_dir):
  humaneval = get_task("humaneval").load_eval()
  assert len(humaneval) == 164
  assert {"task_id", "prompt", "entry_point", "test"} <= set(humaneval[0])
  mbpp = get_task("mbpp")
  assert len(mbpp.load_eval(data_dir=data_dir)) == 257
  assert len(mbpp.load_eval(data_dir=data_dir, split="all")) == 427
  messages = mbpp.eval_prompt(mbpp.load_eval(data_dir=data_dir)[0]).messages
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
