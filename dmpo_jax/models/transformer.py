"""The bidirectional masked-diffusion transformer (LLaDA / Dream) in Flax NNX.

Forward pass (`docs/llada.md` §2): x = wte[ids]; per block
  h = RMSNorm(x); q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv); RoPE(q, k) in fp32;
  x = x + Wo · softmax(q kᵀ / √hd + key_mask) v          (non-causal)
  x = x + Wdown (silu(RMSNorm(x) Wgate) ⊙ RMSNorm(x) Wup)
then logits = RMSNorm_f(x) Whead (untied).

Layer parameters are stacked along a leading ``layers`` axis and the blocks run in one
`lax.scan` (one compiled block for any depth; optional `jax.checkpoint` per block). Every
parameter carries ``logical_axes`` metadata that `dmpo_jax.sharding` maps to a `PartitionSpec`.

`token_log_probs` is the one likelihood primitive of the project: per-position log p(target)
in fp32, chunked over the sequence and tiled over the vocabulary so fp32 ``[batch, length,
vocab]`` logits never exist (`dmpo_jax.models.logprobs`).

Sharding (`docs/scaling.md`): inside ``jit`` with a mesh in scope, the residual stream is pinned
to rows split over the batch axes from the embedding output on, and every weight is gathered
from its storage layout to its compute layout just before use (per layer inside the scan, so
one layer's weights are whole at a time); weight gradients are reduce-scattered back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax import sharding
from dmpo_jax.models import attention as attention_lib
from dmpo_jax.models import layers as L
from dmpo_jax.models.logprobs import chunked_target_log_probs
from dmpo_jax.models import lora as lora_lib
from dmpo_jax.models.config import ModelConfig


class KVCache(NamedTuple):
  """Post-RoPE keys/values for every layer: [layers, B, S, Hkv, hd]; key mask [B, S] (1 = real).

  Either the K/V of a prefix the inputs follow (``prefix_kv``), or of the whole canvas the inputs
  are a window of (``canvas_kv``, Fast-dLLM's dual cache)."""
  k: jax.Array
  v: jax.Array
  mask: Optional[jax.Array]


def _param(value: jax.Array, *axes: Optional[str]) -> nnx.Param:
  return nnx.Param(value, logical_axes=tuple(axes))


class Blocks(nnx.Module):
  """All transformer blocks, parameters stacked on a leading ``layers`` axis."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    n, d, h, kvh, hd, f = c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_hidden_size
    pd = c.weight_dtype
    init = jax.nn.initializers.normal(c.initializer_range)
    self.attn_norm = _param(jnp.ones((n, d), pd), "layers", "norm")
    self.q_proj = _param(init(rngs.params(), (n, d, h, hd), pd), "layers", "embed", "heads", "head_dim")
    self.k_proj = _param(init(rngs.params(), (n, d, kvh, hd), pd), "layers", "embed", "kv_heads", "head_dim")
    self.v_proj = _param(init(rngs.params(), (n, d, kvh, hd), pd), "layers", "embed", "kv_heads", "head_dim")
    if c.qkv_bias:
      self.q_bias = _param(jnp.zeros((n, h, hd), pd), "layers", "heads", "head_dim")
      self.k_bias = _param(jnp.zeros((n, kvh, hd), pd), "layers", "kv_heads", "head_dim")
      self.v_bias = _param(jnp.zeros((n, kvh, hd), pd), "layers", "kv_heads", "head_dim")
    self.o_proj = _param(init(rngs.params(), (n, h, hd, d), pd), "layers", "heads", "head_dim", "embed")
    self.ffn_norm = _param(jnp.ones((n, d), pd), "layers", "norm")
    self.gate_proj = _param(init(rngs.params(), (n, d, f), pd), "layers", "embed", "mlp")
    self.up_proj = _param(init(rngs.params(), (n, d, f), pd), "layers", "embed", "mlp")
    self.down_proj = _param(init(rngs.params(), (n, f, d), pd), "layers", "mlp", "embed")

  def _variables(self) -> dict[str, Any]:
    names = ["attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "ffn_norm", "gate_proj",
             "up_proj", "down_proj"]
    if hasattr(self, "q_bias"):
      names += ["q_bias", "k_bias", "v_bias"]
    out = {name: getattr(self, name) for name in names}
    if hasattr(self, lora_lib.LORA_ATTR):
      out[lora_lib.LORA_ATTR] = {
          kernel: {"a": adapter.a, "b": adapter.b}
          for kernel, adapter in vars(getattr(self, lora_lib.LORA_ATTR)).items()
          if isinstance(adapter, lora_lib.Adapter)}
    return out

  def stacked(self) -> dict[str, Any]:
    """{name: [layers, ...] array} (LoRA factors under ``"lora"``), scanned over layers."""
    return jax.tree.map(lambda v: v[...], self._variables(), is_leaf=_is_variable)

  def layer_axes(self) -> dict[str, Any]:
    """The logical axes of one layer's slice of each stacked array (``layers`` dropped), as
    `LayerAxes` leaves in the structure of `stacked`."""
    return jax.tree.map(lambda v: LayerAxes(v.get_metadata()["logical_axes"][1:]),
                        self._variables(), is_leaf=_is_variable)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class LayerAxes:
  """Logical axes of a weight (a pytree leaf, not a tuple of leaves)."""
  axes: tuple[Optional[str], ...]


def gather_layer(params: dict[str, Any], axes: dict[str, Any], dtype: Any,
                 reduce_dtype: Any = None) -> dict[str, Any]:
  """One layer's weights in the compute dtype and layout (`sharding.gather_for_compute`)."""
  return jax.tree.map(lambda w, a: sharding.gather_for_compute(w, a.axes, dtype, reduce_dtype),
                      params, axes, is_leaf=lambda x: isinstance(x, LayerAxes))


def _project(x: jax.Array, kernel: jax.Array, equation: str, adapters: dict[str, Any], name: str,
             scale: float) -> jax.Array:
  """x @ kernel, plus the LoRA term ((x A) · scale) B when ``name`` has an adapter."""
  y = jnp.einsum(equation, x, kernel)
  if name in adapters:
    y = y + lora_lib.adapter_delta(x, adapters[name]["a"], adapters[name]["b"], scale)
  return y


def _block(config: ModelConfig, x: jax.Array, p: dict[str, jax.Array], cos: jax.Array,
           sin: jax.Array, key_mask: Optional[jax.Array],
           cached: Optional[tuple[jax.Array, jax.Array]], window_start: Optional[jax.Array] = None):
  """One pre-norm block. Returns (new x, (k, v) of the input positions after RoPE).

  ``cached`` (this layer's K/V): with ``window_start`` None they are a prefix the inputs follow
  (keys = [cached, own]); otherwise they cover the whole canvas and the inputs are the positions
  [window_start, window_start + T) of it, whose fresh K/V replace the cached ones there.
  ``p`` may hold LoRA factors under ``p["lora"][kernel]`` (`dmpo_jax.models.lora`)."""
  dt = config.compute_dtype
  p = jax.tree.map(lambda v: v.astype(dt), p)  # a no-op after `gather_layer`
  adapters = p.get(lora_lib.LORA_ATTR, {})
  scale = config.lora_scale
  h = L.rms_norm(x, p["attn_norm"], config.norm_eps)
  q = _project(h, p["q_proj"], "btd,dhk->bthk", adapters, "q_proj", scale)
  k = _project(h, p["k_proj"], "btd,dhk->bthk", adapters, "k_proj", scale)
  v = _project(h, p["v_proj"], "btd,dhk->bthk", adapters, "v_proj", scale)
  if "q_bias" in p:
    q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
  q = L.apply_rope(q, cos, sin)
  k = L.apply_rope(k, cos, sin)
  k_all, v_all = k, v
  if cached is not None and window_start is None:
    k_all = jnp.concatenate([cached[0].astype(dt), k], axis=1)
    v_all = jnp.concatenate([cached[1].astype(dt), v], axis=1)
  elif cached is not None:
    k_all = jax.lax.dynamic_update_slice_in_dim(cached[0].astype(dt), k, window_start, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cached[1].astype(dt), v, window_start, axis=1)
  att = attention_lib.attention(q, k_all, v_all, key_mask, impl=config.attention_impl)
  x = x + _project(att, p["o_proj"], "bthk,hkd->btd", adapters, "o_proj", scale)
  h = L.rms_norm(x, p["ffn_norm"], config.norm_eps)
  if not any(name in adapters for name in ("gate_proj", "up_proj", "down_proj")):
    return x + L.swiglu(h, p["gate_proj"], p["up_proj"], p["down_proj"]), (k, v)
  # `L.swiglu` with adapted projections: down(silu(h gate) * (h up)).
  gate = _project(h, p["gate_proj"], "btd,df->btf", adapters, "gate_proj", scale)
  up = _project(h, p["up_proj"], "btd,df->btf", adapters, "up_proj", scale)
  x = x + _project(jax.nn.silu(gate) * up, p["down_proj"], "btf,fd->btd", adapters, "down_proj",
                   scale)
  return x, (k, v)


class Transformer(nnx.Module):
  """Bidirectional transformer covering LLaDA-8B and Dream-7B (see module docstring)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    init = jax.nn.initializers.normal(c.initializer_range)
    self.embed = _param(init(rngs.params(), (c.vocab_size, c.d_model), c.weight_dtype), "vocab", "embed")
    self.blocks = Blocks(c, rngs=rngs)
    self.final_norm = _param(jnp.ones((c.d_model,), c.weight_dtype), "norm")
    self.lm_head = _param(init(rngs.params(), (c.d_model, c.vocab_size), c.weight_dtype), "embed", "vocab")
    if c.lora_rank:
      # Drawn after every base weight, so a seed gives the same base with or without LoRA.
      setattr(self.blocks, lora_lib.LORA_ATTR, lora_lib.LoRA(c, rngs=rngs))

  # -- positions and masks -------------------------------------------------------------------
  def default_positions(self, batch: int, length: int,
                        attention_mask: Optional[jax.Array]) -> jax.Array:
    """LLaDA: 0..T-1 regardless of padding. Dream: cumsum(mask) - 1 (clipped at 0)."""
    if self.config.positions_from_padding and attention_mask is not None:
      return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

  # -- forward -------------------------------------------------------------------------------
  def hidden_states(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
                    positions: Optional[jax.Array] = None, prefix_kv: Optional[KVCache] = None,
                    canvas_kv: Optional[KVCache] = None, window_start: Optional[jax.Array] = None,
                    return_kv: bool = False):
    """Final-normed hidden states [B, T, D] (compute dtype).

    Args:
      input_ids: [B, T] int token ids.
      attention_mask: optional [B, T] (1 = real token). Used as a key-padding mask when
        ``config.use_key_padding_mask`` and for Dream's padding-aware positions.
      positions: optional [B, T] RoPE positions (needed when running a suffix after a prefix cache).
      prefix_kv: optional `KVCache` of a prefix the inputs attend to (Fast-dLLM prefix cache).
      canvas_kv: optional `KVCache` of a whole canvas [.., S, ..] (Fast-dLLM dual cache); the
        inputs are its positions [window_start, window_start + T): every layer attends to the
        cached K/V with this window's entries replaced by the fresh ones, under the cache's key
        mask (``attention_mask`` then only matters for Dream positions, give ``positions``).
      window_start: int32 scalar, the inputs' offset in ``canvas_kv`` (required with it).
      return_kv: also return the `KVCache` of these input positions.
    """
    c = self.config
    if (canvas_kv is None) != (window_start is None):
      raise ValueError("canvas_kv and window_start go together")
    if canvas_kv is not None and prefix_kv is not None:
      raise ValueError("give at most one of prefix_kv and canvas_kv")
    chex.assert_rank(input_ids, 2)
    b, t = input_ids.shape
    if attention_mask is not None:
      chex.assert_shape(attention_mask, (b, t))
    if positions is None:
      positions = self.default_positions(b, t, attention_mask)
    chex.assert_shape(positions, (b, t))
    cos, sin = L.rope_cos_sin(positions, c.head_dim, c.rope_theta)

    key_mask = None
    if canvas_kv is not None:
      if c.use_key_padding_mask and canvas_kv.mask is not None:
        key_mask = canvas_kv.mask.astype(jnp.bool_)
    elif c.use_key_padding_mask and (attention_mask is not None or
                                   (prefix_kv is not None and prefix_kv.mask is not None)):
      own = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
      if prefix_kv is not None:
        pre = (jnp.ones(prefix_kv.k.shape[1:3], jnp.bool_) if prefix_kv.mask is None
               else prefix_kv.mask.astype(jnp.bool_))
        own = jnp.concatenate([pre, own], axis=1)
      key_mask = own

    # The lookup must take its layout from the (batch-split) ids, not from the table.
    table = sharding.gather_for_compute(self.embed[...], ("vocab", "embed"), c.compute_dtype,
                                        c.grad_reduce_dtype or None)
    x = sharding.constrain_batch(jnp.take(table, input_ids, axis=0))
    cos, sin = sharding.constrain_batch(cos), sharding.constrain_batch(sin)
    if key_mask is not None:
      key_mask = sharding.constrain_batch(key_mask)
    axes = self.blocks.layer_axes()

    def body(x, layer):
      params, cached = layer
      params = gather_layer(params, axes, c.compute_dtype, c.grad_reduce_dtype or None)
      x, kv = _block(c, sharding.constrain_batch(x), params, cos, sin, key_mask, cached,
                     window_start)
      return sharding.constrain_batch(x), kv

    if c.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    cache = prefix_kv if canvas_kv is None else canvas_kv
    cached = None if cache is None else (cache.k, cache.v)
    x, (ks, vs) = jax.lax.scan(body, x, (self.blocks.stacked(), cached))
    x = sharding.constrain_batch(
        L.rms_norm(x, self.final_norm[...].astype(c.compute_dtype), c.norm_eps))
    if return_kv:
      return x, KVCache(ks, vs, attention_mask)
    return x

  def align(self, hidden: jax.Array) -> jax.Array:
    """Moves hidden states so that position i predicts token i for both families.

    Dream (``shifted``) predicts token i from position i-1: aligned = cat(h[:, :1], h[:, :-1]),
    as Dream's own sampler does with its logits (`docs/llada.md` §9).
    """
    if self.config.logit_alignment == "shifted":
      return jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
    return hidden

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """[..., D] -> [..., V] fp32 logits (compute-dtype matmul, fp32 accumulation)."""
    head = self.head_for_compute()
    return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)

  def head_for_compute(self) -> jax.Array:
    """The output head [D, V] in the compute dtype, gathered to the compute layout."""
    c = self.config
    return sharding.gather_for_compute(self.lm_head[...], ("embed", "vocab"), c.compute_dtype,
                                       c.grad_reduce_dtype or None)

  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
               aligned: bool = True) -> jax.Array:
    """Full logits [B, T, V] in fp32. With ``aligned`` (default) position i predicts token i for
    both families; ``aligned=False`` gives the raw head output (Dream: i predicts i+1).
    Prefer `token_log_probs` for likelihoods: it never materialises the full logits."""
    hidden = self.hidden_states(input_ids, attention_mask)
    if aligned:
      hidden = self.align(hidden)
    return self.logits_from_hidden(hidden)

  def token_log_probs(self, input_ids: jax.Array, targets: jax.Array,
                      attention_mask: Optional[jax.Array] = None, *,
                      chunk_size: Optional[int] = None) -> jax.Array:
    """log p(targets[b, i] | input_ids[b]) at every position, fp32 [B, T].

    The prediction for position i is the aligned one (Dream's shift is applied here).
    """
    chex.assert_equal_shape([input_ids, targets])
    hidden = self.align(self.hidden_states(input_ids, attention_mask))
    c = self.config
    # The head in its storage layout: gathered one vocabulary tile at a time, once per call.
    return chunked_target_log_probs(hidden, self.lm_head[...], targets,
                                    chunk_size or c.logprob_chunk_size,
                                    max_vocab_tile=c.logprob_vocab_tile,
                                    reduce_dtype=c.grad_reduce_dtype or None)


def create_model(config: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model (weights ~ N(0, initializer_range²), norms 1, biases 0)."""
  return Transformer(config, rngs=nnx.Rngs(params=seed))


def split_model(model: Transformer) -> tuple[Any, Any]:
  """(graphdef, params state) for pure functions: `nnx.merge(graphdef, params)` inside jit."""
  return nnx.split(model)
