"""d1-family format rewards shared by the GSM8K task (`docs/tasks.md` §2.4, §9).

All functions have the picklable signature ``reward(completion, example, style) -> float`` and are
bound to a style with ``functools.partial``. ``style`` is one of ``base.REWARD_STYLES``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from dmpo_jax.tasks import text_scan
from dmpo_jax.tasks.base import check_reward_style

# The d1/DMPO format regexes, r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>" (soft) and
# r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$" (strict), are compiled
# *without* re.DOTALL (quirk, `docs/tasks.md` §2.4); "fixed" adds it. Both are evaluated by the
# linear-time equivalents in `text_scan` (the regexes are quadratic on repeated tags).


def extract_xml_answer_d1(text: str) -> str:
  """d1: ``text.split("<answer>")[-1].split("</answer>")[0].strip()`` (whole text if no tag)."""
  return text.split("<answer>")[-1].split("</answer>")[0].strip()


def last_answer_block(text: str) -> Optional[str]:
  """Content of the last complete ``<answer>...</answer>`` block, stripped; None if there is none."""
  return text_scan.last_answer_block(text)


@text_scan.bounded
def xmlcount_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """d1 ``count_xml``: 0.125 per well-formed tag line, minus 0.001 per trailing character.

  d1/dmpo: the trailing text after ``\\n</answer>\\n`` is penalised in the third branch and the
  text after ``\\n</answer>`` (minus one) again in the fourth (double penalty; when the completion
  has no ``\\n</answer>\\n`` the third branch measures the *whole* text). spg: the third branch
  measures the text after ``\\n<answer>\\n``. These styles keep the reference's penalty, which
  has no floor but the text's length: the reward lies in [-0.002 n, 0.5] for a completion of n
  characters (`reward_ranges`). fixed: penalty applied once, on the text after the last
  ``\\n</answer>`` with whitespace stripped, and at most the closing tag's 0.125, so the reward
  lies in [0, 0.5].
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
      count -= min(0.125, len(text.split("\n</answer>")[-1].strip()) * 0.001)
    else:
      count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
  return count


@text_scan.bounded
def soft_format_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """0.5 if ``re.match(<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>)``; DOTALL only if fixed."""
  del example
  dotall = check_reward_style(style) == "fixed"
  return 0.5 if text_scan.soft_format_matches(completion, dotall) else 0.0


@text_scan.bounded
def strict_format_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """0.5 if the completion is exactly the d1 layout (``^<reasoning>\\n...\\n</answer>\\n$``)."""
  del example
  dotall = check_reward_style(style) == "fixed"
  return 0.5 if text_scan.strict_format_matches(completion, dotall) else 0.0
