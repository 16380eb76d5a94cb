"""Safe arithmetic for Countdown rewards and d1-style scoring (`docs/tasks.md` §4).

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
import math
import operator
from fractions import Fraction
from typing import List, Optional, Union

MAX_EXPRESSION_CHARS = 256
_MAX_POWER_BITS = 20000

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
