"""The LLaDA sampler with Fast-dLLM options, jitted with fixed shapes (`llada.md` §6, §6.1, §7).

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
from the model config. The RL trainer passes the params it trains (no copy).

Algorithm (`llada.md` §6): canvas x = [prompt, MASK × L]; blocks of K = block_length positions
decoded left to right (semi-autoregressive), S = steps / (L / K) steps per block; at the first step
of a block M_b = #masked in the block and step s commits
quota[s] = ⌊M_b / S⌋ + 1[s < M_b mod S] tokens. Each step: logits of the current block (only
its K positions go through the output head); with cfg_scale w > 0, unsupervised CFG
l = l_u + (w + 1)(l_c − l_u), l_u computed on x with every prompt position set to MASK (both rows
in one batch); optional EOS / EOT controls; x̂ = argmax(l/τ + Gumbel) (τ = 0: argmax);
confidence = softmax(l)[x̂] (``low_confidence``) or U(0,1) (``random``); commit x̂ at the
top-quota masked positions of the block (committed tokens never change).

Fast-dLLM options (`llada.md` §7):
* ``threshold``: commit every masked block position with confidence ≥ threshold and always the
  most confident one; the block is decoded until it has no masks (a `lax.while_loop`, so the
  number of forward passes varies; ``steps`` is then unused).
* ``use_prefix_cache``: at each block start one full forward that also returns K/V; later steps
  of the block run only x[:, block_start:] against the cached K/V of the positions before the block
  (approximate: those K/V are not refreshed within the block). The blocks are unrolled in Python
  (static prefix lengths), so compile time grows with the number of blocks.

EOS / EOT controls: ``logits_eos_inf`` sets the EOS logit to −∞. ``confidence_eos_eot_inf`` gives
positions whose sampled token is EOS or EOT zero confidence (the intended behaviour); with
``eos_eot_aliased`` the reference's aliased assignment is reproduced instead: at τ = 0 the EOS and
EOT logits are −∞ for both sampling and confidence, at τ > 0 EOS is removed from sampling and EOT's
probability is zeroed in the confidence only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.diffusion import decoding
from dmpo_jax.models.transformer import KVCache

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings (hashable: a jit static argument)."""
  gen_length: int = 128
  steps: int = 128
  block_length: int = 32
  temperature: float = 0.0
  remasking: str = "low_confidence"
  cfg_scale: float = 0.0
  logits_eos_inf: bool = False
  confidence_eos_eot_inf: bool = False
  eos_eot_aliased: bool = False
  threshold: Optional[float] = None
  use_prefix_cache: bool = False
  return_trace: bool = False
  noise_dtype: str = "float32"

  def __post_init__(self):
    errors = []
    if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
      errors.append(f"gen_length ({self.gen_length}), block_length ({self.block_length}) and steps "
                    f"({self.steps}) must be positive")
    elif self.gen_length % self.block_length:
      errors.append(f"gen_length ({self.gen_length}) must be a multiple of block_length "
                    f"({self.block_length})")
    elif self.threshold is None and self.steps % (self.gen_length // self.block_length):
      errors.append(f"steps ({self.steps}) must be a multiple of the number of blocks "
                    f"({self.gen_length // self.block_length})")
    if self.remasking not in REMASKING:
      errors.append(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
    if self.temperature < 0 or self.cfg_scale < 0:
      errors.append(f"temperature ({self.temperature}) and cfg_scale ({self.cfg_scale}) must be >= 0")
    if self.noise_dtype not in ("float32", "float64"):
      errors.append(f"noise_dtype must be float32 or float64, got {self.noise_dtype!r}")
    if errors:
      raise ValueError("Invalid SamplerConfig: " + "; ".join(errors))

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  def replace(self, **kwargs) -> "SamplerConfig":
    return dataclasses.replace(self, **kwargs)


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


def _set_token(logits: jax.Array, token: Optional[int], value: float = -jnp.inf) -> jax.Array:
  if token is None:
    return logits
  return logits.at[..., token].set(value)


def choose_tokens(logits: jax.Array, key: jax.Array, config: SamplerConfig, eos: int,
                  eot: Optional[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Candidate tokens, confidences and log-probs for one step. logits fp32 [B, K, V].

  Returns x̂ int32 [B, K], confidence fp32 [B, K], log p(x̂) fp32 [B, K].
  """
  noise_key, conf_key = jax.random.split(key)
  tau = config.temperature
  if config.logits_eos_inf:
    logits = _set_token(logits, eos)
  sample_logits = conf_logits = logits
  if config.confidence_eos_eot_inf and config.eos_eot_aliased:
    if tau == 0.0:
      sample_logits = conf_logits = _set_token(_set_token(logits, eos), eot)
    else:
      sample_logits, conf_logits = _set_token(logits, eos), _set_token(logits, eot)
  tokens = decoding.sample_tokens(sample_logits, noise_key, tau, config.noise_dtype)
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
  sample_log_probs = jax.nn.log_softmax(sample_logits, axis=-1)
  committed_log_prob = jnp.take_along_axis(sample_log_probs, tokens[..., None], axis=-1)[..., 0]
  return tokens, confidence, committed_log_prob


def _generate(graphdef: Any, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
              key: jax.Array, config: SamplerConfig) -> SampleOutput:
  model = nnx.merge(graphdef, params)
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
  attention = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((batch, gen), jnp.int32)], 1)
  positions = model.default_positions(batch, total, attention)
  use_cfg = config.cfg_scale > 0

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

  def block_logits_full(x, block_start, return_kv=False):
    ids, am, pos = model_inputs(x)
    out = model.hidden_states(ids, am, positions=pos, return_kv=return_kv)
    hidden, kv = out if return_kv else (out, None)
    hidden = jax.lax.dynamic_slice_in_dim(model.align(hidden), block_start, k_len, axis=1)
    return head(hidden), kv

  def commit(state: _State, logits, block_start, step_in_block) -> _State:
    x = state.x
    block = jax.lax.dynamic_slice_in_dim(x, block_start, k_len, axis=1)
    masked = block == mask_id
    block_masked = jnp.where(step_in_block == 0, jnp.sum(masked, axis=-1).astype(jnp.int32),
                             state.block_masked)
    tokens, confidence, log_prob = choose_tokens(
        logits, jax.random.fold_in(key, state.step), config, eos, eot)
    if config.threshold is None:
      s_per = config.steps_per_block
      quota = block_masked // s_per + (step_in_block < block_masked % s_per).astype(jnp.int32)
      selected = decoding.commit_top_quota(confidence, masked, quota)
    else:
      selected = decoding.commit_threshold(confidence, masked, config.threshold)
    x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(selected, tokens, block), block_start, 1)
    commit_step, commit_log_prob = state.commit_step, state.commit_log_prob
    if config.return_trace:
      offset = block_start - prompt_len
      old_step = jax.lax.dynamic_slice_in_dim(commit_step, offset, k_len, axis=1)
      old_lp = jax.lax.dynamic_slice_in_dim(commit_log_prob, offset, k_len, axis=1)
      commit_step = jax.lax.dynamic_update_slice_in_dim(
          commit_step, jnp.where(selected, state.step, old_step), offset, 1)
      commit_log_prob = jax.lax.dynamic_update_slice_in_dim(
          commit_log_prob, jnp.where(selected, log_prob, old_lp), offset, 1)
    return _State(x, commit_step, commit_log_prob, block_masked, state.step + 1,
                  state.forwards + 1)

  def block_has_mask(x, block_start):
    return jnp.any(jax.lax.dynamic_slice_in_dim(x, block_start, k_len, axis=1) == mask_id)

  trace_shape = (batch, gen) if config.return_trace else (batch, 0)
  state = _State(x0, jnp.full(trace_shape, -1, jnp.int32), jnp.zeros(trace_shape, jnp.float32),
                 jnp.zeros((batch,), jnp.int32), jnp.int32(0), jnp.int32(0))

  if not config.use_prefix_cache:
    if config.threshold is None:
      s_per = config.steps_per_block

      def step_body(s, state):
        block_start = prompt_len + (s // s_per) * k_len
        logits, _ = block_logits_full(state.x, block_start)
        return commit(state, logits, block_start, s % s_per)

      state = jax.lax.fori_loop(0, config.steps, step_body, state)
    else:
      def cond(carry):
        return carry[1] < config.num_blocks

      def body(carry):
        state, block, step_in_block = carry
        block_start = prompt_len + block * k_len
        logits, _ = block_logits_full(state.x, block_start)
        state = commit(state, logits, block_start, step_in_block)
        done = ~block_has_mask(state.x, block_start)
        return state, block + done.astype(jnp.int32), jnp.where(done, 0, step_in_block + 1)

      state, _, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0), jnp.int32(0)))
  else:
    for b in range(config.num_blocks):
      block_start = prompt_len + b * k_len
      logits, kv = block_logits_full(state.x, block_start, return_kv=True)
      state = commit(state, logits, block_start, jnp.int32(0))
      # Queries start at the block (one earlier for shifted logits, whose prediction for the
      # block's first position is read from the position before it).
      suffix_start = block_start - shift
      _, am_all, pos_all = model_inputs(state.x)
      prefix = KVCache(kv.k[:, :, :suffix_start], kv.v[:, :, :suffix_start],
                       am_all[:, :suffix_start])

      def suffix_logits(x, suffix_start=suffix_start, prefix=prefix, am_all=am_all,
                        pos_all=pos_all):
        ids, _, _ = model_inputs(x)
        hidden = model.hidden_states(ids[:, suffix_start:], am_all[:, suffix_start:],
                                     positions=pos_all[:, suffix_start:], prefix_kv=prefix)
        return head(hidden[:, :k_len])

      if config.threshold is None:
        def step_body(s, state, block_start=block_start, suffix_logits=suffix_logits):
          return commit(state, suffix_logits(state.x), block_start, s)

        state = jax.lax.fori_loop(1, config.steps_per_block, step_body, state)
      else:
        def cond(carry, block_start=block_start):
          return block_has_mask(carry[0].x, block_start)

        def body(carry, block_start=block_start, suffix_logits=suffix_logits):
          state, step_in_block = carry
          return commit(state, suffix_logits(state.x), block_start, step_in_block), step_in_block + 1

        state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(1)))

  trace = config.return_trace
  return SampleOutput(state.x, state.commit_step if trace else None,
                      state.commit_log_prob if trace else None, state.forwards)


generate = jax.jit(_generate, static_argnames=("graphdef", "config"))
generate.__doc__ = """Jitted LLaDA sampler: generate(graphdef, params, prompt_ids [B, P] left-padded,
prompt_mask [B, P] (1 = real token), key, config: SamplerConfig) -> SampleOutput.
See the module docstring for the algorithm and options."""


def quota_schedule(masked: int, steps_per_block: int) -> list[int]:
  """quota[s] = ⌊M/S⌋ + 1[s < M mod S] (`llada.md` §6), as a Python list (tests, reporting)."""
  return [masked // steps_per_block + int(s < masked % steps_per_block)
          for s in range(steps_per_block)]
