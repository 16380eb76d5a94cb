"""`digit_sort`: the built-in demo task (no download, learnable by the tiny model on a CPU).

Prompt: ``n`` random digits followed by ``=`` (e.g. ``3142=``); the correct completion is the
digits in ascending order (``1234``) followed by EOS. Reward 1.0 for the exact ascending string,
0 otherwise (the text after the first EOS is ignored by decoding).

The warm-up demonstrations are deliberately *mixed*: a fraction ``ascending_fraction`` of them
shows the ascending order and the rest the descending order. After masked-diffusion SFT on them
the model can sort, but its greedy answer follows the majority (descending) order; RL with the
ascending reward must move it. Train and held-out prompts are disjoint digit strings (split by a
hash of the string), so the held-out accuracy measures generalisation, not memorisation; the
held-out strings are distinct, so each counts once.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Optional

import numpy as np

from dmpo_jax.tasks import base

Example = Dict[str, Any]


def _is_held_out(digits: str, held_out_fraction: float) -> bool:
  return (zlib.crc32(digits.encode()) % 10_000) < held_out_fraction * 10_000


def generate_examples(num_examples: int, *, num_digits: int = 4, split: str = "train",
                      seed: int = 0, held_out_fraction: float = 0.2,
                      ascending_fraction: float = 1.0, distinct: bool = False) -> List[Example]:
  """Random digit strings of the requested split (by hash: train and test never share one).

  Each example holds ``digits`` (prompt), ``answer`` (ascending, what the reward checks) and
  ``demonstration`` (the SFT target: ascending w.p. ``ascending_fraction``, else descending).
  ``distinct``: no digit string twice (the held-out set); more examples than the split has
  distinct strings is a ValueError.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if not 0.0 < held_out_fraction < 1.0:
    raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
  if distinct and num_digits <= 6:
    available = sum(_is_held_out(f"{i:0{num_digits}d}", held_out_fraction) == (split == "test")
                    for i in range(10 ** num_digits))
    if num_examples > available:
      raise ValueError(f"the {split} split has {available} distinct {num_digits}-digit strings, "
                       f"fewer than the {num_examples} requested")
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  out: List[Example] = []
  seen = set()
  while len(out) < num_examples:
    digits = "".join(str(d) for d in rng.integers(0, 10, num_digits))
    if _is_held_out(digits, held_out_fraction) != (split == "test"):
      continue
    if distinct:
      if digits in seen:
        continue
      seen.add(digits)
    answer = "".join(sorted(digits))
    demo = answer if rng.random() < ascending_fraction else answer[::-1]
    out.append({"digits": digits, "answer": answer, "demonstration": demo})
  return out


def sort_reward(completion: str, example: Example) -> float:
  """1.0 when the completion (stripped) is exactly the ascending digits, else 0.0."""
  return 1.0 if completion.strip() == example["answer"] else 0.0


class DigitSortTask(base.Task):
  """See the module docstring. Prompts are raw text (no chat template) to keep sequences short."""

  name = "digit_sort"
  reference_fields = ("digits", "answer")
  use_chat_template = False

  def __init__(self, num_digits: int = 4):
    self.num_digits = num_digits

  def load_train(self, source: Optional[str] = None, data_dir=None, *, num_examples: int = 4096,
                 seed: int = 0, ascending_fraction: float = 1.0) -> List[Example]:
    if source:
      return self.load_rows(source)
    return generate_examples(num_examples, num_digits=self.num_digits, split="train", seed=seed,
                             ascending_fraction=ascending_fraction)

  def load_eval(self, source: Optional[str] = None, data_dir=None, *, num_examples: int = 256,
                seed: int = 0) -> List[Example]:
    if source:
      return self.load_rows(source)
    return generate_examples(num_examples, num_digits=self.num_digits, split="test", seed=seed,
                             distinct=True)

  def run_data(self, config: Any) -> base.RunData:
    """Generated prompts seeded by ``config.seed`` (unless files are given); the warm-up set is
    a fresh sample whose demonstrations are ascending w.p. ``sft.ascending_fraction``."""
    train = self.load_train(config.task.train_source or None, seed=config.seed)
    warmup = self.load_train(None, seed=config.seed + 1,
                             ascending_fraction=config.sft.ascending_fraction
                             ) if config.sft.num_steps else []
    held_out = self.load_eval(config.task.eval_source or None,
                              num_examples=config.eval.num_examples, seed=config.seed)
    return base.RunData(train, warmup, held_out)

  def demonstration(self, example: Example) -> str:
    """The example's mixed-order SFT target (``demonstration``)."""
    return example.get("demonstration", example.get("answer", ""))

  def normalize(self, row: Example) -> Example:
    digits = str(row["digits"])
    if not digits.isdigit():
      raise ValueError(f"digits must be a digit string, got {digits!r}")
    answer = "".join(sorted(digits))
    return {"digits": digits, "answer": answer, "demonstration": str(row.get("demonstration", answer))}

  def train_prompt(self, example: Example) -> base.PromptSpec:
    return base.PromptSpec(base.user_message(example["digits"] + "="))

  eval_prompt = train_prompt

  def reward_functions(self, style: str = base.DEFAULT_REWARD_STYLE, **options: Any):
    base.check_reward_style(style)
    return [("sort_reward", sort_reward)]

  def score(self, completion: str, example: Example, **options: Any) -> Dict[str, Any]:
    base.check_eval_style(options.get("eval_style", base.DEFAULT_EVAL_STYLE), self.name)
    correct = sort_reward(completion, example) == 1.0
    return {"score": float(correct), "correct": correct, "extracted": completion.strip()}


TASK = base.register(DigitSortTask())
