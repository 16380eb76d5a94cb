"""Grain pipeline: shuffle, epochs, G-expansion, sharding, checkpointed iterator state."""

import numpy as np
import pytest

from dmpo_jax.tasks import pipeline

EXAMPLES = [{"id": i} for i in range(10)]


def indices(batches):
  return [b["prompt_indices"].tolist() for b in batches]


def test_group_expansion_epochs_and_determinism():
  config = pipeline.PipelineConfig(prompts_per_batch=5, group_size=3, seed=7, num_epochs=2)
  batches = list(pipeline.make_dataset(EXAMPLES, config))
  assert len(batches) == 4  # 2 epochs x 10 prompts / 5
  for step, batch in enumerate(batches):
    assert batch["step"] == step
    assert len(batch["examples"]) == 15
    np.testing.assert_array_equal(batch["group_ids"], np.repeat(np.arange(5) + 5 * step, 3))
    ids = [e["id"] for e in batch["examples"]]
    assert ids == batch["prompt_indices"].tolist()
    assert all(ids[3 * k] == ids[3 * k + 1] == ids[3 * k + 2] for k in range(5))
  epoch0 = sorted(sum((indices(batches[:2])), [])[::3])
  epoch1 = sorted(sum((indices(batches[2:])), [])[::3])
  assert epoch0 == epoch1 == list(range(10))  # each epoch is a permutation
  assert sum(indices(batches[:2]), []) != sum(indices(batches[2:]), [])  # reshuffled per epoch
  assert indices(batches) == indices(pipeline.make_dataset(EXAMPLES, config))
  other = pipeline.PipelineConfig(prompts_per_batch=5, group_size=3, seed=8, num_epochs=2)
  assert indices(batches) != indices(pipeline.make_dataset(EXAMPLES, other))


def test_process_sharding_covers_global_batches():
  shards = []
  for process_index in range(2):
    config = pipeline.PipelineConfig(prompts_per_batch=4, group_size=2, seed=1, num_epochs=2,
                                     process_index=process_index, process_count=2)
    shards.append(list(pipeline.make_dataset(EXAMPLES, config)))
  single = list(pipeline.make_dataset(EXAMPLES, pipeline.PipelineConfig(
      prompts_per_batch=4, group_size=2, seed=1, num_epochs=2)))
  assert len(shards[0]) == len(shards[1]) == len(single) == 5
  for a, b, whole in zip(shards[0], shards[1], single):
    np.testing.assert_array_equal(np.concatenate([a["prompt_indices"], b["prompt_indices"]]),
                                  whole["prompt_indices"])
    np.testing.assert_array_equal(np.concatenate([a["group_ids"], b["group_ids"]]),
                                  whole["group_ids"])
    assert not set(a["group_ids"].tolist()) & set(b["group_ids"].tolist())


def test_iterator_state_restores_exactly():
  config = pipeline.PipelineConfig(prompts_per_batch=3, group_size=2, seed=5, num_epochs=None)
  iterator = pipeline.make_iterator(EXAMPLES, config)
  pipeline.take(iterator, 4)
  state = iterator.get_state()
  expected = pipeline.take(iterator, 7)  # crosses an epoch boundary
  resumed = pipeline.make_iterator(EXAMPLES, config)
  resumed.set_state(state)
  got = pipeline.take(resumed, 7)
  assert indices(got) == indices(expected)
  assert [b["group_ids"].tolist() for b in got] == [b["group_ids"].tolist() for b in expected]
  assert [b["step"] for b in got] == list(range(4, 11))


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="divisible"):
    pipeline.PipelineConfig(prompts_per_batch=3, group_size=2, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.PipelineConfig(prompts_per_batch=4, group_size=2, process_index=2, process_count=2)
