"""Monte-Carlo mask samplers for masked-diffusion likelihood estimates (`docs/algorithms.md` §1).

API note (for the objectives / train-step code)
------------------------------------------------
Keys (common random numbers, `docs/algorithms.md` §1.7)::

    keys = mask_keys(base_key, step, example_ids, purpose="loss")   # [B] per-example keys

``keys[b] = fold_in(fold_in(fold_in(base_key, tag(purpose)), step), example_ids[b])``; the MC
index is folded in by the mask function itself. Old, reference and current policy scorings that
pass the same (base_key, step, example_ids, purpose, mc_index) see identical masks, and a resumed
run regenerates them. Nothing needs to be stored.

Every mask function has the same calling convention (bind hyper-parameters with
`functools.partial` to get a ``MaskFn`` for `dmpo_jax.diffusion.elbo.elbo_estimate`)::

    sample = mask_fn(keys [B], eligible bool [B, T], mc_index int|int32[], **hyper) -> MaskSample

``eligible`` marks the completion positions that may be masked *and scored* (completion & real
tokens, or completion up to and including the first EOS — chosen by the caller, see
`completion_eligibility`). Prompt positions must not be eligible. Functions that also corrupt
positions that are not scored (the one-step estimator's prompt masking, SPG's masking of blocks
after the sampled one and of the tail after the first EOS) take those extra position sets as
keyword arguments.

`MaskSample` fields (all [B, T] bool unless stated):

* ``mask``   — positions replaced by the mask token in the model input;
* ``scored`` — positions whose log p(target) enters S(θ; M) (always ⊆ mask ∩ eligible);
* ``weight`` — fp32 [B], the per-sequence factor of S: 1/p (t-iid), L/k (k-stratified,
  uniform-count), L/m (antithetic), 1 (one-step), 1/|M| (SPG per-masked-token mean);
  0 for rows with no eligible position;
* ``ratio``  — fp32 [B], the empirical mask ratio |scored| / |eligible| (SPG's t_j for the EUBO;
  0 where nothing is eligible).

Laws (L = number of eligible positions of the row):

* `t_iid_mask`: t ~ U(0,1), p = (1−ε)t + ε, each eligible position masked w.p. p, weight 1/p
  (`docs/algorithms.md` §1.1, `docs/llada.md` §8).
* `k_stratified_mask`: one offset k0 ~ U{1..L} per example (shared by the n MC indices),
  k_i = ((round(k0 + i·L/n) − 1) mod L) + 1, exactly k_i masked, weight L/k_i (§1.2).
* `uniform_count_mask`: k ~ U{1..L} independently per MC index, exactly k masked, weight L/k
  (the DMPO paper's law, §2.5 row 2).
* `antithetic_mask`: per pair (mc_index // 2) λ = lo + (hi − lo)·U with (lo, hi) = (0.1, 1.0)
  by default; even indices mask Bernoulli(λ), odd indices the complement; weight L/max(m, 1)
  (§1.3; the training-loss form 1/m is weight / L).
* `one_step_mask`: every completion position masked, each real prompt token masked w.p.
  ``p_mask_prompt``; weight 1 (§1.4, diffu-GRPO / wd1).
* `spg_block_mask`: SPG's block-wise law (§1.5), weight 1/|M|.

All functions are pure, jit/vmap/scan friendly, and draw per-example randomness by `jax.vmap`
over the key array (typed ``jax.random.key`` arrays and raw uint32 keys both work).
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp

IntLike = Union[int, jax.Array]


class MaskSample(NamedTuple):
  """One Monte-Carlo mask per example (see module docstring for the field semantics)."""
  mask: jax.Array    # bool [B, T]
  scored: jax.Array  # bool [B, T]
  weight: jax.Array  # fp32 [B]
  ratio: jax.Array   # fp32 [B]


MaskFn = Callable[[jax.Array, jax.Array, IntLike], MaskSample]

# Tags folded into keys so different random draws of one (example, mc_index) are independent.
_TAG_OFFSET = 0x0FF5E7
_TAG_PAIR = 0x9A12
_TAG_PERM = 0x7E12
_TAG_PROMPT = 0x9120
_TAG_BLOCK = 0xB10C


def purpose_tag(purpose: Union[str, int]) -> int:
  """Stable 31-bit integer for a purpose name (CRC32, identical across processes and runs)."""
  if isinstance(purpose, str):
    return zlib.crc32(purpose.encode("utf-8")) & 0x7FFFFFFF
  if isinstance(purpose, int) and purpose >= 0:
    return purpose
  raise ValueError(f"mask purpose must be a string or a non-negative int, got {purpose!r}")


def mask_keys(base_key: jax.Array, step: IntLike, example_ids: jax.Array,
              purpose: Union[str, int] = "loss") -> jax.Array:
  """Per-example mask keys, [B] (`docs/algorithms.md` §1.7).

  keys[b] = fold_in(fold_in(fold_in(base_key, tag(purpose)), step), example_ids[b]).
  ``step`` is the rollout / global step (may be traced), ``example_ids`` int [B] global ids of the
  sequences (e.g. prompt_index * G + generation_index). The MC index is folded in by the mask
  functions, so one key array serves all MC samples.
  """
  chex.assert_rank(example_ids, 1)
  key = jax.random.fold_in(base_key, purpose_tag(purpose))
  key = jax.random.fold_in(key, jnp.asarray(step, jnp.uint32))
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(example_ids, jnp.uint32))


def completion_eligibility(sequence: jax.Array, prompt_length: int, *,
                           valid: Optional[jax.Array] = None, eos_token_id: Optional[int] = None,
                           include_eos_padding: bool = True) -> jax.Array:
  """Completion positions that may be masked and scored, bool [B, T] (`docs/algorithms.md` §1.6).

  Completion = positions ≥ ``prompt_length`` of the canvas. ``include_eos_padding=True`` (DMPO,
  BGPO): every completion position. ``False`` (d1, wd1, SPG): positions up to and including the
  first ``eos_token_id`` of the completion. ``valid`` (optional [B, T]) is and-ed in (padding).
  """
  chex.assert_rank(sequence, 2)
  b, t = sequence.shape
  if not 0 <= prompt_length <= t:
    raise ValueError(f"prompt_length {prompt_length} outside the canvas length {t}")
  completion = jnp.broadcast_to(jnp.arange(t) >= prompt_length, (b, t))
  eligible = completion
  if not include_eos_padding:
    if eos_token_id is None:
      raise ValueError("include_eos_padding=False needs eos_token_id")
    is_eos = (sequence == eos_token_id) & completion
    eos_before = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1) - is_eos.astype(jnp.int32)
    eligible = completion & (eos_before == 0)
  if valid is not None:
    chex.assert_shape(valid, (b, t))
    eligible = eligible & valid.astype(jnp.bool_)
  return eligible


# -- helpers ---------------------------------------------------------------------------------------

def _check(keys: jax.Array, eligible: jax.Array) -> None:
  chex.assert_rank(eligible, 2)
  if eligible.dtype != jnp.bool_:
    raise TypeError(f"eligible must be a bool [B, T] array, got dtype {eligible.dtype}")
  if keys.shape[0] != eligible.shape[0]:
    raise ValueError(f"keys has {keys.shape[0]} rows but eligible has {eligible.shape[0]}")


def _mc_key(key: jax.Array, mc_index: IntLike) -> jax.Array:
  return jax.random.fold_in(key, jnp.asarray(mc_index, jnp.uint32))


def _exactly_k(key: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
  """Uniformly random subset of exactly min(k, |candidates|) of the True positions of a row."""
  scores = jnp.where(candidates, jax.random.uniform(key, candidates.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores))
  return candidates & (rank < k)


def _finish(mask: jax.Array, scored: jax.Array, weight: jax.Array,
            eligible: jax.Array) -> MaskSample:
  n_eligible = jnp.sum(eligible, axis=-1)
  n_scored = jnp.sum(scored, axis=-1)
  has_any = n_eligible > 0
  weight = jnp.where(has_any, weight, 0.0).astype(jnp.float32)
  ratio = jnp.where(has_any, n_scored / jnp.maximum(n_eligible, 1), 0.0).astype(jnp.float32)
  return MaskSample(mask=mask, scored=scored, weight=weight, ratio=ratio)


# -- estimators ------------------------------------------------------------------------------------

def t_iid_mask(keys: jax.Array, eligible: jax.Array, mc_index: IntLike, *,
               eps: float = 1e-3) -> MaskSample:
  """t ~ U(0,1), p = (1−ε)t + ε, mask each eligible position w.p. p, weight 1/p (§1.1).

  E[(1/p)·S] = Σ_k c_k(ε) E[S | k masked] with c_k(0) = 1/k: at ε = 0 it is the MDM bound.
  """
  _check(keys, eligible)

  def row(key, elig):
    t_key, u_key = jax.random.split(_mc_key(key, mc_index))
    p = (1.0 - eps) * jax.random.uniform(t_key, (), jnp.float32) + eps
    mask = elig & (jax.random.uniform(u_key, elig.shape) < p)
    return mask, 1.0 / p

  mask, weight = jax.vmap(row)(keys, eligible)
  return _finish(mask, mask, weight, eligible)


def stratified_counts(offset: jax.Array, length: jax.Array, mc_index: IntLike,
                      num_samples: int) -> jax.Array:
  """k_i = ((round(k0 + i·L/n) − 1) mod L) + 1 for k0 ∈ {1..L} (§1.2); 0 where L = 0."""
  length_f = length.astype(jnp.float32)
  raw = jnp.round(offset.astype(jnp.float32) + jnp.asarray(mc_index, jnp.float32) * length_f
                  / num_samples).astype(jnp.int32)
  safe_length = jnp.maximum(length, 1)
  return jnp.where(length > 0, jnp.mod(raw - 1, safe_length) + 1, 0)


def k_stratified_mask(keys: jax.Array, eligible: jax.Array, mc_index: IntLike, *,
                      num_samples: int) -> MaskSample:
  """Systematic (k-stratified) masked counts with one random offset per example (§1.2).

  k0 ~ U{1..L} is drawn from the example key alone (shared by the ``num_samples`` MC indices);
  MC index i masks exactly k_i = ((round(k0 + i·L/n) − 1) mod L) + 1 uniformly chosen eligible
  positions; weight L/k_i. The average over i = 0..n−1 is an unbiased estimate of the MDM bound.
  """
  _check(keys, eligible)
  if num_samples < 1:
    raise ValueError(f"k_stratified_mask needs num_samples >= 1, got {num_samples}")

  def row(key, elig):
    length = jnp.sum(elig).astype(jnp.int32)
    offset = jax.random.randint(jax.random.fold_in(key, _TAG_OFFSET), (), 1,
                                jnp.maximum(length, 1) + 1)
    k = stratified_counts(offset, length, mc_index, num_samples)
    mask = _exactly_k(jax.random.fold_in(_mc_key(key, mc_index), _TAG_PERM), elig, k)
    return mask, length / jnp.maximum(k, 1)

  mask, weight = jax.vmap(row)(keys, eligible)
  return _finish(mask, mask, weight, eligible)


def uniform_count_mask(keys: jax.Array, eligible: jax.Array, mc_index: IntLike) -> MaskSample:
  """k ~ U{1..L} independently per MC index, exactly k masked, weight L/k (DMPO paper law)."""
  _check(keys, eligible)

  def row(key, elig):
    key = _mc_key(key, mc_index)
    length = jnp.sum(elig).astype(jnp.int32)
    k = jax.random.randint(jax.random.fold_in(key, _TAG_OFFSET), (), 1, jnp.maximum(length, 1) + 1)
    k = jnp.where(length > 0, k, 0)
    mask = _exactly_k(jax.random.fold_in(key, _TAG_PERM), elig, k)
    return mask, length / jnp.maximum(k, 1)

  mask, weight = jax.vmap(row)(keys, eligible)
  return _finish(mask, mask, weight, eligible)


def antithetic_mask(keys: jax.Array, eligible: jax.Array, mc_index: IntLike, *,
                    lambda_range: tuple[float, float] = (0.1, 1.0)) -> MaskSample:
  """Antithetic Bernoulli pairs (DMPO code, §1.3).

  Pair j = mc_index // 2: λ = lo + (hi − lo)·U, u_d ~ U(0,1) per position; mc_index even masks
  {d : u_d < λ}, odd masks the complement (both ∩ eligible). weight = L / max(m, 1), m = |M|
  (an empty mask therefore contributes 0).
  """
  _check(keys, eligible)
  lo, hi = lambda_range
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"lambda_range must satisfy 0 <= lo <= hi <= 1, got {lambda_range}")
  pair = jnp.asarray(mc_index, jnp.int32) // 2
  complement = (jnp.asarray(mc_index, jnp.int32) % 2) == 1

  def row(key, elig):
    lam_key, u_key = jax.random.split(jax.random.fold_in(_mc_key(key, pair), _TAG_PAIR))
    lam = lo + (hi - lo) * jax.random.uniform(lam_key, (), jnp.float32)
    below = jax.random.uniform(u_key, elig.shape) < lam
    mask = elig & jnp.where(complement, ~below, below)
    length = jnp.sum(elig)
    return mask, length / jnp.maximum(jnp.sum(mask), 1)

  mask, weight = jax.vmap(row)(keys, eligible)
  return _finish(mask, mask, weight, eligible)


def one_step_mask(keys: jax.Array, eligible: jax.Array, mc_index: IntLike, *,
                  prompt_positions: jax.Array, completion_positions: Optional[jax.Array] = None,
                  p_mask_prompt: float = 0.15) -> MaskSample:
  """diffu-GRPO / wd1 one-step estimate (§1.4): the whole completion is masked, each real prompt
  token (``prompt_positions`` [B, T]) is masked w.p. ``p_mask_prompt``; scored = eligible;
  weight 1. ``completion_positions`` defaults to ``eligible`` (d1 masks the full canvas and
  scores up to the first EOS: pass the full completion here)."""
  _check(keys, eligible)
  chex.assert_equal_shape([eligible, prompt_positions])
  completion = eligible if completion_positions is None else completion_positions.astype(jnp.bool_)
  chex.assert_equal_shape([eligible, completion])

  def row(key, prompt):
    u = jax.random.uniform(jax.random.fold_in(_mc_key(key, mc_index), _TAG_PROMPT), prompt.shape)
    return prompt & (u < p_mask_prompt)

  prompt_mask = jax.vmap(row)(keys, prompt_positions.astype(jnp.bool_))
  mask = completion | prompt_mask
  return _finish(mask, eligible, jnp.ones(eligible.shape[0], jnp.float32), eligible)


def spg_block_mask(keys: jax.Array, eligible: jax.Array, mc_index: IntLike, *,
                   completion_positions: jax.Array, block_length: int, min_t: float = 0.0,
                   max_t: float = 1.0, prompt_positions: Optional[jax.Array] = None,
                   p_mask_prompt: float = 0.0,
                   reference_prompt_masking: bool = False) -> MaskSample:
  """SPG block-wise masking (`docs/algorithms.md` §1.5, ``forward_type="block_random"``).

  The completion (``completion_positions``, contiguous) is cut into blocks of ``block_length``;
  B_c = number of blocks holding eligible (valid) tokens. A permutation of the blocks drawn from
  the example key alone (shared across MC indices) gives b_j = perm[j mod B] mod B_c. Blocks
  before b_j stay clean, completion positions in later blocks and every non-eligible completion
  position (after the first EOS) are masked, and inside b_j exactly
  n_j ~ U{max(⌊len·min_t⌋, 1) .. min(⌊len·max_t⌋, len)} of its ``len`` eligible positions.
  scored = mask ∩ eligible; weight = 1/|scored| (per-masked-token mean); ratio = t_j.
  With ``p_mask_prompt`` > 0, every still-unmasked real position (``prompt_positions`` ∪ clean
  completion) is also masked w.p. ``p_mask_prompt`` (not scored).

  ``reference_prompt_masking`` reproduces SPG's ``forward_process`` instead: the unselected
  positions of the chosen block are never prompt-masked, and prompt-masked eligible positions of
  the earlier (clean) completion blocks are scored and counted in |M_j| and t_j.
  """
  _check(keys, eligible)
  chex.assert_equal_shape([eligible, completion_positions])
  completion_positions = completion_positions.astype(jnp.bool_)
  if block_length < 1:
    raise ValueError(f"block_length must be >= 1, got {block_length}")
  t = eligible.shape[1]
  max_blocks = -(-t // block_length)

  def row(key, elig, comp):
    offset = jnp.cumsum(comp.astype(jnp.int32)) - 1
    block = jnp.where(comp, offset // block_length, -1)
    n_blocks = -(-jnp.sum(comp) // block_length)
    block_ids = jnp.arange(max_blocks)
    has_valid = jnp.any((block[None, :] == block_ids[:, None]) & elig[None, :], axis=-1)
    n_valid_blocks = jnp.maximum(jnp.sum(has_valid), 1)
    # A random permutation of the completion's blocks: sort random keys, real blocks first.
    perm_scores = jnp.where(block_ids < n_blocks,
                            jax.random.uniform(jax.random.fold_in(key, _TAG_BLOCK), (max_blocks,)),
                            2.0)
    perm = jnp.argsort(perm_scores)
    j = jnp.mod(jnp.asarray(mc_index, jnp.int32), jnp.maximum(n_blocks, 1))
    chosen = jnp.mod(perm[j], n_valid_blocks)
    in_chosen = elig & (block == chosen)
    length = jnp.sum(in_chosen)
    lo = jnp.maximum(jnp.floor(length * min_t).astype(jnp.int32), 1)
    hi = jnp.minimum(jnp.floor(length * max_t).astype(jnp.int32), length)
    mc_key = _mc_key(key, mc_index)
    n = jax.random.randint(jax.random.fold_in(mc_key, _TAG_OFFSET), (), lo, jnp.maximum(hi, lo) + 1)
    n = jnp.minimum(n, length)
    mask = _exactly_k(jax.random.fold_in(mc_key, _TAG_PERM), in_chosen, n)
    mask = mask | (comp & (block > chosen)) | (comp & ~elig)
    return mask, comp & (block == chosen)

  mask, chosen_block = jax.vmap(row)(keys, eligible, completion_positions)
  scored = mask & eligible
  if p_mask_prompt > 0.0:
    if prompt_positions is None:
      raise ValueError("spg_block_mask with p_mask_prompt > 0 needs prompt_positions")
    chex.assert_equal_shape([eligible, prompt_positions])
    clean = (prompt_positions.astype(jnp.bool_) | completion_positions) & ~mask
    if reference_prompt_masking:
      clean = clean & ~chosen_block
    u = jax.vmap(lambda k: jax.random.uniform(
        jax.random.fold_in(_mc_key(k, mc_index), _TAG_PROMPT), (t,)))(keys)
    extra = clean & (u < p_mask_prompt)
    mask = mask | extra
    if reference_prompt_masking:
      scored = scored | (extra & eligible)
  weight = 1.0 / jnp.maximum(jnp.sum(scored, axis=-1), 1)
  return _finish(mask, scored, weight, eligible)
