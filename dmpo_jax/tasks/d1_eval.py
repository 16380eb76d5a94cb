"""d1's evaluation scorer, quirks included (``--eval_style=d1``).

d1 (arXiv 2504.12216), DMPO (arXiv 2510.08233) and BGPO (arXiv 2510.11683) all score GSM8K,
MATH500, Countdown and Sudoku with d1's ``eval/parse_and_get_acc.py``. These functions return,
row for row, what that script returns, so accuracies can be compared with the published tables.
The default ``fixed`` style (the tasks' ``score``) fixes the quirks; ``docs/tasks.md``
§9.1 lists both side by side. The rules, as published:

GSM8K
  1. Every match of ``\\boxed{(.*?)}`` -- *without* DOTALL, so a box whose content spans a
     newline is skipped, and the content stops at the first ``}`` (an unclosed
     ``\\boxed{360\\text{ hours}`` still yields ``360\\text{ hours``) -- in order: stripped; skipped
     if empty or only dots; ``float(content)``, else ``float`` of the first ``-?\\d+\\.?\\d*`` in it
     (so ``43,500`` reads 43); the first box that gives a number wins.
  2. Else the first ``<answer>(.*?)</answer>`` (DOTALL), stripped: ``float`` of it, else of the
     *last* ``-?\\d+\\.?\\d*`` in it.
  3. Correct iff the value ``==`` the gold as a float.
MATH
  1. ``last_boxed_only_string``: the last ``\\boxed``/``\\fbox`` with matched braces; with a
     ``"\\boxed "`` anywhere, ``"\\boxed " +`` the text after the last one up to a ``$``; with no
     box at all, the *whole text*; an unclosed box gives None.
  2. ``remove_boxed`` strips ``\\boxed{``...``}`` (or ``\\boxed ``); None makes it raise, and the
     answer is None.
  3. Only if that answer is None or empty: the first ``<answer>`` block, stripped (so with no box
     the whole text is compared and this fallback is dead code).
  4. Correct iff Hendrycks ``is_equiv`` (string normalisation; ``x/y`` with a non-integer side
     raises inside it, and then the raw strings are compared).
Countdown
  1. The expression: ``remove_boxed(last_boxed_only_string(text))`` (whole text without a box);
     an unclosed box raises, and then the first ``<answer>`` block (stripped), else the whole text.
  2. ``\\div`` -> ``/``, ``\\times`` and ``\\cdot`` -> ``*``.
  3. If ``([0-9+\\-*/() ]+)=[0-9. ]+`` occurs anywhere, the expression is its group, stripped
     (the first ``expr = number`` in the text when the box was unclosed).
  4. Correct iff the ``\\d+`` runs, as ints, sorted, equal the sorted numbers, the expression
     matches ``^[\\d+\\-*/().\\s]+$`` and ``eval`` of it is within 1e-5 of the target.
Sudoku
  1. The first of these (``re.search``, DOTALL) whose group is non-empty after ``strip``:
     ``<answer>.*?```\\s*([\\d\\s]+)````, ``<answer>(.*?)(?:<|eot_id|>|<|endoftext|>|</answer>)``
     (an unclosed ``<answer>`` is read up to an end-of-text token), ``</answer>\\s*(.*?)(?:<|eot_id|>
     |<|endoftext|>|$)`` (text *after* the tag), ``.*?(\\d{16})\\s*</answer>``, ``\\b(\\d{16})\\b``.
  2. Whitespace removed (nothing else: letters and ``<>`` stay, so ``<answer>\\n<>answer>1234``
     reads ``<>answer>1234``), right-padded with ``0`` / cut to 16 characters.
  3. Score = correct originally-empty cells / empty cells; accuracy = sum of correct / sum of
     empty cells over the rows (cell accuracy).

Every scan is linear (`dmpo_jax.tasks.text_scan`); ``tests/test_d1_eval.py`` checks each rule on
hand-written completions and each scan against the published regex on generated text.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from dmpo_jax.tasks import arithmetic, math_utils, text_scan

_FIRST_NUMBER = re.compile(r"-?\d+\.?\d*")
_ONLY_DOTS = re.compile(r"^\.+$")
_DIGIT_RUNS = re.compile(r"\d+")
_D1_CHARACTERS = re.compile(r"^[\d+\-*/().\s]+$")
_DIGITS_OR_SPACE = re.compile(r"[\d\s]*")
_SIXTEEN_DIGITS_WORD = re.compile(r"\b(\d{16})\b")
_DIGITS16 = re.compile(r"\d{16}")
_WHITESPACE = re.compile(r"\s")
_END_TOKENS = ("<|eot_id|>", "<|endoftext|>")
_EXPRESSION_CHARACTERS = frozenset("0123456789+-*/() ")
_VALUE_CHARACTERS = frozenset("0123456789. ")


def boxed_findall_no_dotall(text: str) -> List[str]:
  """``re.findall(r"\\\\boxed{(.*?)}", text)`` (no DOTALL) in linear time."""
  out = []
  close = text_scan.NextFinder(text, "}")
  newline = text_scan.NextFinder(text, "\n")
  position = 0
  while True:
    start = text.find("\\boxed{", position)
    if start < 0:
      return out
    content = start + len("\\boxed{")
    end, line_end = close.at(content), newline.at(content)
    if end >= 0 and (line_end < 0 or end < line_end):
      out.append(text[content:end])
      position = end + 1
    else:
      position = start + 1


def _float_or_none(text: str) -> Optional[float]:
  try:
    return float(text)
  except (ValueError, OverflowError):
    return None


def gsm8k_extract(text: str) -> Optional[float]:
  """The number d1 reads from a GSM8K generation (rules in the module docstring)."""
  for content in boxed_findall_no_dotall(text):
    content = content.strip()
    if not content or content == "..." or _ONLY_DOTS.match(content):
      continue
    value = _float_or_none(content)
    if value is not None:
      return value
    first = _FIRST_NUMBER.search(content)
    if first:
      value = _float_or_none(first.group())
      if value is not None:
        return value
  block = text_scan.first_answer_block(text)
  if block is not None:
    block = block.strip()
    if block:
      value = _float_or_none(block)
      if value is not None:
        return value
      numbers = _FIRST_NUMBER.findall(block)
      if numbers:
        return _float_or_none(numbers[-1])
  return None


def gsm8k_gold(answer: Any) -> Optional[float]:
  """d1's ground truth: the ``####`` answer with commas removed, as a float."""
  return _float_or_none(str(answer).replace(",", "").strip())


def last_boxed_only_string(text: str) -> Optional[str]:
  """d1's helper: as `math_utils.last_boxed_only_string`, but the whole text when it has no
  ``\\boxed``/``\\fbox`` at all."""
  if "\\boxed" not in text and "\\fbox" not in text:
    return text
  return math_utils.last_boxed_only_string(text)


def remove_boxed(boxed: Optional[str]) -> str:
  """d1's helper: raises ``TypeError`` on None; strips ``\\boxed `` or ``\\boxed{...}``, else
  returns its input unchanged."""
  if boxed is None:
    raise TypeError("no closed box")
  if "\\boxed " in boxed:
    return boxed[len("\\boxed "):]
  if boxed.startswith("\\boxed{") and boxed.endswith("}"):
    return boxed[len("\\boxed{"):-1]
  return boxed


def math_extract(text: str) -> Optional[str]:
  try:
    answer: Optional[str] = remove_boxed(last_boxed_only_string(text))
  except TypeError:
    answer = None
  if not answer:
    block = text_scan.first_answer_block(text)
    if block is not None:
      answer = block.strip()
  return answer


def expression_before_equals(text: str) -> Optional[str]:
  """Group 1 of ``re.search(r"([0-9+\\-*/() ]+)=[0-9. ]+", text)`` in linear time.

  ``=`` is outside the expression class, so a match is a maximal run of expression characters
  ending right before a ``=`` that is followed by a value character; the leftmost such run wins.
  """
  position = text.find("=")
  while position >= 0:
    if (position > 0 and text[position - 1] in _EXPRESSION_CHARACTERS
        and position + 1 < len(text) and text[position + 1] in _VALUE_CHARACTERS):
      start = position - 1
      while start > 0 and text[start - 1] in _EXPRESSION_CHARACTERS:
        start -= 1
      return text[start:position]
    position = text.find("=", position + 1)
  return None


def countdown_extract(text: str) -> str:
  try:
    expression = remove_boxed(last_boxed_only_string(text))
  except TypeError:
    block = text_scan.first_answer_block(text)
    expression = block.strip() if block is not None else text
  expression = expression.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
  before = expression_before_equals(expression)
  return before.strip() if before is not None else expression


def countdown_correct(expression: str, numbers: Sequence[int], target: int) -> bool:
  runs = _DIGIT_RUNS.findall(expression)
  if len(runs) != len(numbers):
    return False
  try:
    used = sorted(int(n) for n in runs)
  except ValueError:  # d1's bare except: e.g. more than 4300 digits
    return False
  if used != sorted(int(n) for n in numbers):
    return False
  if not _D1_CHARACTERS.match(expression):
    return False
  try:
    value = arithmetic.evaluate_python_semantics(expression)
    return abs(value - target) < 1e-5
  except (arithmetic.ExpressionError, ArithmeticError, TypeError, ValueError):
    return False


def _search_code_fence_digits(text: str) -> Optional[str]:
  """Group of ``re.search(r"<answer>.*?```\\s*([\\d\\s]+)```", text, re.DOTALL)``."""
  start = text.find("<answer>")
  if start < 0:
    return None
  fence = text.find("```", start + len("<answer>"))
  while fence >= 0:
    body = fence + 3
    end = _DIGITS_OR_SPACE.match(text, body).end()
    if end > body and text.startswith("```", end):
      leading = text_scan.skip_whitespace(text, body)
      return text[min(leading, end - 1):end]
    fence = text.find("```", fence + 1)
  return None


def _search_open_answer(text: str) -> Optional[str]:
  """Group of ``re.search(r"<answer>(.*?)(?:<\\|eot_id\\|>|<\\|endoftext\\|>|</answer>)", DOTALL)``."""
  start = text.find("<answer>")
  if start < 0:
    return None
  start += len("<answer>")
  ends = [e for e in (text.find(t, start) for t in _END_TOKENS + ("</answer>",)) if e >= 0]
  return text[start:min(ends)] if ends else None


def _search_after_answer(text: str) -> Optional[str]:
  """Group of ``re.search(r"</answer>\\s*(.*?)(?:<\\|eot_id\\|>|<\\|endoftext\\|>|$)", DOTALL)``."""
  close = text.find("</answer>")
  if close < 0:
    return None
  start = text_scan.skip_whitespace(text, close + len("</answer>"))
  ends = [e for e in (text.find(t, start) for t in _END_TOKENS) if e >= 0]
  ends.append(len(text))
  if text.endswith("\n") and len(text) - 1 >= start:
    ends.append(len(text) - 1)  # `$` also matches before a final newline
  return text[start:min(ends)]


def _search_digits_before_close(text: str) -> Optional[str]:
  """Group of ``re.search(r".*?(\\d{16})\\s*</answer>", text, re.DOTALL)``."""
  close = text.find("</answer>")
  reversed_text = text[::-1] if close >= 0 else ""
  while close >= 0:
    # Start of the whitespace run before the tag (scanned forwards in the reversed text).
    end = close - (text_scan.skip_whitespace(reversed_text, len(text) - close) - (len(text) - close))
    if end >= 16 and _DIGITS16.fullmatch(text, end - 16, end):
      return text[end - 16:end]
    close = text.find("</answer>", close + 1)
  return None


def _search_sixteen_digit_word(text: str) -> Optional[str]:
  match = _SIXTEEN_DIGITS_WORD.search(text)
  return match.group(1) if match else None


_SUDOKU_CASCADE = (_search_code_fence_digits, _search_open_answer, _search_after_answer,
                   _search_digits_before_close, _search_sixteen_digit_word)


def sudoku_extract(text: str) -> str:
  for search in _SUDOKU_CASCADE:
    group = search(text)
    if group is not None and group.strip():
      return _WHITESPACE.sub("", group.strip())
  return ""


def sudoku_cells(solution: str, puzzle: str, gold: str) -> tuple:
  """(correct empty cells, empty cells); an empty extraction scores 0."""
  empty = [i for i in range(16) if puzzle[i] == "0"]
  if not solution:
    return 0, len(empty)
  solution = (solution + "0" * 16)[:16]
  return sum(1 for i in empty if solution[i] == gold[i]), len(empty)


def score_row(task_name: str, completion: str, example: Dict[str, Any]) -> Dict[str, Any]:
  """One row of d1's scorer for ``task_name`` (gsm8k, math, countdown, sudoku), in the tasks'
  ``score`` format (``score``, ``correct``, ``extracted``; sudoku adds cell counts)."""
  text = text_scan.bounded_text(completion)
  if task_name == "gsm8k":
    value, gold = gsm8k_extract(text), gsm8k_gold(example["answer"])
    correct = value is not None and value == gold
    return {"score": float(correct), "correct": correct, "extracted": value}
  if task_name == "math":
    answer = math_extract(text)
    correct = answer is not None and math_utils.is_equiv(answer, str(example["answer"]),
                                                         reference_exact=True)
    return {"score": float(correct), "correct": bool(correct), "extracted": answer}
  if task_name == "countdown":
    expression = countdown_extract(text)
    correct = countdown_correct(expression, example["numbers"], int(example["target"]))
    return {"score": float(correct), "correct": correct, "extracted": expression}
  if task_name == "sudoku":
    solution = sudoku_extract(text)
    correct_cells, empty_cells = sudoku_cells(solution, example["puzzle"], example["solution"])
    return {"score": correct_cells / empty_cells if empty_cells else 0.0,
            "correct": correct_cells == empty_cells and bool(solution),
            "correct_cells": correct_cells, "empty_cells": empty_cells, "extracted": solution}
  raise ValueError(f"eval_style='d1' exists for gsm8k, math, countdown and sudoku, not {task_name!r}")
