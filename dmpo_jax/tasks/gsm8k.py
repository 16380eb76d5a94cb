"""GSM8K (`tasks.md` §2): data, prompts, d1-family rewards (max 4.0) and evaluation scorer."""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple

from dmpo_jax.tasks import base
from dmpo_jax.tasks import format_rewards as fmt
from dmpo_jax.tasks import math_utils

# `tasks.md` §2.3 (note the space after "\boxed{}.").
GSM_SYSTEM_PROMPT = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the "
    "final answer in a \\boxed{}. \nRespond in the following format:\n<reasoning>\nYour reasoning "
    "here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>")


def extract_hash_answer(solution: str) -> str:
  """Gold answer: the text after ``####``, stripped (d1 ``extract_hash_answer``)."""
  if "####" not in solution:
    raise ValueError(f"GSM8K solution has no '####' line: {solution[-80:]!r}")
  return solution.split("####")[-1].strip()


def _normalized_fraction(text: Optional[str]) -> Optional[Fraction]:
  """Exact value of a numeric answer after stripping commas, ``$`` and a trailing ``.``."""
  if text is None:
    return None
  cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".").strip()
  if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", cleaned):
    return None
  return Fraction(cleaned)


def int_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """0.5 if the answer is an integer. d1: ``extract_xml_answer(r).isdigit()`` (no sign, no commas);
  fixed: the last ``<answer>`` block, normalised, matches ``-?\\d+``."""
  del example
  if base.check_reward_style(style) != "fixed":
    return 0.5 if fmt.extract_xml_answer_d1(completion).isdigit() else 0.0
  answer = fmt.last_answer_block(completion)
  if answer is None:
    return 0.0
  cleaned = answer.replace(",", "").replace("$", "").strip().rstrip(".").strip()
  return 0.5 if re.fullmatch(r"-?\d+", cleaned) else 0.0


def correctness_reward(completion: str, example: Dict[str, Any], style: str = "fixed") -> float:
  """2.0 if the answer equals the gold. d1: exact string compare of ``extract_xml_answer`` (the
  whole completion when there is no tag); fixed: tag required, exact numeric compare."""
  gold = example["answer"]
  if base.check_reward_style(style) != "fixed":
    return 2.0 if fmt.extract_xml_answer_d1(completion) == gold else 0.0
  predicted = _normalized_fraction(fmt.last_answer_block(completion))
  gold_value = _normalized_fraction(gold)
  return 2.0 if predicted is not None and predicted == gold_value else 0.0


def extract_eval_answer(completion: str) -> Optional[float]:
  """`tasks.md` §2.5: the first ``\\boxed{}`` whose content is not ``...`` and parses as a float
  (else the first number in it); otherwise the last number inside ``<answer>``."""
  for content in math_utils.boxed_contents(completion):
    if content.strip() == "...":
      continue
    value = math_utils.parse_number(content)
    if value is None:
      value = math_utils.first_number(content)
    if value is not None:
      return value
  match = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
  if match:
    return math_utils.last_number(match.group(1))
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

  def score(self, completion: str, example: base.Example, **options: Any) -> Dict[str, Any]:
    predicted = extract_eval_answer(completion)
    gold = math_utils.parse_number(str(example["answer"]))
    correct = predicted is not None and gold is not None and predicted == gold
    return {"score": float(correct), "correct": bool(correct), "extracted": predicted}


TASK = base.register(GSM8KTask())
