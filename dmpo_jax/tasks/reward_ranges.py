"""The documented range of every training reward (`docs/tasks.md` §9.3), as data the tests check.

A range is a finite set of values, an interval ``(low, high)``, or a function of the reward
style and the completion's length (in characters, after `text_scan.bounded_text` cuts it) that
returns one. ``tests/test_reward_bounds.py`` checks every reward of every style against it on an
adversarial corpus and on hypothesis-generated text.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional, Tuple, Union

from dmpo_jax.tasks import text_scan

Range = Union[FrozenSet[float], Tuple[float, float], Callable[[str, int], Tuple[float, float]]]


def _xmlcount(style: str, length: int) -> Tuple[float, float]:
  """d1 / dmpo / spg keep the reference's penalty of 0.001 per trailing character (charged up to
  twice), so their floor falls with the length; ``fixed`` caps it (`format_rewards`)."""
  if style == "fixed":
    return (0.0, 0.5)
  return (-0.002 * min(length, text_scan.MAX_TEXT_CHARS), 0.5)


REWARD_RANGES: Dict[Tuple[str, str], Range] = {
    ("gsm8k", "xmlcount"): _xmlcount,
    ("gsm8k", "soft_format"): frozenset({0.0, 0.5}),
    ("gsm8k", "strict_format"): frozenset({0.0, 0.5}),
    ("gsm8k", "int"): frozenset({0.0, 0.5}),
    ("gsm8k", "correctness"): frozenset({0.0, 2.0}),
    ("math", "correctness"): frozenset({0.0, 2.0}),
    ("math", "boxed_and_answer_tags_format"): frozenset({0.25, 0.5, 0.75, 1.0}),
    ("countdown", "countdown"): frozenset({0.0, 0.1, 1.0}),
    ("sudoku", "sudoku"): (0.0, 1.0),
    ("digit_sort", "sort_reward"): frozenset({0.0, 1.0}),
    ("humaneval", "tests_pass"): frozenset({0.0, 1.0}),
    ("mbpp", "tests_pass"): frozenset({0.0, 1.0}),
}


def violation(task: str, reward: str, style: str, completion: str, value: object) -> Optional[str]:
  """Why ``value`` is outside the documented range of ``task``'s ``reward`` (None when inside)."""
  if (task, reward) not in REWARD_RANGES:
    return f"{task}/{reward} has no documented range"
  if not isinstance(value, float):
    return f"{task}/{reward} returned {type(value).__name__}, not float"
  allowed = REWARD_RANGES[(task, reward)]
  if callable(allowed):
    allowed = allowed(style, len(text_scan.bounded_text(completion)))
  if isinstance(allowed, frozenset):
    return None if value in allowed else f"{task}/{reward} ({style}) = {value} not in {sorted(allowed)}"
  low, high = allowed
  return None if low <= value <= high else f"{task}/{reward} ({style}) = {value} not in [{low}, {high}]"
