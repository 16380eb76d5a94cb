"""The jitted rollout-scoring (`train_step.jit_prepare`) and SFT step (`sft.jit_sft_step`) are
traced once: a second call with the same shapes reuses the trace, and one that would retrace
(and recompile every step) raises (`chex.assert_max_traces`). The RL update is compiled ahead of
time (`train_step.compile_ahead_of_time`): a compiled executable cannot retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import registry, rollout, sft, train_state as ts, train_step


def batch_of(gen, batch=4, prompt=6, seed=0):
  rng = np.random.default_rng(seed)
  sequences = rng.integers(0, 200, (batch, prompt + gen)).astype(np.int32)
  out = rollout.rl_batch(sequences, np.ones((batch, prompt), bool),
                         np.asarray([1.0, 0.0, 0.0, 1.0], np.float32),
                         np.repeat(np.arange(batch // 2), 2), np.arange(batch))
  return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def model():
  return nnx.split(create_model(get_preset("tiny"), seed=0))


def test_prepare_is_traced_once(model):
  graphdef, params = model
  objective = registry.get_objective("bgpo")
  prepare = train_step.jit_prepare(graphdef, objective, objective.make_config({"num_mc": 1}), None)
  key = jax.random.key(0)
  for step in range(2):  # same shapes, another rollout step: the first trace serves
    prepare(params, params, batch_of(gen=8, seed=step), key, jnp.int32(step))
  with pytest.raises(AssertionError, match="traced > 1 times"):
    prepare(params, params, batch_of(gen=10), key, jnp.int32(2))


@pytest.mark.slow
def test_sft_step_is_traced_once(model):
  graphdef, params = model
  optimizer = ts.make_optimizer(1e-3)
  state = ts.init_train_state(params, optimizer, 0)
  step = sft.jit_sft_step(graphdef, optimizer, jax.tree.map(lambda x: x.sharding, state))
  names = ("sequences", "attention_mask", "completion_mask")
  for seed in range(2):
    state, _ = step(state, {k: v for k, v in batch_of(gen=8, seed=seed).items() if k in names})
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(state, {k: v for k, v in batch_of(gen=10).items() if k in names})
