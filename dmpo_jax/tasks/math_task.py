"""MATH (train) / MATH500 (test) (`docs/tasks.md` §3): data, prompts, rewards (max 3.0) and scorer.

The module is not called ``math.py`` so it never shadows the standard library module.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

from dmpo_jax.tasks import base
from dmpo_jax.tasks import d1_eval
from dmpo_jax.tasks import math_utils
from dmpo_jax.tasks import text_scan

MATH_INSTRUCTION = ("You are a math expert. You will be given a question to solve. Solve it step by "
                    "step. Wrap the final answer in a \\boxed{}. ")

# `docs/tasks.md` §3.3: the stray quote and the space after </answer> are in every d1-lineage copy.
MATH500_SYSTEM_PROMPT = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the "
    "final answer in a \\boxed{}.\nRespond in the following format:\n<reasoning>\nYour reasoning "
    "here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>\" \n")


def gold_answer(example: base.Example) -> Optional[str]:
  """The reference answer: the ``answer`` field, else the last ``\\boxed{}`` of ``solution``."""
  if example.get("answer") not in (None, ""):
    return str(example["answer"])
  return math_utils.remove_boxed(math_utils.last_boxed_only_string(example.get("solution", "")))


def answers_equivalent(predicted: Optional[str], gold: Optional[str],
                       use_math_verify: bool = False) -> bool:
  """Fixed-style equivalence of one answer with the gold (`docs/tasks.md` §9): no credit for an
  answer that offers alternatives (``17 \\text{ (or } 18)``); the same text; else, when the
  answer is a number (a scale word scales it: ``18 thousand`` = 18000) and the gold a plain
  number, equal values; a scaled answer never matches otherwise; else Hendrycks ``is_equiv``, or
  (optional) math-verify under its hard timeout (`math_utils.math_verify_equal`)."""
  if predicted is None or gold is None:
    return False
  if math_utils.states_alternatives(predicted) and not math_utils.states_alternatives(gold):
    return False
  if "".join(predicted.split()) == "".join(gold.split()):
    return True
  value = math_utils.numeric_answer(predicted)
  if value is not None:
    gold_value = math_utils.numeric_answer(gold, units=False)
    if gold_value is not None:
      return value == gold_value
  if math_utils.has_scale_word(predicted):
    return False  # Hendrycks' unit stripping and math-verify would drop the scale word
  if math_utils.is_equiv(predicted, gold):
    return True
  return bool(use_math_verify) and math_utils.math_verify_equal(gold, predicted)


def fixed_answer(completion: str) -> Optional[str]:
  """The fixed-style MATH answer: the answer region's final answer (its last ``\\boxed{}``, an
  unclosed box's tail, or the bare content without ``$``/``\\(\\)`` and final period); with no
  ``<answer>`` tag, the last ``\\boxed{}`` of the completion."""
  region = text_scan.answer_region(completion)
  if region:
    return math_utils.unwrap_answer(region)
  return math_utils.remove_boxed(math_utils.last_boxed_only_string(completion))


@text_scan.bounded
def correctness_reward(completion: str, example: Dict[str, Any], style: str = "fixed",
                       use_math_verify: bool = False) -> float:
  """2.0 if the answer is equivalent to the gold (`docs/tasks.md` §3.4).

  d1/dmpo/spg: ``is_equiv(remove_boxed(last_boxed_only_string(r)), gold)``. fixed: the answer in
  the ``<answer>`` region in any common form (`fixed_answer`), compared by `answers_equivalent`
  (``use_math_verify`` adds math-verify, run in a worker process under a hard timeout).
  """
  style = base.check_reward_style(style)
  gold = gold_answer(example)
  if style != "fixed":
    predicted = math_utils.remove_boxed(math_utils.last_boxed_only_string(completion))
    return 2.0 if predicted is not None and math_utils.is_equiv(predicted, gold) else 0.0
  return 2.0 if answers_equivalent(fixed_answer(completion), gold, use_math_verify) else 0.0


@text_scan.bounded
def boxed_and_answer_tags_format_reward(completion: str, example: Dict[str, Any],
                                        style: str = "fixed") -> float:
  """0.5 x (tag + boxed): tag 1.0 if an ``<answer>`` region exists; boxed 1.0 if ``\\boxed``
  occurs in it (in the whole text without tag), else 0.5. Values {1.0, 0.75, 0.5, 0.25}.

  d1: the check string is ``"\\b" + "oxed"`` = backspace + "oxed" (never found), so only 0.75 or
  0.25. d1/dmpo/spg: region = text between the first ``<answer>`` and the next ``</answer>`` (or the
  end). fixed: region = the last complete ``<answer>...</answer>`` block.
  """
  del example
  style = base.check_reward_style(style)
  needle = "\boxed" if style == "d1" else "\\boxed"  # "\b" is a backspace: the d1 bug
  if style == "fixed":
    region = text_scan.last_answer_block(completion)
    has_tags = region is not None
  else:
    pieces = completion.split("<answer>", 2)
    has_tags = len(pieces) > 1
    region = pieces[1].split("</answer>", 1)[0] if has_tags else None
  if region is None:
    region = completion
  tag_score = 1.0 if has_tags else 0.0
  boxed_score = 1.0 if needle in region else 0.5
  return 0.5 * (tag_score + boxed_score)


def extract_eval_answer(completion: str) -> Optional[str]:
  """Fixed-style MATH500 answer: the last ``\\boxed{}``, falling back to the content of the last
  complete ``<answer>`` block (d1 compares the whole text when there is no box)."""
  completion = text_scan.bounded_text(completion)
  boxed = math_utils.remove_boxed(math_utils.last_boxed_only_string(completion))
  if boxed is not None:
    return boxed
  return text_scan.last_answer_block(completion)


class MathTask(base.Task):
  name = "math"
  reference_fields = ("answer",)

  def __init__(self, strip_quote: bool = False):
    self.strip_quote = strip_quote

  def normalize(self, row: base.Example) -> base.Example:
    example = {"problem": row.get("problem", ""), "solution": row.get("solution", ""),
               "answer": row.get("answer")}
    example["answer"] = gold_answer(example)
    if example["answer"] is None:
      raise ValueError("no 'answer' field and no \\boxed{} in 'solution'")
    for key in ("subject", "level", "unique_id"):
      if key in row:
        example[key] = row[key]
    return example

  def load_train(self, source=None, data_dir=None) -> List[base.Example]:
    """d1/DMPO train on ``ankner/math-500`` (train split), which ``launch/prepare_data.py
    --task=math`` writes to ``<data folder>/math/train.jsonl`` (the default). Any local
    JSONL/JSON/parquet file with ``problem`` and ``solution`` (or ``answer``), or a HF name, also
    works."""
    if source is None:
      source = base.default_data_file("math", "math/train.jsonl", data_dir)
    return self._with_problems(self.load_rows(source, split="train"), source)

  @staticmethod
  def _with_problems(examples: List[base.Example], source: str) -> List[base.Example]:
    for index, example in enumerate(examples):
      if not example["problem"]:
        raise ValueError(f"{source}: row {index} has no 'problem'")
    return examples

  def load_eval(self, source=None, data_dir=None) -> List[base.Example]:
    if source is None:
      source = base.default_data_file("math", "math500/test.jsonl", data_dir)
    return self._with_problems(self.load_rows(source, split="test"), source)

  def train_prompt(self, example: base.Example) -> base.PromptSpec:
    content = base.SYSTEM_PROMPT + "\n\n" + MATH_INSTRUCTION + "\n\n" + example["problem"]
    return base.PromptSpec(base.user_message(content))

  def eval_prompt(self, example: base.Example) -> base.PromptSpec:
    system = MATH500_SYSTEM_PROMPT
    if self.strip_quote:
      system = system.replace("</answer>\" \n", "</answer>\n")
    return base.PromptSpec(base.user_message(system + "\n\n" + example["problem"]),
                           prefill=base.REASONING_PREFILL)

  def reward_functions(self, style: str = base.DEFAULT_REWARD_STYLE, use_math_verify: bool = False,
                       **options: Any) -> List[Tuple[str, base.RewardFn]]:
    base.check_reward_style(style)
    return [
        ("correctness", functools.partial(correctness_reward, style=style,
                                          use_math_verify=use_math_verify)),
        ("boxed_and_answer_tags_format",
         functools.partial(boxed_and_answer_tags_format_reward, style=style)),
    ]

  def score(self, completion: str, example: base.Example, use_math_verify: bool = False,
            eval_style: str = base.DEFAULT_EVAL_STYLE, **options: Any) -> Dict[str, Any]:
    if base.check_eval_style(eval_style) == "d1":
      return d1_eval.score_row(self.name, completion, {"answer": gold_answer(example)})
    predicted = extract_eval_answer(completion)
    correct = answers_equivalent(predicted, gold_answer(example), use_math_verify)
    return {"score": float(correct), "correct": bool(correct), "extracted": predicted}


TASK = base.register(MathTask())
