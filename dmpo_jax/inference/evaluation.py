"""THE evaluation of the trainer's held-out check and `launch/eval.py`, and sharded generation.

`evaluate`: prompts (`prompts.prompt_token_ids`, the task's evaluation prompt) → one left-padded
length for the whole evaluation (`EvalSpec.prompt_length`: the trainer's ``task.prompt_length``,
or the longest prompt rounded up to 32) → batches of ``batch_size`` rows (the last one padded with
copies of its last row) → the sampler on the sampling layout (`dmpo_jax.sampling_layout`: the
parameters resharded once, each batch's rows split over the devices) → completions up to the
first EOS/EOT (`prompts.decode_completions`) → `Task.score_many` → rows and summary.

With the greedy, batch-invariant sampler (`sampler_configs.greedy_eval`) a row's completion
depends on neither the batch size nor the number of devices (`docs/tasks.md` §7.2), so the
trainer (``eval.batch_size`` on its devices) and `launch/eval.py` (``--batch_size`` on every
device) give the same completions and scores for the same checkpoint and padded length.

Every process holds every example: each builds the full host batch, the global array is made
from it (`jax.make_array_from_callback`: each process supplies its devices' rows) and every
process gets every completion back (`fetch_rows`), so each scores all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dmpo_jax import metrics as metrics_lib, sampling_layout
from dmpo_jax.inference import prompts as prompts_lib, sampler_configs
from dmpo_jax.tasks import base as task_base

DEFAULT_EVAL_STYLE = task_base.DEFAULT_EVAL_STYLE


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """How to evaluate: sampler settings, rows per sampler call, padded prompt length (None: the
  evaluation's longest prompt rounded up to `prompts.PROMPT_LENGTH_MULTIPLE`), scoring style
  (``fixed`` or ``d1``) and extra `Task.score_many` options (e.g. ``use_math_verify``)."""
  sampler: Any
  batch_size: int
  prompt_length: Optional[int] = None
  eval_style: str = DEFAULT_EVAL_STYLE
  score_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"eval batch_size must be >= 1, got {self.batch_size}")
    if self.prompt_length is not None and self.prompt_length < 1:
      raise ValueError(f"eval prompt_length must be >= 1 or None, got {self.prompt_length}")

  @classmethod
  def from_config(cls, config: Any) -> "EvalSpec":
    """The trainer's held-out evaluation: ``config.eval`` (gen_length, block_length, steps,
    batch_size, style) with prompts padded (and cut) to ``config.task.prompt_length``."""
    return cls(sampler=sampler_configs.eval_sampler_config(config.eval),
               batch_size=int(config.eval.batch_size),
               prompt_length=int(config.task.prompt_length),
               eval_style=config.eval.get("style", DEFAULT_EVAL_STYLE), seed=0)


@dataclasses.dataclass
class EvalResult:
  """``rows``: per example (index, reference fields, prompt, completion, score fields);
  ``summary``: `Task.summarize` plus the sampler settings, padded length and eval style."""
  rows: list[dict[str, Any]]
  summary: dict[str, Any]

  @property
  def completions(self) -> list[str]:
    return [row["completion"] for row in self.rows]


def rows_per_call(batch_size: int, layout: sampling_layout.SamplingLayout) -> int:
  """``batch_size`` rounded up to a multiple of the layout's batch devices, so every sampler
  call splits its rows over all of them (the extra rows repeat the last one)."""
  divisor = layout.batch_divisor
  return -(-batch_size // divisor) * divisor


def place_rows(array: np.ndarray, layout: sampling_layout.SamplingLayout) -> jax.Array:
  """A host array every process holds whole -> a global array split over the layout's batch
  axes (rows must divide: `rows_per_call`); each process fills only its own devices' rows."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, layout.batch_sharding(array.ndim),
                                      lambda index: array[index])


def fetch_rows(array: jax.Array) -> np.ndarray:
  """Every row of a global array on every process's host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def generate_rows(layout: sampling_layout.SamplingLayout, graphdef: Any, params: Any,
                  prompt_ids: np.ndarray, prompt_mask: np.ndarray, key: jax.Array, config: Any,
                  sampler: Optional[Callable] = None) -> tuple[np.ndarray, int]:
  """(sequences int32 [N, P + L] on the host, forward passes) of host prompts every process
  holds: rows padded to a multiple of the layout's batch devices with copies of the last row,
  split over them, sampled on the layout (``params`` from `sampling_layout.reshard`), and cut
  back to N. The padding rows do not reach the real rows: a row's sampling noise does not
  depend on the rows after it (one key, partitionable threefry) and ``stop_at_eos`` waits for
  every row, which copies of the last row do not change. Only rounding may follow the batch
  shape, as for any batch size, unless the config is ``batch_invariant`` (`docs/tasks.md` §7.2)."""
  rows = np.shape(prompt_ids)[0]
  padded = rows_per_call(rows, layout)
  extra = np.repeat(np.arange(rows - 1, rows), padded - rows)
  take = np.concatenate([np.arange(rows), extra])
  ids = place_rows(np.asarray(prompt_ids)[take], layout)
  mask = place_rows(np.asarray(prompt_mask, bool)[take], layout)
  out = sampling_layout.generate(layout, graphdef, params, ids, mask, key, config, sampler)
  return fetch_rows(out.sequences)[:rows], int(out.num_forward_passes)


def evaluate(graphdef: Any, params: Any, tokenizer: Any, task: Any, examples: Sequence[dict],
             spec: EvalSpec, *, layout: sampling_layout.SamplingLayout,
             sampler: Optional[Callable] = None, progress: bool = False,
             desc: Optional[str] = None) -> EvalResult:
  """Samples a completion for every example under ``spec`` on ``layout`` and scores them.

  ``params`` may be in any layout (they are resharded to ``layout`` once); ``sampler`` defaults
  to the LLaDA sampler (`sampling_layout.generate`).
  """
  if not examples:
    raise ValueError(f"no {task.name} examples to evaluate")
  params = sampling_layout.reshard(params, layout)  # once for every batch
  prompt_ids = [prompts_lib.prompt_token_ids(tokenizer, task, e, evaluation=True)
                for e in examples]
  length = spec.prompt_length or prompts_lib.prompt_bucket(prompt_ids)
  batch_rows = rows_per_call(spec.batch_size, layout)
  gen_length = spec.sampler.gen_length
  bar = metrics_lib.ProgressBar(len(examples), desc=desc or f"{task.name} L={gen_length}",
                                unit="example", disable=None if progress else True,
                                process_index=jax.process_index(),
                                log_every_steps=max(1, len(examples) // 10))
  completions: list[str] = []
  base_key = jax.random.key(spec.seed)  # greedy decoding ignores it
  for batch_index, start in enumerate(range(0, len(examples), spec.batch_size)):
    chunk = prompt_ids[start:start + spec.batch_size]
    chunk = chunk + [chunk[-1]] * (batch_rows - len(chunk))  # one shape for every batch
    ids, mask = prompts_lib.left_pad(chunk, tokenizer.pad_token_id, length=length)
    sequences, _ = generate_rows(layout, graphdef, params, ids, mask,
                                 jax.random.fold_in(base_key, batch_index), spec.sampler, sampler)
    real = min(spec.batch_size, len(examples) - start)
    completions += prompts_lib.decode_completions(tokenizer, sequences[:real], length)
    bar.update(start + real)
  bar.close()
  style = spec.eval_style
  scores = task.score_many(completions, examples, **dict(spec.score_options),
                           **({"eval_style": style} if style != DEFAULT_EVAL_STYLE else {}))
  rows = []
  for index, (example, ids, completion, score) in enumerate(
      zip(examples, prompt_ids, completions, scores)):
    reference = {k: example[k] for k in task.reference_fields if k in example}
    rows.append({"index": index, **reference,
                 "prompt": tokenizer.decode(ids, skip_special_tokens=False),
                 "completion": completion, **score})
  summary = task.summarize(scores)
  summary.update({"gen_length": gen_length, "block_length": spec.sampler.block_length,
                  "steps": spec.sampler.steps, "temperature": spec.sampler.temperature,
                  "eval_style": style, "prompt_length": length})
  return EvalResult(rows, summary)
