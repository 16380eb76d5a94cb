"""HF tensor names and layouts <-> the stacked parameters of `Transformer` (`docs/llada.md` §3, §9).

Name and layout mapping (``n`` layers, ``H`` query heads, ``Hkv`` key/value heads, ``hd`` head dim;
torch ``nn.Linear`` stores ``[out, in]``):

================================  =========================  ==================================
LLaDA (``model.transformer.``)    Dream / Qwen2              Flax target (stacked over layers)
================================  =========================  ==================================
``wte.weight`` [V, D]             ``model.embed_tokens``     ``embed`` [V, D]
``blocks.i.attn_norm``            ``layers.i.input_layernorm``  ``blocks.attn_norm`` [n, D]
``blocks.i.q_proj`` [H·hd, D]     ``self_attn.q_proj``       ``blocks.q_proj`` [n, D, H, hd]
``blocks.i.k_proj/v_proj``        ``self_attn.k/v_proj``     ``blocks.k/v_proj`` [n, D, Hkv, hd]
(``q/k/v_proj.bias`` if any)      ``self_attn.q/k/v_proj.bias``  ``blocks.q/k/v_bias`` [n, H, hd]
``blocks.i.attn_out`` [D, H·hd]   ``self_attn.o_proj``       ``blocks.o_proj`` [n, H, hd, D]
``blocks.i.ff_norm``              ``post_attention_layernorm``  ``blocks.ffn_norm`` [n, D]
``blocks.i.ff_proj`` [F, D]       ``mlp.gate_proj``          ``blocks.gate_proj`` [n, D, F]
``blocks.i.up_proj`` [F, D]       ``mlp.up_proj``            ``blocks.up_proj`` [n, D, F]
``blocks.i.ff_out`` [D, F]        ``mlp.down_proj``          ``blocks.down_proj`` [n, F, D]
``ln_f.weight`` [D]               ``model.norm``             ``final_norm`` [D]
``ff_out.weight`` [V, D]          ``lm_head``                ``lm_head`` [D, V]
================================  =========================  ==================================

q/k/v output features are head-major (feature = head·hd + d, `docs/llada.md` §2), so the Flax kernel
is ``W.reshape(H, hd, D).transpose(2, 0, 1)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dmpo_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor and where it lives in the Flax state.

  ``kind`` selects the layout change (torch ``[out, in]`` on the left, Flax on the right):
    ``copy``        same layout (embedding, norms)
    ``transpose``   [out, in] -> [in, out] (MLP kernels, LM head)
    ``qkv``         [Hx·hd, D] -> [D, Hx, hd]   (reshape(Hx, hd, D).transpose(2, 0, 1))
    ``out``         [D, H·hd] -> [H, hd, D]     (reshape(D, H, hd).transpose(1, 2, 0))
    ``bias``        [Hx·hd] -> [Hx, hd]
  """
  hf_name: str
  param: tuple[str, ...]
  layer: Optional[int]
  kind: str
  hf_shape: tuple[int, ...]
  heads: int = 0

  @property
  def head_dim(self) -> int:
    """``hd`` of a ``qkv`` / ``out`` / ``bias`` tensor."""
    return self.hf_shape[1 if self.kind == "out" else 0] // self.heads

  @property
  def flax_shape(self) -> tuple[int, ...]:
    """Shape of one layer in the Flax layout."""
    if self.kind == "transpose":
      return self.hf_shape[::-1]
    if self.kind == "qkv":
      return (self.hf_shape[1], self.heads, self.head_dim)
    if self.kind == "out":
      return (self.heads, self.head_dim, self.hf_shape[0])
    if self.kind == "bias":
      return (self.heads, self.head_dim)
    return self.hf_shape

  def to_flax(self, tensor: np.ndarray) -> np.ndarray:
    """HF layout -> Flax layout of one layer, or of whole heads of it (rows of q/k/v, columns of
    the output projection, as `hf_slice` reads them); a view of ``tensor``."""
    if self.kind == "copy":
      return tensor
    if self.kind == "transpose":
      return tensor.T
    if self.kind == "qkv":
      return tensor.reshape(-1, self.head_dim, tensor.shape[1]).transpose(2, 0, 1)
    if self.kind == "out":
      return tensor.reshape(tensor.shape[0], -1, self.head_dim).transpose(1, 2, 0)
    if self.kind == "bias":
      return tensor.reshape(-1, self.head_dim)
    raise AssertionError(self.kind)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax` (whole tensors)."""
    if self.kind == "copy":
      return param
    if self.kind == "transpose":
      return param.T
    if self.kind == "qkv":
      return param.transpose(1, 2, 0).reshape(self.hf_shape)
    if self.kind == "out":
      return param.transpose(2, 0, 1).reshape(self.hf_shape)
    if self.kind == "bias":
      return param.reshape(self.hf_shape)
    raise AssertionError(self.kind)

  def hf_slice(self, index: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """For the block ``index`` of one layer in the Flax layout: ``(read, cut)`` such that
    ``to_flax(hf_tensor[read])[cut] == to_flax(hf_tensor)[index]``. ``read`` covers whole heads
    (the sharding rules never split ``head_dim``; a split one is cut from the heads read)."""
    bounds = []
    for axis, size in zip(index, self.flax_shape):
      start, stop, step = axis.indices(size)
      if step != 1:
        raise ValueError(f"{self.hf_name}: strided slice {axis} is not a device shard")
      bounds.append((start, stop))
    every = slice(None)
    if self.kind == "copy":
      return tuple(slice(*b) for b in bounds), (every,) * len(bounds)
    if self.kind == "transpose":
      (in0, in1), (out0, out1) = bounds
      return (slice(out0, out1), slice(in0, in1)), (every, every)
    hd = self.head_dim
    if self.kind == "qkv":
      (d0, d1), (h0, h1), (k0, k1) = bounds
      return (slice(h0 * hd, h1 * hd), slice(d0, d1)), (every, every, slice(k0, k1))
    if self.kind == "out":
      (h0, h1), (k0, k1), (d0, d1) = bounds
      return (slice(d0, d1), slice(h0 * hd, h1 * hd)), (every, slice(k0, k1), every)
    if self.kind == "bias":
      (h0, h1), (k0, k1) = bounds
      return (slice(h0 * hd, h1 * hd),), (every, slice(k0, k1))
    raise AssertionError(self.kind)


# HF tensor names per family (`docs/llada.md` §3 for LLaDA, §9 for Dream / Qwen2); per-layer names
# are relative to ``layer`` formatted with the layer index.
_HF_NAMES: dict[str, dict[str, str]] = {
    "llada": dict(
        embed="model.transformer.wte.weight", final_norm="model.transformer.ln_f.weight",
        lm_head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{i}.",
        attn_norm="attn_norm.weight", q="q_proj", k="k_proj", v="v_proj", o="attn_out.weight",
        ffn_norm="ff_norm.weight", gate="ff_proj.weight", up="up_proj.weight",
        down="ff_out.weight"),
    "dream": dict(
        embed="model.embed_tokens.weight", final_norm="model.norm.weight",
        lm_head="lm_head.weight", layer="model.layers.{i}.", attn_norm="input_layernorm.weight",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        o="self_attn.o_proj.weight", ffn_norm="post_attention_layernorm.weight",
        gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight"),
}


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
  """Every HF tensor of a checkpoint of this config, in state-dict order."""
  c = config
  d, f, v, hd = c.d_model, c.mlp_hidden_size, c.vocab_size, c.head_dim
  q_out, kv_out = c.n_heads * hd, c.n_kv_heads * hd
  names = _HF_NAMES[c.family]
  layer_fmt = names["layer"]
  specs = [TensorSpec(names["embed"], ("embed",), None, "copy", (v, d))]
  for i in range(c.n_layers):
    p = layer_fmt.format(i=i)
    specs.append(TensorSpec(p + names["attn_norm"], ("blocks", "attn_norm"), i, "copy", (d,)))
    for key, param, heads, out in (("q", "q_proj", c.n_heads, q_out), ("k", "k_proj", c.n_kv_heads, kv_out),
                                   ("v", "v_proj", c.n_kv_heads, kv_out)):
      specs.append(TensorSpec(p + names[key] + ".weight", ("blocks", param), i, "qkv", (out, d), heads))
      if c.qkv_bias:
        specs.append(TensorSpec(p + names[key] + ".bias", ("blocks", f"{key}_bias"), i, "bias",
                                (out,), heads))
    specs.append(TensorSpec(p + names["o"], ("blocks", "o_proj"), i, "out", (d, q_out), c.n_heads))
    specs.append(TensorSpec(p + names["ffn_norm"], ("blocks", "ffn_norm"), i, "copy", (d,)))
    specs.append(TensorSpec(p + names["gate"], ("blocks", "gate_proj"), i, "transpose", (f, d)))
    specs.append(TensorSpec(p + names["up"], ("blocks", "up_proj"), i, "transpose", (f, d)))
    specs.append(TensorSpec(p + names["down"], ("blocks", "down_proj"), i, "transpose", (d, f)))
  specs.append(TensorSpec(names["final_norm"], ("final_norm",), None, "copy", (d,)))
  specs.append(TensorSpec(names["lm_head"], ("lm_head",), None, "transpose", (v, d)))
  return specs


