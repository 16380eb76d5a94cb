"""Monte-Carlo ELBO estimates of log π(y | x) for masked diffusion LMs (`docs/algorithms.md` §1).

API note
--------
::

    from dmpo_jax.diffusion import masking, elbo
    keys = masking.mask_keys(base_key, step, example_ids, "weights")        # [B]
    mask_fn = functools.partial(masking.k_stratified_mask, num_samples=n)   # any MaskFn
    est = elbo.elbo_estimate(model, sequences, keys, eligible, mask_fn, n,
                             attention_mask=attention_mask)
    est.mean   # fp32 [B]  (1/n) Σ_j weight_j · S(θ; M_j)
    est.terms  # fp32 [n, B] per-sample terms weight_j · S(θ; M_j)

* ``model`` is a `dmpo_jax.models.transformer.Transformer` (inside jit: ``nnx.merge(graphdef,
  params)``); only ``model.token_log_probs`` (chunked, fp32, Dream's shift already applied) and
  ``model.config.mask_token_id`` are used.
* ``sequences`` [B, T] = prompt + completion canvas (the clean targets); ``attention_mask``
  [B, T] marks real (non-pad) tokens (left-padded prompts).
* `masked_token_log_probs` gives the per-token values (SPG's EUBO needs them);
  `masked_log_likelihood` S(θ; M) = Σ_{d ∈ scored} log π(y_d | x, y with M replaced by MASK);
  `elbo_term` = weight · S; `elbo_estimate` scans `elbo_term` over MC indices
  0..n−1 (+ ``mc_offset``) with `lax.scan`, so the compiled body does not grow with n.
* CRN: calling `elbo_estimate` with the same keys / mask_fn / mc indices under old, reference and
  current parameters evaluates all three on identical masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from dmpo_jax.diffusion.masking import IntLike, MaskFn, MaskSample


class ElboEstimate(NamedTuple):
  mean: jax.Array   # fp32 [B]
  terms: jax.Array  # fp32 [n, B]


def _mask_token_id(model: Any, mask_token_id: Optional[int]) -> int:
  return int(model.config.mask_token_id if mask_token_id is None else mask_token_id)


def noised_inputs(sequences: jax.Array, mask_sample: MaskSample, mask_token_id: int) -> jax.Array:
  """sequences with the ``mask_sample.mask`` positions replaced by ``mask_token_id``."""
  chex.assert_equal_shape([sequences, mask_sample.mask])
  return jnp.where(mask_sample.mask, jnp.asarray(mask_token_id, sequences.dtype), sequences)


def masked_token_log_probs(model: Any, sequences: jax.Array, mask_sample: MaskSample,
                           attention_mask: Optional[jax.Array] = None,
                           mask_token_id: Optional[int] = None) -> jax.Array:
  """log π(y_d | x, y_M̄) at the scored positions, 0 elsewhere; fp32 [B, T]."""
  chex.assert_rank(sequences, 2)
  chex.assert_equal_shape([sequences, mask_sample.mask, mask_sample.scored])
  chex.assert_shape(mask_sample.weight, (sequences.shape[0],))
  if attention_mask is not None:
    chex.assert_equal_shape([sequences, attention_mask])
  inputs = noised_inputs(sequences, mask_sample, _mask_token_id(model, mask_token_id))
  log_probs = model.token_log_probs(inputs, sequences, attention_mask)
  return jnp.where(mask_sample.scored, log_probs.astype(jnp.float32), 0.0)


def masked_log_likelihood(model: Any, sequences: jax.Array, mask_sample: MaskSample,
                          attention_mask: Optional[jax.Array] = None,
                          mask_token_id: Optional[int] = None) -> jax.Array:
  """S(θ; M) = Σ_{d ∈ scored} log π_θ(y_d | x, y with M replaced by MASK), fp32 [B] (§1)."""
  return jnp.sum(masked_token_log_probs(model, sequences, mask_sample, attention_mask,
                                        mask_token_id), axis=-1)


def elbo_term(model: Any, sequences: jax.Array, mask_sample: MaskSample,
              attention_mask: Optional[jax.Array] = None,
              mask_token_id: Optional[int] = None) -> jax.Array:
  """One MC sample's per-sequence term weight · S(θ; M), fp32 [B]."""
  return mask_sample.weight * masked_log_likelihood(model, sequences, mask_sample, attention_mask,
                                                    mask_token_id)


def elbo_estimate(model: Any, sequences: jax.Array, keys: jax.Array, eligible: jax.Array,
                  mask_fn: MaskFn, num_mc_samples: int, *,
                  attention_mask: Optional[jax.Array] = None, mc_offset: IntLike = 0,
                  mask_token_id: Optional[int] = None) -> ElboEstimate:
  """n-sample estimate (1/n) Σ_{j} weight_j · S(θ; M_j), M_j = mask_fn(keys, eligible, mc_offset+j).

  A `lax.scan` over the MC indices (one compiled body for any n; fp32 accumulation). The
  per-sample terms [n, B] are returned too (variance diagnostics, BGPO's per-sample d_j).
  """
  if num_mc_samples < 1:
    raise ValueError(f"num_mc_samples must be >= 1, got {num_mc_samples}")
  chex.assert_equal_shape([sequences, eligible])

  def body(total, j):
    sample = mask_fn(keys, eligible, mc_offset + j)
    term = elbo_term(model, sequences, sample, attention_mask, mask_token_id)
    return total + term, term

  total0 = jnp.zeros((sequences.shape[0],), jnp.float32)
  total, terms = jax.lax.scan(body, total0, jnp.arange(num_mc_samples, dtype=jnp.int32))
  return ElboEstimate(mean=total / num_mc_samples, terms=terms)
