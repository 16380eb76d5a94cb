"""Grain input pipeline for RL: seeded shuffle, epochs, G generations per prompt, batching,
per-process sharding and a checkpointable iterator (`docs/architecture.md` §6; grain 0.2.18 API).

Order of operations (all on indices, the examples are looked up at the end):

1. ``MapDataset.range(N)`` -> ``shuffle(seed)`` -> ``repeat(num_epochs, reseed_each_epoch=True)``:
   a new permutation each epoch, reproducible from the seed.
2. ``batch(prompts_per_batch)``: one *global* batch of prompts per training step.
3. Process ``p`` of ``P`` keeps prompts ``[p*k, (p+1)*k)`` of each global batch (``k = B/P``), so
   all processes step through the same global batches in lock-step and together cover each one.
4. Each kept prompt is repeated ``group_size`` (G) times consecutively; ``group_ids`` are global
   prompt ordinals ``step*B + p*k + i`` (unique over processes and steps).

``iterator.get_state()`` / ``set_state(state)`` restore the exact position (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  prompts_per_batch: int  # global, over all processes
  group_size: int  # G generations per prompt
  seed: int = 0
  num_epochs: Optional[int] = None  # None: repeat forever
  shuffle: bool = True
  drop_remainder: bool = True
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.prompts_per_batch <= 0 or self.group_size <= 0:
      raise ValueError(f"prompts_per_batch ({self.prompts_per_batch}) and group_size "
                       f"({self.group_size}) must be positive")
    if self.process_count <= 0 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    if self.prompts_per_batch % self.process_count:
      raise ValueError(f"prompts_per_batch ({self.prompts_per_batch}) must be divisible by "
                       f"process_count ({self.process_count})")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")

  @property
  def prompts_per_process(self) -> int:
    return self.prompts_per_batch // self.process_count


def make_dataset(examples: Sequence[Dict[str, Any]], config: PipelineConfig) -> grain.IterDataset:
  """An ``IterDataset`` whose elements are the batches described in the module docstring:
  ``{"examples": list of k*G dicts, "group_ids": int64 [k*G], "prompt_indices": int64 [k*G],
  "step": int}``."""
  if not examples:
    raise ValueError("the pipeline needs at least one example")
  if config.drop_remainder and len(examples) < config.prompts_per_batch and config.num_epochs == 1:
    raise ValueError(f"{len(examples)} examples cannot fill one batch of {config.prompts_per_batch}")
  examples = list(examples)
  dataset = grain.MapDataset.range(len(examples))
  if config.shuffle:
    dataset = dataset.shuffle(seed=config.seed)
  dataset = dataset.repeat(config.num_epochs, reseed_each_epoch=True)
  dataset = dataset.batch(config.prompts_per_batch, drop_remainder=config.drop_remainder)
  start = config.process_index * config.prompts_per_process
  stop = start + config.prompts_per_process
  group = config.group_size

  def expand(step: int, global_indices: np.ndarray) -> Dict[str, Any]:
    local = np.asarray(global_indices, dtype=np.int64)[start:stop]
    ordinals = step * config.prompts_per_batch + start + np.arange(len(local), dtype=np.int64)
    prompt_indices = np.repeat(local, group)
    return {"examples": [examples[int(i)] for i in prompt_indices],
            "group_ids": np.repeat(ordinals, group),
            "prompt_indices": prompt_indices,
            "step": int(step)}

  return dataset.map_with_index(expand).to_iter_dataset()


def make_iterator(examples: Sequence[Dict[str, Any]], config: PipelineConfig
                  ) -> grain.DatasetIterator:
  """A checkpointable iterator: ``get_state()`` returns a small dict; ``set_state`` resumes."""
  return iter(make_dataset(examples, config))


def take(iterator, count: int) -> List[Dict[str, Any]]:
  return [next(iterator) for _ in range(count)]
