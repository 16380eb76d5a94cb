"""d1-family format rewards shared by the GSM8K task (`tasks.md` §2.4, §9).

All functions have the picklable signature ``reward(completion, example, style) -> float`` and are
bound to a style with ``functools.partial``. ``style`` is one of ``base.REWARD_STYLES``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

from dmpo_jax.tasks.base import check_reward_style

# d1/DMPO regexes are compiled *without* re.DOTALL (quirk, `tasks.md` §2.4); "fixed" adds it.
_SOFT_PATTERN = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
_STRICT_PATTERN = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
_SOFT_D1 = re.compile(_SOFT_PATTERN)
_STRICT_D1 = re.compile(_STRICT_PATTERN)
_SOFT_FIXED = re.compile(_SOFT_PATTERN, re.DOTALL)
_STRICT_FIXED = re.compile(_STRICT_PATTERN, re.DOTALL)
_ANSWER_BLOCKS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_xml_answer_d1(text: str) -> str:
  """d1: ``text.split("<answer>")[-1].split("</answer>")[0].strip()`` (whole text if no tag)."""
  return text.split("<answer>")[-1].split("</answer>")[0].strip()


def last_answer_block(text: str) -> Optional[str]:
  """Content of the last complete ``<answer>...</answer>`` block, stripped; None if there is none."""
  blocks = _ANSWER_BLOCKS.findall(text)
  return blocks[-1].strip() if blocks else None


def xmlcount_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """d1 ``count_xml``: 0.125 per well-formed tag line, minus 0.001 per trailing character.

  d1/dmpo: the trailing text after ``\\n</answer>\\n`` is penalised in the third branch and the
  text after ``\\n</answer>`` (minus one) again in the fourth (double penalty; when the completion
  has no ``\\n</answer>\\n`` the third branch measures the *whole* text). spg: the third branch
  measures the text after ``\\n<answer>\\n``. fixed: penalty applied once, on the text after the
  last ``\\n</answer>`` with whitespace stripped, so the maximum is exactly 0.5.
  """
  del example
  style = check_reward_style(style)
  text = completion
  count = 0.0
  if text.count("<reasoning>\n") == 1:
    count += 0.125
  if text.count("\n</reasoning>\n") == 1:
    count += 0.125
  if text.count("\n<answer>\n") == 1:
    count += 0.125
    if style in ("d1", "dmpo"):
      count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    elif style == "spg":
      count -= len(text.split("\n<answer>\n")[-1]) * 0.001
  if text.count("\n</answer>") == 1:
    count += 0.125
    if style == "fixed":
      count -= len(text.split("\n</answer>")[-1].strip()) * 0.001
    else:
      count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
  return count


def soft_format_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """0.5 if ``re.match(<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>)``; DOTALL only if fixed."""
  del example
  pattern = _SOFT_FIXED if check_reward_style(style) == "fixed" else _SOFT_D1
  return 0.5 if pattern.match(completion) else 0.0


def strict_format_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """0.5 if the completion is exactly the d1 layout (``^<reasoning>\\n...\\n</answer>\\n$``)."""
  del example
  pattern = _STRICT_FIXED if check_reward_style(style) == "fixed" else _STRICT_D1
  return 0.5 if pattern.match(completion) else 0.0
