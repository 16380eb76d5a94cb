"""Pure building blocks of the transformer: RMSNorm, rotate-half RoPE, attention, SwiGLU.

All functions are pure over arrays so they can be tested piece by piece and reused inside
`lax.scan` over stacked layer parameters.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in LLaDA's order (`docs/llada.md` §2): upcast to fp32, x·rsqrt(mean(x²)+eps), cast back
  to the input dtype, then multiply by the (affine) scale."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * scale.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """fp32 cos/sin tables of shape [B, T, head_dim] for rotate-half RoPE.

  inv_freq_i = theta^(-2i/head_dim), i = 0..head_dim/2-1, duplicated as cat(freqs, freqs).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x' = x·cos + rotate_half(x)·sin with rotate_half(x) = cat(−x2, x1); computed in fp32 and
  cast back to x's dtype. x: [B, T, H, hd]; cos/sin: [B, T, hd]."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array],
              implementation: Optional[str] = None) -> jax.Array:
  """Bidirectional (non-causal) scaled dot-product attention with optional key-padding mask.

  q: [B, T, H, hd]; k, v: [B, S, Hkv, hd] with H a multiple of Hkv (GQA); key_mask: [B, S] bool.
  Scores and softmax are computed in fp32 by `jax.nn.dot_product_attention`.
  """
  b, t, h, hd = q.shape
  chex.assert_rank([k, v], 4)
  mask = None
  if key_mask is not None:
    chex.assert_shape(key_mask, (b, k.shape[1]))
    mask = key_mask[:, None, None, :].astype(jnp.bool_)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=1.0 / (hd ** 0.5), is_causal=False, implementation=implementation)


def swiglu(x: jax.Array, gate_kernel: jax.Array, up_kernel: jax.Array,
           down_kernel: jax.Array) -> jax.Array:
  """down(silu(x @ gate) * (x @ up)); LLaDA names: ff_proj = gate, up_proj = up, ff_out = down."""
  gate = jnp.einsum("btd,df->btf", x, gate_kernel)
  up = jnp.einsum("btd,df->btf", x, up_kernel)
  return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, down_kernel)
