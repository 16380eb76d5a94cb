"""GSM8K (`docs/tasks.md` §2): data, prompts, d1-family rewards (max 4.0) and evaluation scorer."""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

from dmpo_jax.tasks import base
from dmpo_jax.tasks import d1_eval
from dmpo_jax.tasks import format_rewards as fmt
from dmpo_jax.tasks import math_utils
from dmpo_jax.tasks import text_scan

# `docs/tasks.md` §2.3 (note the space after "\boxed{}.").
GSM_SYSTEM_PROMPT = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the "
    "final answer in a \\boxed{}. \nRespond in the following format:\n<reasoning>\nYour reasoning "
    "here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>")


def extract_hash_answer(solution: str) -> str:
  """Gold answer: the text after ``####``, stripped (d1 ``extract_hash_answer``)."""
  if "####" not in solution:
    raise ValueError(f"GSM8K solution has no '####' line: {solution[-80:]!r}")
  return solution.split("####")[-1].strip()


@text_scan.bounded
def int_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """0.5 if the answer is an integer. d1: ``extract_xml_answer(r).isdigit()`` (no sign, no commas);
  fixed: the answer region (`text_scan.answer_region`) is an integer in any common form
  (`math_utils.numeric_answer`: bare, ``\\boxed{}``, ``$``, thousands commas, final period, unit)."""
  del example
  if base.check_reward_style(style) != "fixed":
    return 0.5 if fmt.extract_xml_answer_d1(completion).isdigit() else 0.0
  value = math_utils.numeric_answer(text_scan.answer_region(completion))
  return 0.5 if value is not None and value.denominator == 1 else 0.0


@text_scan.bounded
def correctness_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """2.0 if the answer equals the gold. d1: exact string compare of ``extract_xml_answer`` (the
  whole completion when there is no tag); fixed: the answer region (the last ``<answer>``, closed
  or cut at the end) holds a number in any common form (`math_utils.numeric_answer`) exactly
  equal to the gold, e.g. ``<answer>\\n\\boxed{43500}\\n</answer>`` for 43500 (a scale word
  scales it: ``18 thousand`` is 18000)."""
  gold = example["answer"]
  if base.check_reward_style(style) != "fixed":
    return 2.0 if fmt.extract_xml_answer_d1(completion) == gold else 0.0
  predicted = math_utils.numeric_answer(text_scan.answer_region(completion))
  gold_value = math_utils.numeric_answer(str(gold), units=False)
  return 2.0 if predicted is not None and predicted == gold_value else 0.0


def extract_eval_answer(completion: str) -> Optional[float]:
  """Fixed-style GSM8K answer (d1's rule with its quirks fixed): the first ``\\boxed{}`` (braces
  matched, newlines allowed; an unclosed box gives its leading number) whose content is a number
  in any common form (thousands commas included), else the first number in it; otherwise the last
  number of the answer region (the last ``<answer>``, closed or not)."""
  completion = text_scan.bounded_text(completion)
  # The first number at or after each box start, with searches that only move forwards (box
  # starts increase and a regex match found from an earlier position is the first one from any
  # position up to its start), so thousands of nested boxes cost one pass. Numbers never contain
  # "}", so a match starting inside a closed box is the box's first number.
  found = None
  for start, end in math_utils.boxed_spans(completion, unclosed_leading_number=True):
    if found is not False and (found is None or found.start() < start):
      found = math_utils.NUMBER.search(completion, start) or False
    if found is False or found.start() >= end:
      continue  # no number in this box (empty, "...", words): the next box
    if end - start <= math_utils.MAX_NUMERIC_ANSWER_CHARS:
      value = math_utils.numeric_answer(completion[start:end])
      if value is not None:
        return float(value)
    value = math_utils.parse_number(found.group())
    if value is not None:
      return value
  region = text_scan.answer_region(completion)
  if region:
    return math_utils.last_number(region)
  return None


class GSM8KTask(base.Task):
  name = "gsm8k"
  reference_fields = ("answer",)

  def normalize(self, row: base.Example) -> base.Example:
    solution = row.get("solution", row["answer"])
    if "####" in str(row["answer"]):
      gold = extract_hash_answer(row["answer"])
    else:
      gold = str(row["answer"]).strip()
    return {"question": row.get("question", ""), "answer": gold, "solution": solution}

  def load_train(self, source=None, data_dir=None) -> List[base.Example]:
    if source is None:
      source = base.default_data_file("gsm8k", "gsm8k/train.jsonl", data_dir)
    return self.load_rows(source, split="train", hf_config="main")

  def load_eval(self, source=None, data_dir=None) -> List[base.Example]:
    if source is None:
      source = base.default_data_file("gsm8k", "gsm8k/test.jsonl", data_dir)
    return self.load_rows(source, split="test", hf_config="main")

  def train_prompt(self, example: base.Example) -> base.PromptSpec:
    return base.PromptSpec(base.user_message(base.SYSTEM_PROMPT + "\n\n" + example["question"]))

  def eval_prompt(self, example: base.Example) -> base.PromptSpec:
    return base.PromptSpec(base.user_message(GSM_SYSTEM_PROMPT + "\n\n" + example["question"]),
                           prefill=base.REASONING_PREFILL)

  def reward_functions(self, style: str = base.DEFAULT_REWARD_STYLE, **options: Any
                       ) -> List[Tuple[str, base.RewardFn]]:
    base.check_reward_style(style)
    return [
        ("xmlcount", functools.partial(fmt.xmlcount_reward, style=style)),
        ("soft_format", functools.partial(fmt.soft_format_reward, style=style)),
        ("strict_format", functools.partial(fmt.strict_format_reward, style=style)),
        ("int", functools.partial(int_reward, style=style)),
        ("correctness", functools.partial(correctness_reward, style=style)),
    ]

  def score(self, completion: str, example: base.Example, eval_style: str = base.DEFAULT_EVAL_STYLE,
            **options: Any) -> Dict[str, Any]:
    if base.check_eval_style(eval_style) == "d1":
      return d1_eval.score_row(self.name, completion, example)
    predicted = extract_eval_answer(completion)
    gold = math_utils.parse_number(str(example["answer"]))
    correct = predicted is not None and gold is not None and predicted == gold
    return {"score": float(correct), "correct": bool(correct), "extracted": predicted}


TASK = base.register(GSM8KTask())
