"""Countdown with three numbers (`docs/tasks.md` §4): data, prompts, 1.0 / 0.1 / 0 reward, scorer.

Expressions are evaluated by the ``ast`` walkers of `arithmetic` (never ``eval``):
``evaluate_python_semantics`` for d1's rules, ``evaluate_exact`` for the fixed style.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Sequence, Tuple

from dmpo_jax.tasks import base, d1_eval, math_utils, text_scan
from dmpo_jax.tasks.arithmetic import (  # noqa: F401  (re-exported: countdown.ExpressionError, ...)
    MAX_EXPRESSION_CHARS, ExpressionError, Number, evaluate_exact, evaluate_python_semantics,
    integer_literals)

# `docs/tasks.md` §4.3 (no space between "\boxed{a + b * c}" and "Respond").
CTD_SYSTEM_PROMPT = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the "
    "provided target number. You may use the operations +, -, *, and / as needed, but each number "
    "must be used exactly once. Think step-by-step. After reasoning, provide only your final "
    "expression inside \\boxed{} tags without including an equals sign or the target number. For "
    "example: \\boxed{a + b * c}Respond in the following format:\n<reasoning>\nYour reasoning "
    "here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>")

TRAIN_TEMPLATE = (
    "{system}\nUsing only the numbers {nums}, create an arithmetic expression that evaluates to "
    "exactly {target}. You must use all numbers from the list, and each number must be used exactly "
    "once. You may use the operations +, -, *, and / as needed. After reasoning, provide only your "
    "final expression inside <answer></answer> tags without including an equals sign or the target "
    "number. For example, if the numbers are [2, 3, 4] and the target is 5, a valid answer is: "
    "<answer>\n2*4-3\n</answer>")

FORMAT_SCORE = 0.1
SUCCESS_SCORE = 1.0
_D1_CHARACTERS = re.compile(r"^[\d+\-*/().\s]+$")
_TRAILING_VALUE = re.compile(r"=\s*-?[\d.]+\s*$")
_LATEX_OPERATORS = (("\\div", "/"), ("\\times", "*"), ("\\cdot", "*"), ("\u00f7", "/"),
                    ("\u00d7", "*"), ("\u2212", "-"))


def _uses_numbers_d1(expression: str, numbers: Sequence[int]) -> bool:
  """d1: the ``\\d+`` runs, as ints, sorted, equal the sorted numbers (False when a run cannot be
  converted, e.g. more than 4300 digits, as d1's bare ``except`` gives)."""
  runs = re.findall(r"\d+", expression)
  if len(runs) != len(numbers):
    return False
  try:
    return sorted(int(n) for n in runs) == sorted(int(n) for n in numbers)
  except ValueError:
    return False


def _d1_value_matches(expression: str, target: int) -> bool:
  if not _D1_CHARACTERS.match(expression):
    return False
  try:
    value = evaluate_python_semantics(expression)
    return abs(value - target) < 1e-5
  except (ExpressionError, ArithmeticError, TypeError, ValueError):
    return False


def fixed_expression(region: str) -> str:
  """The expression in an answer region, in any common form: the last ``\\boxed{}`` (or an
  unclosed box's tail), without ``$``/``\\(\\)`` and a final period, LaTeX/Unicode operators
  mapped to ``/ * -``, a trailing ``= value`` removed."""
  expression = math_utils.unwrap_answer(region)
  for latex, python in _LATEX_OPERATORS:
    expression = expression.replace(latex, python)
  return _TRAILING_VALUE.sub("", expression.strip()).strip()


@text_scan.bounded
def countdown_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """d1 ``compute_score`` (`docs/tasks.md` §4.4): last ``<answer>`` block; none -> 0; numbers not used
  exactly once -> 0.1; bad characters / evaluation error -> 0.1; 1.0 if within 1e-5 of the target.

  fixed: the answer region (last ``<answer>``, closed or cut at the end) in any common form
  (`fixed_expression`: ``\\boxed{}``, ``$``, ``\\times``, ``= target``); its numbers are the integer
  literals of the parsed expression (so "2.5" is no longer read as 2 and 5); only ``+ - * /`` on
  integers, exact rational arithmetic, exact equality.
  """
  style = base.check_reward_style(style)
  numbers, target = example["numbers"], int(example["target"])
  if style != "fixed":
    expression = text_scan.last_answer_block(completion)
    if expression is None:
      return 0.0
    if not _uses_numbers_d1(expression, numbers):
      return FORMAT_SCORE
    return SUCCESS_SCORE if _d1_value_matches(expression, target) else FORMAT_SCORE
  region = text_scan.answer_region(completion)
  if region is None:
    return 0.0
  expression = fixed_expression(region)
  literals = integer_literals(expression) if len(expression) <= MAX_EXPRESSION_CHARS else None
  if literals is None or sorted(literals) != sorted(int(n) for n in numbers):
    return FORMAT_SCORE
  try:
    return SUCCESS_SCORE if evaluate_exact(expression) == target else FORMAT_SCORE
  except ExpressionError:
    return FORMAT_SCORE


def extract_eval_expression(completion: str) -> str:
  """Fixed-style Countdown expression (`docs/tasks.md` §4.5, quirks fixed): the last ``\\boxed{}``
  (an unclosed box: the text after it), else the last ``<answer>`` content, else the raw text;
  LaTeX operators mapped to ``/ * *``; a trailing ``= number`` removed."""
  completion = text_scan.bounded_text(completion)
  if "\\boxed{" in completion:
    return fixed_expression(completion[completion.rfind("\\boxed"):])
  region = text_scan.answer_region(completion)
  return fixed_expression(completion if region is None else region)


class CountdownTask(base.Task):
  name = "countdown"
  reference_fields = ("numbers", "target")
  default_eval_size = 256

  def normalize(self, row: base.Example) -> base.Example:
    if "numbers" in row or "nums" in row:
      numbers = row.get("numbers", row.get("nums"))
      if isinstance(numbers, str):
        numbers = [int(n) for n in numbers.replace("[", "").replace("]", "").split(",")]
      target = row["target"]
    else:  # d1 test file: {"input": "30,100,93", "output": "23"}
      numbers = [int(n) for n in str(row["input"]).split(",")]
      target = row["output"]
    return {"numbers": [int(n) for n in numbers], "target": int(target)}

  def load_train(self, source=None, data_dir=None) -> List[base.Example]:
    """A local/HF source (e.g. ``Jiayi-Pan/Countdown-Tasks-3to4``, filtered to three numbers), or
    — with no source — the offline generator (`generators.countdown_split`)."""
    if source is None:
      from dmpo_jax.tasks import generators  # pylint: disable=import-outside-toplevel
      train, _ = generators.countdown_split()
      return train
    return [e for e in self.load_rows(source, split="train") if len(e["numbers"]) == 3]

  def load_eval(self, source=None, data_dir=None) -> List[base.Example]:
    if source is None:
      source = base.default_data_file("countdown", "countdown/cd3_test.jsonl", data_dir)
    return self.load_rows(source, split="test")

  def train_prompt(self, example: base.Example) -> base.PromptSpec:
    content = TRAIN_TEMPLATE.format(system=base.SYSTEM_PROMPT, nums=list(example["numbers"]),
                                    target=example["target"])
    return base.PromptSpec(base.user_message(content))

  def eval_prompt(self, example: base.Example) -> base.PromptSpec:
    question = f"Numbers: {list(example['numbers'])}\nTarget: {example['target']}"
    return base.PromptSpec(base.user_message(CTD_SYSTEM_PROMPT + "\n\n" + question),
                           prefill=base.REASONING_PREFILL)

  def reward_functions(self, style: str = base.DEFAULT_REWARD_STYLE, **options: Any
                       ) -> List[Tuple[str, base.RewardFn]]:
    base.check_reward_style(style)
    return [("countdown", functools.partial(countdown_reward, style=style))]

  def score(self, completion: str, example: base.Example, eval_style: str = base.DEFAULT_EVAL_STYLE,
            **options: Any) -> Dict[str, Any]:
    if base.check_eval_style(eval_style) == "d1":
      return d1_eval.score_row(self.name, completion, example)
    expression = extract_eval_expression(completion)
    correct = (_uses_numbers_d1(expression, example["numbers"])
               and _d1_value_matches(expression, int(example["target"])))
    return {"score": float(correct), "correct": bool(correct), "extracted": expression}


TASK = base.register(CountdownTask())
