"""Dream's `diffusion_generate` sampler, jitted with fixed shapes (`docs/llada.md` §9).

API note
--------
::

    config = DreamSamplerConfig(gen_length=256, steps=256, temperature=0.2, top_p=0.95,
                                alg="entropy")
    out = dream_generate(graphdef, params, prompt_ids, prompt_mask, key, config)  # SampleOutput

Shifted logits are resolved by the model (`Transformer.align`: the prediction for position i is
read from position i − 1); Dream's padding-aware positions come from the model config.

Algorithm: time grid t_i = linspace(1, ε, steps + 1); at step i (t = t_i, s = t_{i+1}) the
generation positions' logits are processed (l/τ when τ > 0, then top-p, then top-k), probs =
softmax; x̂ ~ probs (Gumbel-max; τ = 0: argmax). Orders:
* ``origin``: each masked position is revealed independently w.p. 1 − s/t (1 at the last step);
* ``maskgit_plus``: confidence = probs[x̂]; ``topk_margin``: top-1 − top-2 prob;
  ``entropy``: Σ_v p_v log p_v (negative entropy); the ⌊n_masked·(1 − s/t)⌋ most confident masked
  positions are revealed (all at the last step); with ``alg_temp`` > 0 they are drawn without
  replacement from softmax(confidence / alg_temp) (Gumbel top-k) instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.diffusion import decoding
from dmpo_jax.diffusion.sampler import SampleOutput

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclasses.dataclass(frozen=True)
class DreamSamplerConfig:
  gen_length: int = 256
  steps: int = 256
  eps: float = 1e-3
  temperature: float = 0.0
  top_p: Optional[float] = None
  top_k: Optional[int] = None
  alg: str = "entropy"
  alg_temp: float = 0.0
  return_trace: bool = False
  noise_dtype: str = "float32"

  def __post_init__(self):
    if self.gen_length <= 0 or self.steps <= 0:
      raise ValueError(f"Invalid DreamSamplerConfig: gen_length ({self.gen_length}) and steps "
                       f"({self.steps}) must be positive")
    if self.alg not in DREAM_ALGS:
      raise ValueError(f"Invalid DreamSamplerConfig: alg must be one of {DREAM_ALGS}, got {self.alg!r}")
    if self.temperature < 0 or self.alg_temp < 0:
      raise ValueError("Invalid DreamSamplerConfig: temperature and alg_temp must be >= 0")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"Invalid DreamSamplerConfig: top_p must be in (0, 1], got {self.top_p}")


def dream_confidence(probs: jax.Array, tokens: jax.Array, alg: str) -> jax.Array:
  """Per-position confidence of Dream's reveal orders (fp32 [..])."""
  if alg == "topk_margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if alg == "entropy":
    return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  return jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def _dream_generate(graphdef: Any, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    key: jax.Array, config: DreamSamplerConfig) -> SampleOutput:
  model = nnx.merge(graphdef, params)
  mask_id = model.config.mask_token_id
  chex.assert_rank(prompt_ids, 2)
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  batch, prompt_len = prompt_ids.shape
  gen = config.gen_length
  x = jnp.concatenate([prompt_ids.astype(jnp.int32), jnp.full((batch, gen), mask_id, jnp.int32)], 1)
  attention = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((batch, gen), jnp.int32)], 1)
  timesteps = jnp.linspace(1.0, config.eps, config.steps + 1, dtype=jnp.float32)
  tau = config.temperature

  def body(i, carry):
    x, commit_step, commit_log_prob = carry
    hidden = model.align(model.hidden_states(x, attention))[:, prompt_len:]
    logits = model.logits_from_hidden(hidden)
    if tau > 0:
      logits = logits / tau
    logits = decoding.filter_top_k_top_p(logits, config.top_k, config.top_p)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    step_key, order_key = jax.random.split(jax.random.fold_in(key, i))
    tokens = decoding.sample_tokens(logits, step_key, 1.0 if tau > 0 else 0.0, config.noise_dtype)
    canvas = x[:, prompt_len:]
    masked = canvas == mask_id
    t, s = timesteps[i], timesteps[i + 1]
    last = i == config.steps - 1
    if config.alg == "origin":
      p_transfer = jnp.where(last, 1.0, 1.0 - s / t)
      selected = masked & (jax.random.uniform(order_key, masked.shape) < p_transfer)
    else:
      confidence = dream_confidence(probs, tokens, config.alg)
      n_masked = jnp.sum(masked, axis=-1).astype(jnp.int32)
      n_reveal = jnp.where(last, n_masked,
                           jnp.floor(n_masked.astype(jnp.float32) * (1.0 - s / t)).astype(jnp.int32))
      if config.alg_temp > 0:
        confidence = confidence / config.alg_temp + jax.random.gumbel(order_key, confidence.shape)
      selected = decoding.commit_top_quota(confidence, masked, n_reveal)
    canvas = jnp.where(selected, tokens, canvas)
    if config.return_trace:
      token_log_prob = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
      commit_step = jnp.where(selected, i, commit_step)
      commit_log_prob = jnp.where(selected, token_log_prob, commit_log_prob)
    return x.at[:, prompt_len:].set(canvas), commit_step, commit_log_prob

  trace_shape = (batch, gen) if config.return_trace else (batch, 0)
  carry = (x, jnp.full(trace_shape, -1, jnp.int32), jnp.zeros(trace_shape, jnp.float32))
  x, commit_step, commit_log_prob = jax.lax.fori_loop(0, config.steps, body, carry)
  trace = config.return_trace
  return SampleOutput(x, commit_step if trace else None, commit_log_prob if trace else None,
                      jnp.int32(config.steps))


dream_generate = jax.jit(_dream_generate, static_argnames=("graphdef", "config"))
dream_generate.__doc__ = """Jitted Dream sampler: dream_generate(graphdef, params, prompt_ids [B, P]
left-padded, prompt_mask [B, P], key, config: DreamSamplerConfig) -> SampleOutput."""
