"""Checks of a run's prompts before training: held-out duplicates and prompt truncation.

* **Held-out duplicates** (`distinct_held_out`): a held-out example whose prompt repeats an
  earlier held-out prompt, or a training prompt, is dropped (with a warning giving the counts),
  so held-out accuracy counts each distinct unseen prompt once. Prompts are compared as the
  model sees them at evaluation (`task.eval_prompt`: messages and prefill), the same rendering
  for both sets.
* **Truncation** (`check_truncation`): prompts longer than ``task.prompt_length`` keep only
  their last tokens (`rollout.encode_prompts`), which can remove the question itself. The check
  counts them in both sets with the run's tokenizer; a warning gives the counts, and a share
  above ``task.max_truncated_fraction`` in either set stops the run with one line.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from dmpo_jax import errors
from dmpo_jax.rl import rollout
from dmpo_jax.tasks import base as task_base

_log = logging.getLogger("dmpo_jax.train")


def prompt_key(task: task_base.Task, example: dict) -> str:
  """The evaluation prompt of ``example`` as text (messages and prefill): equal keys, equal
  prompts."""
  spec = task.eval_prompt(example)
  return json.dumps([spec.messages, spec.prefill], sort_keys=True, ensure_ascii=False)


def distinct_held_out(task: task_base.Task, train: Sequence[dict],
                      held_out: Sequence[dict]) -> tuple[list[dict], int, int]:
  """(held-out examples in order without repeats and without training prompts, number dropped
  as repeats, number dropped as training prompts)."""
  train_keys = {prompt_key(task, e) for e in train}
  seen: set[str] = set()
  kept, repeats, in_train = [], 0, 0
  for example in held_out:
    key = prompt_key(task, example)
    if key in seen:
      repeats += 1
    elif key in train_keys:
      in_train += 1
      seen.add(key)
    else:
      seen.add(key)
      kept.append(example)
  if repeats or in_train:
    _log.warning("held-out set of task %s: dropped %d repeated prompt(s) and %d prompt(s) that are "
                 "also training prompts; %d distinct held-out prompts remain", task.name, repeats,
                 in_train, len(kept))
  return kept, repeats, in_train


def prompt_lengths(tokenizer: Any, task: task_base.Task, examples: Sequence[dict], *,
                   evaluation: bool) -> list[int]:
  """Token count of each rendered prompt (`rollout.prompt_token_ids`)."""
  return [len(rollout.prompt_token_ids(tokenizer, task, e, evaluation=evaluation)) for e in examples]


def check_truncation(tokenizer: Any, task: task_base.Task, train: Sequence[dict],
                     held_out: Sequence[dict], prompt_length: int,
                     max_fraction: float) -> dict[str, float]:
  """Counts the prompts longer than ``prompt_length`` in both sets; warns with the counts and
  raises `errors.UserError` when a set's share exceeds ``max_fraction``. Returns
  ``{"data/truncated_train_prompts": n, "data/truncated_held_out_prompts": m}``."""
  counts, problems = {}, []
  for name, examples, evaluation in (("training", train, False), ("held-out", held_out, True)):
    lengths = prompt_lengths(tokenizer, task, examples, evaluation=evaluation)
    cut = sum(length > prompt_length for length in lengths)
    counts[f"data/truncated_{name.replace('-', '_')}_prompts"] = float(cut)
    if not cut:
      continue
    share = cut / len(lengths)
    text = (f"task.prompt_length={prompt_length} truncates {cut} of {len(lengths)} {name} prompts "
            f"({100 * share:.1f} %; the longest has {max(lengths)} tokens)")
    if share > max_fraction:
      problems.append(text)
    else:
      _log.warning("%s: they keep their last %d tokens", text, prompt_length)
  if problems:
    raise errors.UserError("; ".join(problems) + f", more than task.max_truncated_fraction="
                        f"{max_fraction}: raise task.prompt_length (or task.max_truncated_fraction)")
  return counts
