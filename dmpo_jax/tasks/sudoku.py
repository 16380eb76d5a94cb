"""4x4 Sudoku (`docs/tasks.md` §5): data, prompts, partial-credit reward and cell-accuracy scorer."""

from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dmpo_jax.tasks import base
from dmpo_jax.tasks import d1_eval
from dmpo_jax.tasks import math_utils
from dmpo_jax.tasks import text_scan

# `docs/tasks.md` §5.2.
SUDOKU_SYSTEM_PROMPT = (
    "\nPlease solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character "
    "string reading left-to-right, top-to-bottom, where '0' represents empty cells.\n\nRules:\n- "
    "Fill empty cells with digits 1-4\n- Each row must contain digits 1-4 exactly once\n- Each "
    "column must contain digits 1-4 exactly once\n- Each 2x2 box must contain digits 1-4 exactly "
    "once\n\nImportant: Your solution must be a COMPLETE 16-character string with only the digits "
    "1-4, representing your final solved grid.\n\nRespond in this exact format:\n<reasoning>\nYour "
    "step-by-step solving process\n</reasoning>\n<answer>\n[16-character solution string with no "
    "spaces or separators]\n</answer>\n")

GRID_CELLS = 16
_NON_DIGIT = re.compile(r"\D")
# A run of at least 16 digits 1-4 with separators between them (whitespace , | -).
_GRID_RUN = re.compile(r"(?:[1-4][\s,|\-]*){15}[1-4](?:[\s,|\-]*[1-4])*")


def check_grid_string(value: Any, field: str) -> str:
  text = str(value).strip()
  if len(text) != GRID_CELLS or not text.isdigit():
    raise ValueError(f"{field} must be a 16-digit string, got {value!r}")
  return text


def cell_counts(answer_digits: str, puzzle: str, solution: str) -> Tuple[int, int]:
  """(correct empty cells, empty cells); the answer is right-padded with '0' / cut to 16."""
  answer = (answer_digits + "0" * GRID_CELLS)[:GRID_CELLS]
  empty = [i for i, c in enumerate(puzzle) if c == "0"]
  correct = sum(answer[i] == solution[i] for i in empty)
  return correct, len(empty)


@text_scan.bounded
def sudoku_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """`docs/tasks.md` §5.4: digits of the last ``<answer>`` block vs the stored solution on the empty
  cells; fraction correct; 0 without a tag. fixed also reads a final ``<answer>`` that is never
  closed (a completion cut at EOS)."""
  if base.check_reward_style(style) == "fixed":
    region = text_scan.answer_region(completion)
  else:
    region = text_scan.last_answer_block(completion)
  if region is None:
    return 0.0
  digits = "".join(c for c in region if c.isdigit())
  correct, empty = cell_counts(digits, example["puzzle"], example["solution"])
  return correct / empty if empty else 0.0


def last_grid_run(text: str) -> Optional[str]:
  """The last 16 digits 1-4 (separators allowed between them) that
  ``re.findall(r"(?:[1-4][\\s,|\\-]*){15}[1-4]", text)`` returns, in linear time: runs of
  digits 1-4 with separators, each cut into consecutive groups of 16 digits."""
  found = None
  for run in _GRID_RUN.finditer(text):  # each run has >= 16 digits
    digits = _NON_DIGIT.sub("", run.group())
    groups = len(digits) // GRID_CELLS
    found = digits[(groups - 1) * GRID_CELLS:groups * GRID_CELLS]
  return found


def extract_eval_grid(completion: str) -> Optional[str]:
  """Fixed-style cascade: the digits of the answer region (the last ``<answer>``, closed or not)
  if there are >= 16; else of the last ``\\boxed{}``; else the last run of 16 digits 1-4
  (separators allowed between them) anywhere, e.g. after ``</answer>``; else the answer-region
  digits (padded when scoring); else None."""
  completion = text_scan.bounded_text(completion)
  region = text_scan.answer_region(completion)
  answer_digits = _NON_DIGIT.sub("", region) if region is not None else None
  if answer_digits is not None and len(answer_digits) >= GRID_CELLS:
    return answer_digits[:GRID_CELLS]
  boxed = math_utils.remove_boxed(math_utils.last_boxed_only_string(completion))
  if boxed is not None:
    boxed_digits = _NON_DIGIT.sub("", boxed)
    if len(boxed_digits) >= GRID_CELLS:
      return boxed_digits[:GRID_CELLS]
  run = last_grid_run(completion)
  if run is not None:
    return run
  return answer_digits


class SudokuTask(base.Task):
  name = "sudoku"
  reference_fields = ("puzzle", "solution")
  default_eval_size = 256

  def normalize(self, row: base.Example) -> base.Example:
    puzzle = row.get("puzzle", row.get("Puzzle"))
    solution = row.get("solution", row.get("Solution"))
    if puzzle is None or solution is None:
      raise KeyError("puzzle/Puzzle and solution/Solution")
    return {"puzzle": check_grid_string(puzzle, "puzzle"),
            "solution": check_grid_string(solution, "solution")}

  def load_train(self, source=None, data_dir=None) -> List[base.Example]:
    """A local CSV/JSONL (Puzzle, Solution), or — with no source — the offline generator's
    solution-grid split (`generators.sudoku_split`)."""
    if source is None:
      from dmpo_jax.tasks import generators  # pylint: disable=import-outside-toplevel
      train, _ = generators.sudoku_split()
      return train
    return self.load_rows(source, split="train")

  def load_eval(self, source=None, data_dir=None) -> List[base.Example]:
    """Default: d1's ``4x4_test_sudoku.csv`` (500 rows; the protocol scores 256 chosen with seed
    42, `base.select_subset`). SPG's leak-free file: ``<data>/sudoku/spg_4x4_test.csv``."""
    if source is None:
      source = base.default_data_file("sudoku", "sudoku/d1_4x4_test.csv", data_dir)
    return self.load_rows(source, split="test")

  def train_prompt(self, example: base.Example) -> base.PromptSpec:
    content = f"{SUDOKU_SYSTEM_PROMPT}\n\nSolve the following Sudoku puzzle: {example['puzzle']}\n"
    return base.PromptSpec(base.user_message(content))

  def eval_prompt(self, example: base.Example) -> base.PromptSpec:
    content = SUDOKU_SYSTEM_PROMPT + "\n\n" + f"Solve the following Sudoku puzzle: {example['puzzle']}\n"
    return base.PromptSpec(base.user_message(content), prefill=base.REASONING_PREFILL)

  def reward_functions(self, style: str = base.DEFAULT_REWARD_STYLE, **options: Any
                       ) -> List[Tuple[str, base.RewardFn]]:
    base.check_reward_style(style)
    return [("sudoku", functools.partial(sudoku_reward, style=style))]

  def score(self, completion: str, example: base.Example, eval_style: str = base.DEFAULT_EVAL_STYLE,
            **options: Any) -> Dict[str, Any]:
    if base.check_eval_style(eval_style) == "d1":
      return d1_eval.score_row(self.name, completion, example)
    grid = extract_eval_grid(completion)
    correct_cells, empty_cells = cell_counts(grid or "", example["puzzle"], example["solution"])
    solved = grid is not None and correct_cells == empty_cells
    return {"score": correct_cells / empty_cells if empty_cells else 0.0, "correct": bool(solved),
            "correct_cells": correct_cells, "empty_cells": empty_cells, "extracted": grid}

  def summarize(self, scores: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``accuracy`` = cell accuracy (Σ correct empty cells / Σ empty cells, in %), as DMPO and d1
    report it; ``solve_rate`` = % of puzzles fully solved."""
    n = len(scores)
    correct_cells = sum(s["correct_cells"] for s in scores)
    empty_cells = sum(s["empty_cells"] for s in scores)
    solved = sum(bool(s["correct"]) for s in scores)
    cell_accuracy = 100.0 * correct_cells / empty_cells if empty_cells else 0.0
    return {"task": self.name, "num_examples": n, "accuracy": cell_accuracy,
            "cell_accuracy": cell_accuracy, "solve_rate": 100.0 * solved / n if n else 0.0,
            "num_solved": solved, "correct_cells": correct_cells, "empty_cells": empty_cells}


TASK = base.register(SudokuTask())
