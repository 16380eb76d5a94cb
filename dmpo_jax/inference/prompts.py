"""Prompt token ids, THE left-pad, and completion decoding (training, evaluation, generation).

A batch of prompts becomes ids int32 [B, P] left-padded with the pad id and a mask bool [B, P]
(True = real token). ``P`` is the caller's prompt length: the trainer's ``task.prompt_length``
(rollouts and held-out evaluation), the evaluation's longest prompt rounded up to
`PROMPT_LENGTH_MULTIPLE` (`prompt_bucket`: `launch/eval.py` by default) or the batch's longest
(`launch/generate.py`). A prompt longer than ``P`` keeps its last ``P`` tokens, as the reference
trainers do; `encode_prompts` counts them. With ``batch_invariant`` decoding (`docs/tasks.md`
§7.2) the padding is invisible to a row, but the same ``P`` is still needed for bit-identical
numbers: the padded length changes the shapes of the computation.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

# Evaluation pads to a multiple of this, so evaluations of similar prompts reuse compiled programs.
PROMPT_LENGTH_MULTIPLE = 32


def prompt_token_ids(tokenizer: Any, task: Any, example: dict, *,
                     evaluation: bool = False) -> list[int]:
  """Token ids of one prompt: the task's (training or evaluation) prompt rendered with the chat
  template and its prefill, or, for tasks with ``use_chat_template = False`` (the demo), the
  user content + prefill encoded directly."""
  spec = task.eval_prompt(example) if evaluation else task.train_prompt(example)
  if getattr(task, "use_chat_template", True):
    return list(tokenizer.encode_chat(spec.messages, prefill=spec.prefill))
  return list(tokenizer.encode(spec.messages[-1]["content"] + spec.prefill))


def prompt_bucket(token_lists: Sequence[Sequence[int]],
                  multiple: int = PROMPT_LENGTH_MULTIPLE) -> int:
  """The longest prompt rounded up to ``multiple``: the padded length of a whole evaluation, so
  the padding a row gets never depends on the other rows of its batch (`docs/tasks.md` §7.2)."""
  length = max(len(ids) for ids in token_lists)
  return -(-length // multiple) * multiple


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int,
             multiple: int = PROMPT_LENGTH_MULTIPLE, length: Optional[int] = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [N, length], mask bool [N, length]) left-padded with ``pad_id``; ``length``
  defaults to `prompt_bucket` of these rows. A longer row keeps its last ``length`` tokens."""
  length = prompt_bucket(token_lists, multiple) if length is None else int(length)
  if length <= 0:
    raise ValueError(f"prompt_length must be positive, got {length}")
  ids = np.full((len(token_lists), length), pad_id, np.int32)
  mask = np.zeros((len(token_lists), length), bool)
  for row, tokens in enumerate(token_lists):
    tokens = list(tokens)[-length:]
    ids[row, length - len(tokens):] = tokens
    mask[row, length - len(tokens):] = True
  return ids, mask


def encode_prompts(tokenizer: Any, task: Any, examples: Sequence[dict], *, prompt_length: int,
                   evaluation: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
  """Renders and tokenises prompts (`prompt_token_ids`) into a left-padded bucket of
  ``prompt_length`` (`left_pad`).

  Returns (ids int32 [N, P] padded with the pad id, prompt_mask bool [N, P], num_truncated): the
  number of prompts longer than the bucket, which keep their last ``prompt_length`` tokens.
  """
  if prompt_length <= 0:
    raise ValueError(f"prompt_length must be positive, got {prompt_length}")
  token_lists = [prompt_token_ids(tokenizer, task, e, evaluation=evaluation) for e in examples]
  ids, mask = left_pad(token_lists, tokenizer.pad_token_id, length=prompt_length)
  return ids, mask, sum(len(tokens) > prompt_length for tokens in token_lists)


def completion_token_ids(sequences: np.ndarray, prompt_length: int,
                         stop_ids: Sequence[int]) -> list[list[int]]:
  """Completion ids per row, cut before the first stop id (EOS / EOT)."""
  out = []
  for row in np.asarray(sequences)[:, prompt_length:]:
    stops = np.flatnonzero(np.isin(row, list(stop_ids)))
    out.append(row[: stops[0] if stops.size else len(row)].tolist())
  return out


def decode_completions(tokenizer: Any, sequences: np.ndarray, prompt_length: int) -> list[str]:
  """Completion text of each row: ids up to the first EOS/EOT, special tokens skipped."""
  stop_ids = [i for i in (tokenizer.eos_token_id, tokenizer.eot_token_id) if i is not None]
  return [tokenizer.decode(ids, skip_special_tokens=True)
          for ids in completion_token_ids(sequences, prompt_length, stop_ids)]
