"""The LLaDA sampler with Fast-dLLM options, jitted with fixed shapes (`docs/llada.md` §6, §6.1, §7).

API note
--------
::

    config = SamplerConfig(gen_length=256, steps=128, block_length=32, temperature=0.2)
    out = generate(graphdef, params, prompt_ids, prompt_mask, key, config)
    out.sequences          # int32 [B, P + L]: prompt (as given, left-padded) + completion
    out.commit_step        # int32 [B, L] step at which each completion token was committed
                           #   (the denoising trace; only with config.return_trace, else None)
    out.commit_log_prob    # fp32 [B, L] log p(committed token) under the (CFG-combined,
                           #   un-tempered) distribution it was drawn from (return_trace)
    out.num_forward_passes # int32 [] model forward passes (a CFG pass counts once)

``graphdef, params = split_model(model)``; `generate` is ``jax.jit`` with ``graphdef`` and
``config`` static: one compile per (batch, prompt length, config). The MASK / EOS / EOT ids come
from the model config. The RL trainer passes the params it trains in the sampling layout
(`dmpo_jax.sampling_layout`), with that layout's mesh in scope.

Algorithm (`docs/llada.md` §6): canvas x = [prompt, MASK × L]; blocks of K = block_length positions
decoded left to right (semi-autoregressive), S = steps / (L / K) steps per block; at the first step
of a block M_b = #masked in the block and step s commits
quota[s] = ⌊M_b / S⌋ + 1[s < M_b mod S] tokens. Each step: logits of the current block (only
its K positions go through the output head); with cfg_scale w > 0, unsupervised CFG
l = l_u + (w + 1)(l_c − l_u), l_u computed on x with every prompt position set to MASK (both rows
in one batch); optional EOS / EOT controls; x̂ = argmax(l/τ + Gumbel) (τ = 0: argmax);
confidence = softmax(l)[x̂] (``low_confidence``) or U(0,1) (``random``); commit x̂ at the
top-quota masked positions of the block (committed tokens never change).

Fast-dLLM options (arXiv 2505.22618; `docs/llada.md` §7):
* ``cache``: ``"none"`` (exact); ``"prefix"``: at each block start one full forward that also
  returns K/V, later steps of the block run only x[:, block_start:] against the cached K/V of the
  positions before the block (the blocks are unrolled in Python for static prefix lengths, so
  compile time grows with their number); ``"dual"`` (DualCache): the block-start forward caches
  the K/V of the *whole* canvas, later steps run only the block's K queries against it, with the
  block's own entries recomputed (one loop over blocks, shapes independent of the block).
  Both are approximate beyond one layer: attention is bidirectional and the cached K/V are only
  refreshed at block starts.
* Parallel decoding (the block is then decoded until it has no mask left, in a
  `lax.while_loop`, so the number of forward passes varies and ``steps`` is unused):
  ``threshold``: every masked block position with confidence ≥ threshold, and always the most
  confident one; ``factor``: Fast-dLLM's factor rule (`decoding.commit_factor`);
  ``max_tokens_per_step``: a cap on the tokens either rule commits per step.
* ``stop_at_eos``: after a block, if every row has committed EOS and only EOS after its first
  EOS, the remaining blocks are skipped (no forward passes) and their positions are filled with
  EOS, the padding LLaDA-Instruct's sampler leaves there. Their trace entries stay −1 / 0.

``batch_invariant`` (evaluation): each row's tokens depend on that row alone, not on the batch
size, on its batch-mates' lengths or on the number of data-parallel devices. Padding is masked,
positions count from the first real token (for LLaDA the same attention as absolute positions
under the mask, since RoPE scores depend only on position differences), and the rows are decoded
in a loop over groups of one row per device, so every row runs the same per-device program
(XLA's CPU kernels otherwise pick different matmul / reduction code for different batch shapes:
measured in `docs/tasks.md` §7.2). Greedy decoding (τ = 0, ``low_confidence``) is then
token-identical; sampling noise still follows the row's place in its group. Devices are read from
the ambient mesh (`jax.sharding.use_abstract_mesh`).

EOS / EOT controls: ``logits_eos_inf`` sets the EOS logit to −∞. ``confidence_eos_eot_inf`` gives
positions whose sampled token is EOS or EOT zero confidence (the intended behaviour); with
``eos_eot_aliased`` the reference's aliased assignment is reproduced instead (`choose_tokens`):
x̂ from the unmodified logits, the −∞ only in the confidence (EOS and EOT at τ = 0, EOT alone at
τ > 0). ``reference_quota`` lets masked positions before the current block (earlier blocks, or
MASK tokens in the prompt) compete for the block's quota, as ML-GSAI/LLaDA ``generate.py`` does
(its confidence is −∞ only after the block and at unmasked positions).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from dmpo_jax import sharding
from dmpo_jax.diffusion import decoding
# The settings live in their own module; re-exported here, where callers have always found them.
from dmpo_jax.diffusion.sampler_config import (  # noqa: F401  pylint: disable=unused-import
    CACHES, MODES, REMASKING, SamplerConfig, mode_options)
from dmpo_jax.models.transformer import KVCache


class SampleOutput(NamedTuple):
  sequences: jax.Array                    # int32 [B, P + L]
  commit_step: Optional[jax.Array]        # int32 [B, L]
  commit_log_prob: Optional[jax.Array]    # fp32 [B, L]
  num_forward_passes: jax.Array           # int32 []


class _State(NamedTuple):
  x: jax.Array
  commit_step: jax.Array
  commit_log_prob: jax.Array
  block_masked: jax.Array   # [B] masked count of the current block at its first step
  step: jax.Array           # global step counter (key derivation, trace)
  forwards: jax.Array
  stopped: jax.Array        # bool []: every row finished with EOS padding (stop_at_eos)


def _set_token(logits: jax.Array, token: Optional[int], value: float = -jnp.inf) -> jax.Array:
  if token is None:
    return logits
  return logits.at[..., token].set(value)


def choose_tokens(logits: jax.Array, key: jax.Array, config: SamplerConfig, eos: int,
                  eot: Optional[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Candidate tokens, confidences and log-probs for one step. logits fp32 [B, K, V].

  Returns x̂ int32 [B, K], confidence fp32 [B, K], log p(x̂) fp32 [B, K] under the distribution
  x̂ was drawn from.

  ``eos_eot_aliased`` reproduces ML-GSAI/LLaDA ``generate.py``: x̂ is drawn from the logits as
  they are (after ``logits_eos_inf``); then its chained assignment
  ``logits_with_noise[..., EOS] = logits[..., EOT] = -inf`` only changes the confidence
  softmax(logits)[x̂]: at τ = 0 the noisy logits *are* the logits, so both EOS and EOT are −∞ in
  it; at τ > 0 only EOT is. Confidence is then 0 where x̂ is a removed token.
  """
  noise_key, conf_key = jax.random.split(key)
  tau = config.temperature
  if config.logits_eos_inf:
    logits = _set_token(logits, eos)
  tokens = decoding.sample_tokens(logits, noise_key, tau, config.noise_dtype)
  conf_logits = logits
  if config.confidence_eos_eot_inf and config.eos_eot_aliased:
    conf_logits = _set_token(logits, eot)
    if tau == 0.0:
      conf_logits = _set_token(conf_logits, eos)
  log_probs = jax.nn.log_softmax(conf_logits, axis=-1)
  token_log_prob = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  if config.remasking == "low_confidence":
    confidence = jnp.exp(token_log_prob)
  else:
    confidence = jax.random.uniform(conf_key, tokens.shape, jnp.float32)
  if config.confidence_eos_eot_inf and not config.eos_eot_aliased:
    special = tokens == eos
    if eot is not None:
      special = special | (tokens == eot)
    confidence = jnp.where(special, 0.0, confidence)
  sample_log_probs = jax.nn.log_softmax(logits, axis=-1)
  committed_log_prob = jnp.take_along_axis(sample_log_probs, tokens[..., None], axis=-1)[..., 0]
  return tokens, confidence, committed_log_prob


def select_commits(confidence: jax.Array, candidates: jax.Array, quota: Optional[jax.Array],
                   config: SamplerConfig) -> jax.Array:
  """The positions committed this step: the top ``quota`` (quota schedule), or the threshold /
  factor rule, capped at ``max_tokens_per_step``."""
  if config.threshold is not None:
    selected = decoding.commit_threshold(confidence, candidates, config.threshold)
  elif config.factor is not None:
    selected = decoding.commit_factor(confidence, candidates, config.factor)
  else:
    return decoding.commit_top_quota(confidence, candidates, quota)
  if config.max_tokens_per_step is not None:
    selected = decoding.cap_commits(selected, confidence, config.max_tokens_per_step)
  return selected


def finished_with_eos_padding(completion: jax.Array, decoded_length: jax.Array,
                              eos: int) -> jax.Array:
  """bool [B]: the first ``decoded_length`` completion tokens contain EOS and only EOS follows
  the first one, i.e. the row is already in its EOS padding (the rest can only be padding)."""
  pos = jnp.arange(completion.shape[1])
  decoded = pos < decoded_length
  is_eos = (completion == eos) & decoded
  first = jnp.argmax(is_eos, axis=-1)
  after = decoded & (pos > first[:, None])
  return jnp.any(is_eos, -1) & jnp.all(jnp.where(after, completion == eos, True), -1)


def _generate(graphdef: Any, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
              key: jax.Array, config: SamplerConfig) -> SampleOutput:
  model = nnx.merge(graphdef, params)
  if config.batch_invariant:  # padding invisible, positions from the first real token
    model.config = model.config.replace(use_key_padding_mask=True, positions_from_padding=True)
  mc = model.config
  chex.assert_rank(prompt_ids, 2)
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  batch, prompt_len = prompt_ids.shape
  gen, k_len = config.gen_length, config.block_length
  total = prompt_len + gen
  mask_id, eos, eot = mc.mask_token_id, mc.eos_token_id, mc.eot_token_id
  shift = 1 if mc.logit_alignment == "shifted" else 0
  if prompt_len < shift:
    raise ValueError("a shifted-logit model needs a prompt of at least one token")

  x0 = jnp.concatenate([prompt_ids.astype(jnp.int32),
                        jnp.full((batch, gen), mask_id, jnp.int32)], axis=1)
  # One convert of the whole canvas mask: the TPU compiler (libtpu 0.0.42.1) aborts on a convert
  # of the [rows, 200] prompt mask alone in DMPO's prefix-cache sampler ("Cannot find a valid
  # window"), so `configs/dmpo_*.py` rollouts would not compile for TPU.
  attention = jnp.concatenate([prompt_mask.astype(jnp.bool_), jnp.ones((batch, gen), jnp.bool_)],
                              1).astype(jnp.int32)
  positions = model.default_positions(batch, total, attention)
  use_cfg = config.cfg_scale > 0
  # With reference_quota every masked position before the block's end is a candidate, so the
  # head runs on the whole canvas; otherwise only on the current block.
  window = total if config.reference_quota else k_len

  def model_inputs(x):
    """(ids, attention, positions), rows doubled with the prompt-masked copy under CFG."""
    if not use_cfg:
      return x, attention, positions
    unconditional = x.at[:, :prompt_len].set(mask_id)
    return (jnp.concatenate([x, unconditional]), jnp.concatenate([attention, attention]),
            jnp.concatenate([positions, positions]))

  def head(hidden_block):
    logits = model.logits_from_hidden(hidden_block)
    if not use_cfg:
      return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + (config.cfg_scale + 1.0) * (cond - uncond)

  def window_start(block_start):
    return 0 if config.reference_quota else block_start

  def logits_full(x, block_start, return_kv=False):
    """Uncached forward over the whole canvas; head on the block (or the whole canvas)."""
    ids, am, pos = model_inputs(x)
    out = model.hidden_states(ids, am, positions=pos, return_kv=return_kv)
    hidden, kv = out if return_kv else (out, None)
    hidden = jax.lax.dynamic_slice_in_dim(model.align(hidden), window_start(block_start), window,
                                          axis=1)
    return head(hidden), kv

  def logits_dual(x, kv, block_start):
    """Dual cache (Fast-dLLM DualCache): only the block's queries (one position earlier for
    shifted logits) run, against the K/V of the whole canvas cached at the block start."""
    ids, am, pos = model_inputs(x)
    query_start = block_start - shift
    hidden = model.hidden_states(
        jax.lax.dynamic_slice_in_dim(ids, query_start, k_len, axis=1), None,
        positions=jax.lax.dynamic_slice_in_dim(pos, query_start, k_len, axis=1),
        canvas_kv=KVCache(kv.k, kv.v, am), window_start=query_start)
    return head(hidden)

  def commit(state: _State, logits, block_start, step_in_block) -> _State:
    x = state.x
    start = window_start(block_start)
    current = jax.lax.dynamic_slice_in_dim(x, start, window, axis=1)
    masked = current == mask_id
    if config.reference_quota:  # masked positions of earlier blocks (and the prompt) compete
      candidates = masked & (jnp.arange(total) < block_start + k_len)
      in_block = jax.lax.dynamic_slice_in_dim(x, block_start, k_len, axis=1) == mask_id
    else:
      candidates = in_block = masked
    block_masked = jnp.where(step_in_block == 0, jnp.sum(in_block, axis=-1).astype(jnp.int32),
                             state.block_masked)
    tokens, confidence, log_prob = choose_tokens(
        logits, jax.random.fold_in(key, state.step), config, eos, eot)
    quota = None
    if not config.parallel:
      s_per = config.steps_per_block
      quota = block_masked // s_per + (step_in_block < block_masked % s_per).astype(jnp.int32)
    selected = select_commits(confidence, candidates, quota, config)
    x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(selected, tokens, current), start, 1)
    commit_step, commit_log_prob = state.commit_step, state.commit_log_prob
    if config.return_trace:
      sel, lp = selected, log_prob
      if config.reference_quota:
        sel, lp, offset = selected[:, prompt_len:], log_prob[:, prompt_len:], 0
      else:
        offset = block_start - prompt_len
      old_step = jax.lax.dynamic_slice_in_dim(commit_step, offset, sel.shape[1], axis=1)
      old_lp = jax.lax.dynamic_slice_in_dim(commit_log_prob, offset, sel.shape[1], axis=1)
      commit_step = jax.lax.dynamic_update_slice_in_dim(
          commit_step, jnp.where(sel, state.step, old_step), offset, 1)
      commit_log_prob = jax.lax.dynamic_update_slice_in_dim(
          commit_log_prob, jnp.where(sel, lp, old_lp), offset, 1)
    return state._replace(x=x, commit_step=commit_step, commit_log_prob=commit_log_prob,
                          block_masked=block_masked, step=state.step + 1,
                          forwards=state.forwards + 1)

  def block_has_mask(x, block_start):
    return jnp.any(jax.lax.dynamic_slice_in_dim(x, block_start, k_len, axis=1) == mask_id)

  def decode_block(state: _State, block_start, step_logits) -> _State:
    """Steps 1.. of a block (step 0 is done by the caller): the quota schedule's remaining
    steps, or, for threshold / factor decoding, until the block has no mask left."""
    if not config.parallel:
      def step_body(s, state):
        return commit(state, step_logits(state.x), block_start, s)
      return jax.lax.fori_loop(1, config.steps_per_block, step_body, state)

    def cond(carry):
      # Each step commits at least one position, so k_len steps finish the block; the bound
      # also ends it when a committed token is the mask id itself (an untrained model).
      return block_has_mask(carry[0].x, block_start) & (carry[1] < k_len)

    def body(carry):
      state, s = carry
      return commit(state, step_logits(state.x), block_start, s), s + 1

    return jax.lax.while_loop(cond, body, (state, jnp.int32(1)))[0]

  def run_block(state: _State, b) -> _State:
    block_start = prompt_len + b * k_len
    logits, kv = logits_full(state.x, block_start, return_kv=config.cache != "none")
    state = commit(state, logits, block_start, jnp.int32(0))
    if config.cache == "none":
      step_logits = lambda x: logits_full(x, block_start)[0]  # noqa: E731
    elif config.cache == "dual":
      step_logits = lambda x: logits_dual(x, kv, block_start)  # noqa: E731
    else:
      # Prefix cache: queries start at the block (one earlier for shifted logits) and run over
      # the rest of the canvas; ``b`` is a Python int here (static prefix length).
      suffix_start = block_start - shift
      _, am_all, pos_all = model_inputs(state.x)
      prefix = KVCache(kv.k[:, :, :suffix_start], kv.v[:, :, :suffix_start],
                       am_all[:, :suffix_start])

      def step_logits(x):
        ids, _, _ = model_inputs(x)
        hidden = model.hidden_states(ids[:, suffix_start:], am_all[:, suffix_start:],
                                     positions=pos_all[:, suffix_start:], prefix_kv=prefix)
        return head(hidden[:, :k_len])
    state = decode_block(state, block_start, step_logits)
    if config.stop_at_eos:
      done = finished_with_eos_padding(state.x[:, prompt_len:], block_start + k_len - prompt_len,
                                       eos)
      state = state._replace(stopped=jnp.all(done))
    return state

  trace_shape = (batch, gen) if config.return_trace else (batch, 0)
  state = _State(x0, jnp.full(trace_shape, -1, jnp.int32), jnp.zeros(trace_shape, jnp.float32),
                 jnp.zeros((batch,), jnp.int32), jnp.int32(0), jnp.int32(0), jnp.bool_(False))

  if config.cache == "prefix":
    # Blocks unrolled in Python (static prefix lengths): compile time grows with their number.
    for b in range(config.num_blocks):
      if config.stop_at_eos:
        state = jax.lax.cond(state.stopped, lambda s: s, functools.partial(run_block, b=b), state)
      else:
        state = run_block(state, b)
  else:
    def cond(carry):
      return (carry[1] < config.num_blocks) & ~carry[0].stopped

    def body(carry):
      state, b = carry
      return run_block(state, b), b + 1

    state = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))[0]

  x = state.x
  if config.stop_at_eos:
    # The reference sampler leaves LLaDA-Instruct's EOS padding after the answer: fill with EOS.
    completion = x[:, prompt_len:]
    x = x.at[:, prompt_len:].set(jnp.where(completion == mask_id, eos, completion))
  trace = config.return_trace
  return SampleOutput(x, state.commit_step if trace else None,
                      state.commit_log_prob if trace else None, state.forwards)


def _generate_row_groups(graphdef: Any, params: Any, prompt_ids: jax.Array,
                         prompt_mask: jax.Array, key: jax.Array,
                         config: SamplerConfig) -> SampleOutput:
  """``batch_invariant``: `_generate` in a loop over groups of D rows, one per device of the
  ambient mesh's batch axes (D = 1 without a mesh). Group g holds rows g, g + B/D, ... (one from
  each device's block of the batch), so each device decodes one row at a time."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  rows = math.prod(mesh.shape[a] for a in axes)
  b = prompt_ids.shape[0]
  if b % rows:
    raise ValueError(f"batch_invariant decoding needs the batch ({b} rows) to be a multiple of the "
                     f"data-parallel devices ({rows})")
  groups = b // rows

  def split(x):  # [B, ...] -> [B/D, D, ...]
    y = x.reshape(rows, groups, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(y, PartitionSpec(None, axes)) if axes else y

  ids, mask = split(prompt_ids), split(prompt_mask)
  shapes = jax.eval_shape(lambda: _generate(graphdef, params, ids[0], mask[0], key, config))
  out0 = jax.tree.map(lambda s: jnp.zeros((groups, *s.shape), s.dtype), shapes)

  def body(g, out):
    res = _generate(graphdef, params, ids[g], mask[g], key, config)
    return jax.tree.map(lambda o, r: jax.lax.dynamic_update_index_in_dim(o, r, g, 0), out, res)

  # The trip count goes through a barrier so XLA keeps the loop even for one group: every batch
  # size then runs the same compiled body.
  out = jax.lax.fori_loop(0, jax.lax.optimization_barrier(jnp.int32(groups)), body, out0)
  merge = lambda y: None if y is None else y.swapaxes(0, 1).reshape(b, *y.shape[2:])  # noqa: E731
  return SampleOutput(merge(out.sequences), merge(out.commit_step), merge(out.commit_log_prob),
                      jnp.sum(out.num_forward_passes))


def _generate_entry(graphdef: Any, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    key: jax.Array, config: SamplerConfig) -> SampleOutput:
  if config.batch_invariant:
    return _generate_row_groups(graphdef, params, prompt_ids, prompt_mask, key, config)
  return _generate(graphdef, params, prompt_ids, prompt_mask, key, config)


generate = jax.jit(_generate_entry, static_argnames=("graphdef", "config"))
generate.__doc__ = """Jitted LLaDA sampler: generate(graphdef, params, prompt_ids [B, P] left-padded,
prompt_mask [B, P] (1 = real token), key, config: SamplerConfig) -> SampleOutput.
See the module docstring for the algorithm and options."""


def forward_passes_per_row(commit_step, config: SamplerConfig) -> np.ndarray:
  """int [B]: the forward passes each row needs when decoded alone, from a batch's commit trace
  (``SampleOutput.commit_step``, ``return_trace=True``). The quota schedule runs ``steps``
  passes whatever the row. Threshold / factor decoding commits at least one token of each row
  whose block still has a mask at every step (the most confident one), so a row decoded alone
  runs exactly the steps at which it committed something: their number. Exact for greedy
  decoding, where rows do not interact; batched, a block runs until its slowest row is done
  (``num_forward_passes``). Not defined with ``stop_at_eos`` (a row alone would stop at its own
  EOS, the batch at the last row's)."""
  if config.stop_at_eos:
    raise ValueError("forward_passes_per_row: not defined with stop_at_eos")
  steps = np.asarray(commit_step)
  if not config.parallel:
    return np.full(steps.shape[0], config.steps, np.int64)
  return np.array([len(np.unique(row[row >= 0])) for row in steps], np.int64)


def quota_schedule(masked: int, steps_per_block: int) -> list[int]:
  """quota[s] = ⌊M/S⌋ + 1[s < M mod S] (`docs/llada.md` §6), as a Python list (tests, reporting)."""
  return [masked // steps_per_block + int(s < masked % steps_per_block)
          for s in range(steps_per_block)]
