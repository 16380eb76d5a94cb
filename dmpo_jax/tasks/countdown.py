"""Countdown with three numbers (`docs/tasks.md` §4): data, prompts, 1.0 / 0.1 / 0 reward, scorer.

Expressions are never passed to ``eval``. Two evaluators walk the ``ast`` instead:

* ``evaluate_python_semantics`` gives exactly what d1's ``eval(eq, {"__builtins__": None}, {})``
  gives on the character class ``[\\d+\\-*/().\\s]`` (ints, floats, ``+ - * / // **``, unary signs),
  except that a power whose result would have more than ``_MAX_POWER_BITS`` bits raises instead of
  hanging the worker (such a value can never be within 1e-5 of a target, so the reward is the
  same 0.1 d1 would give if it ever finished);
* ``evaluate_exact`` (fixed style) accepts only integers, ``+ - * /``, unary minus and parentheses
  and evaluates with ``fractions.Fraction``; expressions are capped at ``MAX_EXPRESSION_CHARS``.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from dmpo_jax.tasks import base
from dmpo_jax.tasks import math_utils
from dmpo_jax.tasks import text_scan

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
MAX_EXPRESSION_CHARS = 256
_MAX_POWER_BITS = 20000
_D1_CHARACTERS = re.compile(r"^[\d+\-*/().\s]+$")
_TRAILING_VALUE = re.compile(r"=\s*-?[\d.]+\s*$")
_LATEX_OPERATORS = (("\\div", "/"), ("\\times", "*"), ("\\cdot", "*"), ("\u00f7", "/"),
                    ("\u00d7", "*"), ("\u2212", "-"))

Number = Union[int, float, complex]


class ExpressionError(ValueError):
  """The expression is malformed, uses a forbidden construct, or cannot be evaluated."""


def _guarded_power(base_value: Number, exponent: Number) -> Number:
  if isinstance(exponent, (int, float)) and isinstance(base_value, (int, float)):
    magnitude = abs(base_value)
    if magnitude > 1 and exponent > 0 and exponent * math.log2(magnitude) > _MAX_POWER_BITS:
      raise ExpressionError("power too large")
    if 0 < magnitude < 1 and exponent < 0 and -exponent * -math.log2(magnitude) > _MAX_POWER_BITS:
      raise ExpressionError("power too large")
  return base_value ** exponent


_PY_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: _guarded_power}


def evaluate_python_semantics(expression: str) -> Number:
  """What Python's ``eval`` returns for an expression over d1's character class (see module doc)."""
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
    raise ExpressionError(f"not an expression: {e}") from e

  def visit(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
      value = visit(node.operand)
      return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _PY_BINARY:
      left, right = visit(node.left), visit(node.right)
      try:
        return _PY_BINARY[type(node.op)](left, right)
      except (ArithmeticError, TypeError, ValueError) as e:
        raise ExpressionError(str(e)) from e
    raise ExpressionError(f"unsupported construct {type(node).__name__}")

  try:
    return visit(tree.body)
  except RecursionError as e:
    raise ExpressionError("expression nested too deeply") from e


def evaluate_exact(expression: str) -> Fraction:
  """Exact value of an expression of integers, ``+ - * /``, unary minus and parentheses."""
  if len(expression) > MAX_EXPRESSION_CHARS:
    raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
    raise ExpressionError(f"not an expression: {e}") from e

  def visit(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -visit(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
      left, right = visit(node.left), visit(node.right)
      if isinstance(node.op, ast.Add):
        return left + right
      if isinstance(node.op, ast.Sub):
        return left - right
      if isinstance(node.op, ast.Mult):
        return left * right
      if right == 0:
        raise ExpressionError("division by zero")
      return left / right
    raise ExpressionError(f"unsupported construct {type(node).__name__}")

  try:
    return visit(tree.body)
  except RecursionError as e:
    raise ExpressionError("expression nested too deeply") from e


def integer_literals(expression: str) -> Optional[List[int]]:
  """The integer literals of a parsed expression (None if it does not parse)."""
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return None
  return [node.value for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and type(node.value) is int]


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
      from dmpo_jax.tasks import d1_eval  # pylint: disable=import-outside-toplevel
      return d1_eval.score_row(self.name, completion, example)
    expression = extract_eval_expression(completion)
    correct = (_uses_numbers_d1(expression, example["numbers"])
               and _d1_value_matches(expression, int(example["target"])))
    return {"score": float(correct), "correct": bool(correct), "extracted": expression}


TASK = base.register(CountdownTask())
