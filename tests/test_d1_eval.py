"""d1's evaluation scorer (``eval_style="d1"``) and the fixed default, on hand-written completions.

Every expected value is derived by hand from the rule of d1's ``eval/parse_and_get_acc.py``
(arXiv 2504.12216; rules listed in `dmpo_jax/tasks/d1_eval.py`) that the docstring names; the fixed
style must be no worse on an unclosed ``\\boxed{`` with a leading number, an unterminated sudoku
``<answer>`` and digits after ``</answer>``. The linear scans are checked against the published
regexes themselves on generated text.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from dmpo_jax.tasks import d1_eval, get_task

REPO = pathlib.Path(__file__).resolve().parents[1]


def both(task_name, completion, example):
  task = get_task(task_name)
  return task.score(completion, example, eval_style="d1"), task.score(completion, example)


# ---------------------------------------------------------------------------------------- GSM8K
GOLD = {"answer": "43500"}


def test_gsm8k_thousands_comma_in_box_falls_back_to_first_number():
  """Rule GSM8K-1: float("43,500") fails, so d1 takes the first -?\\d+\\.?\\d* in the box: 43."""
  d1, fixed = both("gsm8k", "<answer>\n\\boxed{43,500}\n</answer>", GOLD)
  assert d1["extracted"] == 43.0 and not d1["correct"]
  assert fixed["extracted"] == 43500.0 and fixed["correct"]


def test_gsm8k_newline_in_box_is_skipped_without_dotall():
  """Rule GSM8K-1: \\boxed{(.*?)} has no DOTALL, so a box spanning a newline never matches; no
  <answer> block either (rule 2), so d1 has no answer. Fixed matches the braces."""
  d1, fixed = both("gsm8k", "The total is \\boxed{\n43500\n}", GOLD)
  assert d1["extracted"] is None and not d1["correct"]
  assert fixed["extracted"] == 43500.0 and fixed["correct"]


def test_gsm8k_unclosed_box_with_text_unit_read_by_non_greedy_regex():
  """Rule GSM8K-1: the content stops at the first "}" -> "360\\text{ hours" -> float fails ->
  first number 360 (correct for gold 360). Fixed: the box never closes; its leading number 360."""
  d1, fixed = both("gsm8k", "It takes \\boxed{360\\text{ hours}", {"answer": "360"})
  assert d1["extracted"] == 360.0 and d1["correct"]
  assert fixed["extracted"] == 360.0 and fixed["correct"]


def test_gsm8k_fixed_no_worse_on_unclosed_box_with_leading_number():
  """Rule GSM8K-1/2: an unclosed box has no "}" at all, so no match, and no <answer> block: d1
  reads nothing. Fixed reads the leading number (thousands comma included)."""
  for completion, gold in (("<answer>\n\\boxed{43,500", "43500"), ("so \\boxed{72", "72")):
    d1, fixed = both("gsm8k", completion, {"answer": gold})
    assert not d1["correct"] and fixed["correct"], completion


def test_gsm8k_dots_box_skipped_and_answer_fallback_last_number():
  """Rule GSM8K-1: "..." is skipped, the next box 18 wins. Rule GSM8K-2 (no usable box): the
  *last* number of the first <answer> block, 17 here (gold 18 -> wrong) in both styles."""
  d1, fixed = both("gsm8k", "\\boxed{...} and \\boxed{18}", {"answer": "18"})
  assert d1["correct"] and fixed["correct"]
  d1, fixed = both("gsm8k", "<answer>18 apples, not 17</answer>", {"answer": "18"})
  assert d1["extracted"] == 17.0 and fixed["extracted"] == 17.0
  assert not d1["correct"] and not fixed["correct"]


# ----------------------------------------------------------------------------------------- MATH
HALF = {"answer": "\\frac{1}{2}"}


def test_math_without_box_scores_the_whole_text():
  """Rules MATH-1/3: no box -> last_boxed_only_string returns the whole text, which is non-empty,
  so the <answer> fallback never runs and the whole text is compared."""
  d1, fixed = both("math", "\\frac{1}{2}", HALF)
  assert d1["correct"] and d1["extracted"] == "\\frac{1}{2}"
  d1, fixed = both("math", "<answer>\\frac{1}{2}</answer>", HALF)
  assert d1["extracted"] == "<answer>\\frac{1}{2}</answer>" and not d1["correct"]
  assert fixed["extracted"] == "\\frac{1}{2}" and fixed["correct"]


def test_math_unclosed_box_falls_back_to_first_answer_block():
  """Rules MATH-1/2/3: the unclosed last box gives None, remove_boxed raises -> None -> the first
  <answer> block "\\frac12", which strip_string turns into \\frac{1}{2}."""
  completion = "<answer>\\frac12</answer> so \\boxed{\\frac{1}{2}"
  d1, fixed = both("math", completion, HALF)
  assert d1["extracted"] == "\\frac12" and d1["correct"]
  assert fixed["correct"]


def test_math_slash_with_non_integer_side_compares_raw_strings():
  """Rule MATH-4: strip_string("3 / x") raises in a/b -> \\frac{a}{b} (int("3 ") fine, int("x")
  fails), so is_equiv compares "3 / x" with "3/x" raw: wrong. Fixed normalises both to 3/x."""
  d1, fixed = both("math", "\\boxed{3 / x}", {"answer": "3/x"})
  assert d1["extracted"] == "3 / x" and not d1["correct"]
  assert fixed["correct"]


def test_math_boxed_with_space():
  """Rule MATH-1: with "\\boxed " the answer is the text after the last one up to a "$"."""
  d1, fixed = both("math", "so $\\boxed 5$.", {"answer": "5"})
  assert d1["extracted"] == "5" and d1["correct"] and fixed["correct"]


# ------------------------------------------------------------------------------------ Countdown
CD = {"numbers": [30, 100, 93], "target": 23}


def test_countdown_without_box_scores_the_whole_text():
  """Rules Countdown-1/4: no box -> the whole text; its digit runs 30, 7, 30, 100, 93 are not the
  numbers -> wrong. A bare expression as the whole text is right. Fixed reads <answer>."""
  completion = "<reasoning>try 30 - 7</reasoning><answer>30-(100-93)</answer>"
  d1, fixed = both("countdown", completion, CD)
  assert d1["extracted"] == completion and not d1["correct"]
  assert fixed["extracted"] == "30-(100-93)" and fixed["correct"]
  d1, fixed = both("countdown", "30 - (100 - 93)", CD)
  assert d1["correct"] and fixed["correct"]


def test_countdown_unclosed_box_takes_first_expression_equals_number_in_text():
  """Rules Countdown-1/3: the unclosed box raises, there is no closed <answer> block, so the whole
  text; the first `expr = number` in it is "100 - 93 " (= 7): numbers 100, 93 -> wrong. When the
  first one is the full expression, d1 is right. Fixed reads the unclosed box's tail."""
  completion = ("<reasoning>\n100 - 93 = 7, 30 - 7 = 23\n</reasoning>\n<answer>\\boxed{30 - "
                "(100 - 93)")
  d1, fixed = both("countdown", completion, CD)
  assert d1["extracted"] == "100 - 93" and not d1["correct"]
  assert fixed["extracted"] == "30 - (100 - 93)" and fixed["correct"]
  completion = "<reasoning>\n30 - (100 - 93) = 23\n</reasoning>\n<answer>\\boxed{30 - (100 - 93)"
  d1, fixed = both("countdown", completion, CD)
  assert d1["extracted"] == "30 - (100 - 93)" and d1["correct"] and fixed["correct"]


def test_countdown_latex_operators_and_trailing_value():
  """Rules Countdown-2/3: \\times -> *, and "expr = 23" keeps the expression."""
  d1, fixed = both("countdown", "\\boxed{(100 - 93) \\times 30 - 187 = 23}",
                   {"numbers": [100, 93, 30, 187], "target": 23})
  assert d1["extracted"] == "(100 - 93) * 30 - 187" and d1["correct"] and fixed["correct"]


# --------------------------------------------------------------------------------------- Sudoku
# Solution 1234/3412/2143/4321; the puzzle leaves 8 cells empty (indices 2 3 6 7 8 9 12 13).
SUDOKU = {"puzzle": "1200340000430021", "solution": "1234341221434321"}
SOLVED = "1234341221434321"


def cells(result):
  return result["correct_cells"], result["empty_cells"]


def test_sudoku_unclosed_answer_read_up_to_end_token():
  """Sudoku-1, second pattern: <answer>(.*?) up to <|eot_id|> -> the 16 digits -> 8/8. Without an
  end token and with spaces no pattern matches (no 16-digit word) -> 0/8; fixed reads the
  unclosed region -> 8/8 (no worse on an unterminated <answer>)."""
  d1, fixed = both("sudoku", "<answer>\n1234 3412 2143 4321<|eot_id|>", SUDOKU)
  assert cells(d1) == (8, 8) and cells(fixed) == (8, 8)
  d1, fixed = both("sudoku", "<answer>\n1234 3412 2143 4321", SUDOKU)
  assert cells(d1) == (0, 8) and d1["extracted"] == ""
  assert cells(fixed) == (8, 8)
  d1, fixed = both("sudoku", "<answer>\n" + SOLVED, SUDOKU)
  assert cells(d1) == (8, 8) and cells(fixed) == (8, 8)  # fifth pattern: a 16-digit word


def test_sudoku_digits_after_close_tag():
  """Sudoku-1, third pattern: the <answer> block is empty after strip, so the text after
  </answer> is read: 8/8. With words there, only whitespace is removed: "Thegridis1234341" ->
  only indices 9, 12, 13 hold the right digit -> 3/8. Fixed finds the digit run -> 8/8."""
  d1, fixed = both("sudoku", "<answer>\n</answer>\n" + SOLVED, SUDOKU)
  assert cells(d1) == (8, 8) and cells(fixed) == (8, 8)
  d1, fixed = both("sudoku", "<answer></answer> The grid is 1234 3412 2143 4321", SUDOKU)
  assert d1["extracted"] == "Thegridis1234341221434321" and cells(d1) == (3, 8)
  assert cells(fixed) == (8, 8)


def test_sudoku_malformed_tag_and_first_block():
  """Sudoku-1/2: the second pattern reads "\\n<>answer>1234..." -> whitespace removed only ->
  "<>answer>1234341" -> indices 9, 12, 13 right -> 3/8; a malformed closing "<>answer>" leaves
  the fifth pattern's 16-digit word -> 8/8. d1 reads the *first* <answer>: 1111... -> indices 6
  and 9 -> 2/8; fixed reads the last."""
  d1, fixed = both("sudoku", "<answer>\n<>answer>" + SOLVED + "</answer>", SUDOKU)
  assert cells(d1) == (3, 8) and cells(fixed) == (8, 8)
  d1, fixed = both("sudoku", "<answer>" + SOLVED + "<>answer>", SUDOKU)
  assert cells(d1) == (8, 8) and cells(fixed) == (8, 8)
  d1, fixed = both("sudoku", "<answer>1111111111111111</answer> no: <answer>" + SOLVED +
                   "</answer>", SUDOKU)
  assert cells(d1) == (2, 8) and cells(fixed) == (8, 8)


def test_sudoku_code_fence_and_digits_before_close():
  """Sudoku-1, first pattern: digits in a ``` fence after <answer> -> 8/8; fourth pattern: no
  <answer>, 16 digits then </answer> -> 8/8."""
  d1, fixed = both("sudoku", "<answer>\n```\n1234\n3412\n2143\n4321\n```\n</answer>", SUDOKU)
  assert cells(d1) == (8, 8) and cells(fixed) == (8, 8)
  d1, fixed = both("sudoku", SOLVED + "\n</answer>", SUDOKU)
  assert cells(d1) == (8, 8) and cells(fixed) == (8, 8)


def test_d1_style_rejects_other_tasks():
  with pytest.raises(ValueError, match="d1"):
    get_task("mbpp").score("x", {}, eval_style="d1")
  with pytest.raises(ValueError, match="eval_style"):
    get_task("gsm8k").score("x", GOLD, eval_style="d2")


def test_score_script_eval_style_d1(tmp_path):
  """launch/score.py --eval_style=d1 gives d1's accuracy; the default gives the fixed one."""
  rows = [{"completion": "<answer>\n\\boxed{43,500}\n</answer>", "answer": "43,500"},
          {"completion": "\\boxed{18}", "answer": "18"}]
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  accuracies = {}
  for style in ("d1", "fixed"):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "score.py"), "--task=gsm8k",
                          f"--input={path}", f"--eval_style={style}"],
                         capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["eval_style"] == style
    accuracies[style] = summary["accuracy"]
  assert accuracies == {"d1": 50.0, "fixed": 100.0}


# --------------------------------------------------- linear scans == the published regexes
_TOKENS = st.sampled_from(["<answer>", "</answer>", "\n", " ", "a", "1", "12", "3.5", "-4", "43,500",
                           "=", "+", "*", "(", ")", "{", "}", "\\boxed{", "\\boxed ", "\\fbox{", "$",
                           "```", "<|eot_id|>", "<|endoftext|>", "1234123412341234", "...",
                           "<>answer>", "\\times", ". "])
TEXTS = st.lists(_TOKENS, max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_scans_equal_published_regexes(text):
  """Each linear scan returns exactly what d1's regex returns."""
  assert d1_eval.boxed_findall_no_dotall(text) == re.findall(r"\\boxed{(.*?)}", text)
  match = re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", text)
  assert d1_eval.expression_before_equals(text) == (match.group(1) if match else None)
  patterns = [r"<answer>.*?```\s*([\d\s]+)```",
              r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",
              r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)",
              r".*?(\d{16})\s*</answer>", r"\b(\d{16})\b"]
  for pattern, scan in zip(patterns, d1_eval._SUDOKU_CASCADE):  # pylint: disable=protected-access
    match = re.search(pattern, text, re.DOTALL)
    assert scan(text) == (match.group(1) if match else None), pattern


def test_config_eval_style_is_validated():
  from configs import demo  # pylint: disable=import-outside-toplevel
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  config.eval.style = "d1"  # the demo task has no d1 scorer
  with pytest.raises(loop.ConfigError, match="eval.style"):
    loop.validate_config(config, num_devices=1)
  config.eval.style = "fixed"
  config.task.reward_timeout_s = -1.0
  with pytest.raises(loop.ConfigError, match="reward_timeout_s"):
    loop.validate_config(config, num_devices=1)


def test_task_modules_import_no_cycle():
  """An AST walk over every import (top-level and inside functions) of `dmpo_jax/tasks/*.py`
  other than `base` (whose registry reads the package): the task modules form no import cycle
  (the safe arithmetic that countdown and d1_eval share lives in `tasks/arithmetic.py`)."""
  import ast  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(d1_eval.__file__).parent
  names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
  graph = {}
  for name in names - {"base"}:
    imported = set()
    for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "dmpo_jax.tasks":
        imported |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dmpo_jax.tasks."):
        imported.add(node.module.rsplit(".", 1)[1])
      elif isinstance(node, ast.Import):
        imported |= {a.name.rsplit(".", 1)[1] for a in node.names
                     if a.name.startswith("dmpo_jax.tasks.")}
    graph[name] = imported & (names - {"base"})

  def reaches(start, goal, seen=()):
    return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,)))
               for nxt in graph[start])

  assert "countdown" in graph and "arithmetic" in graph["d1_eval"]
  assert [name for name in sorted(graph) if reaches(name, name)] == []
