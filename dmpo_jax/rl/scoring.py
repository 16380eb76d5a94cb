"""Batch contract, mask keys and masked-diffusion scoring used by the RL objectives.

Batch (a dict of arrays, every leaf batch-leading)::

    sequences       int  [B, T]  left-padded prompt + completion canvas (clean targets)
    attention_mask  bool [B, T]  real (non-pad) tokens
    prompt_mask     bool [B, T]  prompt positions (real prompt tokens are prompt & attention)
    completion_mask bool [B, T]  the whole generation canvas (all completion positions)
    rewards         f32  [B]
    group_ids       int  [B]     group (prompt) membership, any labels, any placement
    example_ids     int  [B]     global id of the sequence within the rollout (mask keys)

Keys (`RLKeys`): masks are never stored, they are regenerated from keys (`docs/algorithms.md` §1.7)
with `dmpo_jax.diffusion.masking.mask_keys`:

* masks shared by old / reference / current policy within one rollout (BGPO, VRPO-OL, DMPO
  weights, d1 inner-iteration seeds) use ``step = rollout_step``;
* fresh per-update masks (DMPO loss masks) use ``step = update_step``;
* per-inner-iteration masks (diffu-GRPO, wd1, SPG) additionally fold ``iteration`` into the base.

Scoring is deterministic (the model has no dropout). Everything here is pure and jit-friendly.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.diffusion import elbo, masking

BATCH_KEYS = ("sequences", "attention_mask", "prompt_mask", "completion_mask", "rewards",
              "group_ids", "example_ids")
ELBO_SCHEMES = ("k_stratified", "t_iid", "uniform_count", "antithetic")
_ITERATION_TAG = 0x17E5


class RLKeys(NamedTuple):
  """Randomness of one objective call.

  base: PRNG key of the run. rollout_step: int32 id of the rollout (shared masks). update_step:
  int32 global optimizer step (fresh masks). iteration: int32 index of this update within the
  reuse of one rollout (0..F−1; selects diffu-GRPO / wd1 / SPG mask seeds).
  """
  base: jax.Array
  rollout_step: jax.Array
  update_step: jax.Array
  iteration: jax.Array


def make_keys(base: jax.Array, rollout_step: Any, update_step: Any = 0,
              iteration: Any = 0) -> RLKeys:
  return RLKeys(base, jnp.asarray(rollout_step, jnp.int32), jnp.asarray(update_step, jnp.int32),
                jnp.asarray(iteration, jnp.int32))


def check_batch(batch: Mapping[str, jax.Array], group_size: Optional[int] = None) -> None:
  """Shape/dtype checks of the batch contract (module docstring); raises a clear error.

  With concrete ``group_ids`` and ``group_size``, also checks that every group has exactly
  ``group_size`` members.
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f"RL batch is missing {missing}; expected keys {BATCH_KEYS}, got {sorted(batch)}")
  seq = batch["sequences"]
  chex.assert_rank(seq, 2)
  b, t = seq.shape
  for name in ("attention_mask", "prompt_mask", "completion_mask"):
    if batch[name].shape != (b, t):
      raise ValueError(f"batch[{name!r}] has shape {batch[name].shape}, expected {(b, t)}")
  for name in ("rewards", "group_ids", "example_ids"):
    if batch[name].shape != (b,):
      raise ValueError(f"batch[{name!r}] has shape {batch[name].shape}, expected {(b,)}")
  if not jnp.issubdtype(batch["group_ids"].dtype, jnp.integer):
    raise TypeError(f"batch['group_ids'] must be integer, got {batch['group_ids'].dtype}")
  if group_size is not None and not isinstance(batch["group_ids"], jax.core.Tracer):
    ids, counts = jnp.unique(batch["group_ids"], return_counts=True)
    bad = [(int(i), int(c)) for i, c in zip(ids, counts) if int(c) != group_size]
    if bad:
      raise ValueError(f"groups with a member count other than group_size={group_size} "
                       f"(group_id, count): {bad[:8]}")


def example_keys(keys: RLKeys, example_ids: jax.Array, purpose: str, *, fresh: bool = False,
                 per_iteration: bool = False) -> jax.Array:
  """Per-example mask keys [B]: step = update_step if ``fresh`` else rollout_step; with
  ``per_iteration`` the inner-iteration index is folded into the base key first."""
  base = keys.base
  if per_iteration:
    base = jax.random.fold_in(jax.random.fold_in(base, _ITERATION_TAG), keys.iteration)
  step = keys.update_step if fresh else keys.rollout_step
  return masking.mask_keys(base, step, example_ids, purpose)


def eligible_positions(batch: Mapping[str, jax.Array], eos_token_id: int,
                       include_eos_padding: bool) -> jax.Array:
  """Completion positions that are masked and scored, bool [B, T] (`docs/algorithms.md` §1.6):
  the full canvas (DMPO, BGPO) or up to and including the first EOS (d1, wd1, SPG).

  Delegates to `masking.completion_eligibility`; prompt tokens are hidden from its EOS search by
  replacing them with −1, so left-padding EOS tokens in the prompt are not taken as the first EOS.
  """
  completion = batch["completion_mask"].astype(jnp.bool_)
  completion_tokens = jnp.where(completion, batch["sequences"], -1)
  return masking.completion_eligibility(
      completion_tokens, 0, valid=completion, eos_token_id=eos_token_id,
      include_eos_padding=include_eos_padding)


def real_prompt_positions(batch: Mapping[str, jax.Array]) -> jax.Array:
  return batch["prompt_mask"].astype(jnp.bool_) & batch["attention_mask"].astype(jnp.bool_)


def elbo_mask_fn(scheme: str, *, num_samples: int,
                 lambda_range: tuple[float, float] = (0.1, 1.0),
                 t_eps: float = 1e-3) -> masking.MaskFn:
  """The `MaskFn` of an ELBO scheme (`docs/algorithms.md` §1.1-§1.3, `masking` module)."""
  if scheme == "k_stratified":
    return functools.partial(masking.k_stratified_mask, num_samples=num_samples)
  if scheme == "t_iid":
    return functools.partial(masking.t_iid_mask, eps=t_eps)
  if scheme == "uniform_count":
    return masking.uniform_count_mask
  if scheme == "antithetic":
    return functools.partial(masking.antithetic_mask, lambda_range=tuple(lambda_range))
  raise ValueError(f"ELBO mask scheme must be one of {ELBO_SCHEMES}, got {scheme!r}")


def sample_elbo_term(model: Any, batch: Mapping[str, jax.Array], keys: jax.Array,
                     eligible: jax.Array, mask_fn: masking.MaskFn,
                     mc_index: jax.Array) -> tuple[jax.Array, masking.MaskSample]:
  """One MC sample's term weight_j · S(θ; M_j), fp32 [B], and its mask sample."""
  sample = mask_fn(keys, eligible, mc_index)
  term = elbo.elbo_term(model, batch["sequences"], sample, batch["attention_mask"])
  return term, sample


def model_config(graphdef: Any, params: Any) -> Any:
  """The static `ModelConfig` of the model behind (graphdef, params) (works under jit)."""
  return nnx.merge(graphdef, params).config


def canvas_length(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Number of completion positions per row (the padded generation length L), fp32 [B]."""
  return jnp.sum(batch["completion_mask"].astype(jnp.float32), axis=-1)
