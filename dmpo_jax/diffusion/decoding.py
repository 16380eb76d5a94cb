"""Shared decoding utilities of the diffusion samplers (`docs/llada.md` §6, §7, §9).

* `sample_tokens`: Gumbel-max sampling x̂ = argmax(l/τ + g), g ~ Gumbel(0,1), i.e. a draw from
  softmax(l/τ); τ = 0 is argmax. Equivalent to the reference's argmax(exp(l) / (−log u)^τ) but in
  log space (no `exp` overflow), fp32 by default (float64 needs ``jax_enable_x64``).
* `filter_top_k_top_p`: Dream's nucleus / top-k logits filtering.
* `rank_descending`, `commit_top_quota`, `commit_threshold`, `commit_factor`,
  `cap_commits`: fixed-shape per-row selection of the positions to commit (no Python loop over
  rows).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float,
                  noise_dtype: str = "float32") -> jax.Array:
  """argmax(l/τ + Gumbel) over the last axis (τ = 0: argmax(l)); int32."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  dtype = jnp.dtype(noise_dtype)
  if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ValueError("noise_dtype='float64' needs jax.config.update('jax_enable_x64', True)")
  gumbel = jax.random.gumbel(key, logits.shape, dtype)
  return jnp.argmax(logits.astype(dtype) / temperature + gumbel, axis=-1).astype(jnp.int32)


def filter_top_k_top_p(logits: jax.Array, top_k: Optional[int] = None,
                       top_p: Optional[float] = None) -> jax.Array:
  """Sets logits outside the top-k and outside the nucleus (smallest prefix of the sorted
  distribution whose mass reaches top_p; the top-1 token is always kept) to −inf."""
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k is not None and top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    # Remove a sorted token when the mass before it already reaches top_p (keeps the top-1).
    remove = (cumulative - probs) >= top_p
    cutoff = jnp.min(jnp.where(remove, jnp.inf, sorted_logits), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


def rank_descending(scores: jax.Array) -> jax.Array:
  """Rank of every entry of the last axis in descending order (0 = largest; ties by index)."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def commit_top_quota(confidence: jax.Array, candidates: jax.Array, quota: jax.Array) -> jax.Array:
  """Per row, the ``quota[b]`` candidates with the highest confidence (bool, same shape)."""
  scores = jnp.where(candidates, confidence, -jnp.inf)
  return candidates & (rank_descending(scores) < quota[..., None])


def commit_threshold(confidence: jax.Array, candidates: jax.Array, threshold: float) -> jax.Array:
  """Fast-dLLM threshold rule (`docs/llada.md` §7): every candidate with confidence ≥ threshold, and
  always the most confident candidate (so each step commits at least one while any remain)."""
  scores = jnp.where(candidates, confidence, -jnp.inf)
  top = rank_descending(scores) == 0
  return candidates & ((confidence >= threshold) | top)


def commit_factor(confidence: jax.Array, candidates: jax.Array, factor: float) -> jax.Array:
  """Fast-dLLM's factor rule (arXiv 2505.22618 §3.3; `get_transfer_index_dynamic`).

  With the n candidates' confidences sorted descending c_0 ≥ c_1 ≥ … ≥ c_{n-1} and thresholds
  thr_0 = −1, thr_k = 1 − factor / (k + 2) for k ≥ 1 (i.e. c_k passes when
  (k + 2)(1 − c_k) ≤ factor: the paper's (m + 1)(1 − c_(m)) < f with m = k + 1 the 1-based
  rank), commit the candidates ranked before the first failing k. As in the reference code, all n
  are committed when no candidate fails or when the first failure is the last candidate.
  """
  scores = jnp.where(candidates, confidence, -jnp.inf)
  rank = rank_descending(scores)
  sorted_scores = -jnp.sort(-scores, axis=-1)
  k = jnp.arange(scores.shape[-1])
  n = jnp.sum(candidates, axis=-1, keepdims=True)
  thresholds = jnp.where(k == 0, -1.0, 1.0 - factor / (k + 2.0))
  fails = (sorted_scores < thresholds) & (k < n)
  first_fail = jnp.where(jnp.any(fails, -1, keepdims=True), jnp.argmax(fails, -1)[..., None], n)
  count = jnp.where(first_fail >= n - 1, n, first_fail)
  return candidates & (rank < count)


def cap_commits(selected: jax.Array, confidence: jax.Array, cap: int) -> jax.Array:
  """Keeps at most ``cap`` selected positions per row, the most confident ones."""
  scores = jnp.where(selected, confidence, -jnp.inf)
  return selected & (rank_descending(scores) < cap)
