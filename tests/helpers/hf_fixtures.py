"""Tiny synthetic Hugging Face checkpoints and tokenizers for tests (`docs/llada.md` §10.1-10.2).

Everything here is written with the reference libraries (`safetensors.numpy.save_file`,
`tokenizers`), independently of `dmpo_jax.models.hf_io`, so tests can compare the project's reader
and writer against them.

* LLaDA: the exact tensor names of `docs/llada.md` §3 (``model.transformer.*``), bf16
  (`ml_dtypes.bfloat16`), by default 2 layers, d_model 32, 4 heads, MLP 64, vocab 128, split over
  2 shards with layer 1 split across them, plus ``model.safetensors.index.json``.
* Dream: Qwen2 names (``model.layers.{i}.self_attn.q_proj.{weight,bias}``...), GQA (4 query / 2
  key-value heads), q/k/v biases, untied ``lm_head``.
* Tokenizers: a tiny byte-level BPE trained on a few strings, either with its specials at ids
  0..5 or rebuilt with LLaDA's / Dream's real special ids.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np
import safetensors.numpy
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

BF16 = ml_dtypes.bfloat16

LLADA_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|mdm_mask|>")
# LLaDA-8B-Instruct's ids (`docs/llada.md` §4).
LLADA_REAL_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
                  "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
LLADA_VOCAB_SIZE = 126464
DREAM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
# Dream-v0-Instruct-7B's ids (`docs/llada.md` §9; <|im_start|> = <|im_end|> - 1 as in Qwen2.5).
DREAM_REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<|mask|>": 151666}
DREAM_VOCAB_SIZE = 152064

TRAINING_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Solve the equation: 12 + 30 = 42. The answer is 42.",
    "def add(a, b):\n    return a + b\n",
    "<reasoning>\nFirst, compute the sum.\n</reasoning>\n<answer>\n42\n</answer>",
    "Héllo wörld, ünïcode ✓ — 数学",
)


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

def train_tiny_bpe(special_tokens: Sequence[str] = LLADA_SPECIAL_TOKENS,
                   vocab_size: int = 320) -> tokenizers.Tokenizer:
  """Byte-level BPE trained on `TRAINING_TEXTS`; the specials get ids 0..len-1."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(list(TRAINING_TEXTS) * 4, trainer)
  return tokenizer


def with_special_ids(tokenizer: tokenizers.Tokenizer,
                     special_ids: Mapping[str, int]) -> tokenizers.Tokenizer:
  """The same BPE with its special tokens moved to ``special_ids`` (other ids renumbered
  0..n-1 in their old order): non-contiguous ids as in the real checkpoints."""
  data = json.loads(tokenizer.to_str())
  vocab = {t: i for t, i in data["model"]["vocab"].items() if t not in special_ids}
  new_vocab = {t: k for k, t in enumerate(sorted(vocab, key=vocab.get))}
  new_vocab.update(special_ids)
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
  rebuilt = tokenizers.Tokenizer(models.BPE(vocab=new_vocab, merges=merges))
  rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  rebuilt.decoder = decoders.ByteLevel()
  rebuilt.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_ids])
  return rebuilt


def write_tokenizer(folder: pathlib.Path, tokenizer: tokenizers.Tokenizer,
                    tokenizer_config: Optional[Mapping[str, Any]] = None) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(folder / "tokenizer.json"))
  if tokenizer_config is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def llada_real_ids_tokenizer() -> tokenizers.Tokenizer:
  return with_special_ids(train_tiny_bpe(LLADA_SPECIAL_TOKENS), LLADA_REAL_IDS)


def dream_real_ids_tokenizer() -> tokenizers.Tokenizer:
  return with_special_ids(train_tiny_bpe(DREAM_SPECIAL_TOKENS), DREAM_REAL_IDS)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def llada_config(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, mlp: int = 64,
                 vocab: int = 128, **extra) -> dict[str, Any]:
  """LLaDA-8B-Instruct's config.json keys (`docs/llada.md` §1) at tiny sizes."""
  config = {
      "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
      "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
      "attention_layer_norm_with_affine": True,
      "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                   "AutoModel": "modeling_llada.LLaDAModelLM",
                   "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
      "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
      "d_model": d_model, "embedding_dropout": 0.0, "embedding_size": vocab, "flash_attention": False,
      "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
      "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
      "layer_norm_type": "rms", "layer_norm_with_affine": True, "max_sequence_length": 4096,
      "mlp_hidden_size": mlp, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
      "n_heads": n_heads, "n_kv_heads": n_heads, "n_layers": n_layers, "precision": "amp_bf16",
      "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
      "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "bfloat16",
      "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab,
      "weight_tying": False,
  }
  config.update(extra)
  return config


def dream_config(*, n_layers: int = 2, hidden: int = 32, n_heads: int = 4, n_kv_heads: int = 2,
                 intermediate: int = 64, vocab: int = 160, **extra) -> dict[str, Any]:
  """Dream-v0-Instruct-7B's config.json keys (Qwen2 layout, `docs/llada.md` §9) at tiny sizes."""
  config = {
      "architectures": ["DreamModel"], "attention_dropout": 0.0,
      "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                   "AutoModel": "modeling_dream.DreamModel"},
      "bos_token_id": vocab - 4, "eos_token_id": vocab - 4, "hidden_act": "silu",
      "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
      "mask_token_id": vocab - 1, "max_position_embeddings": 2048, "max_window_layers": n_layers,
      "model_type": "Dream", "num_attention_heads": n_heads, "num_hidden_layers": n_layers,
      "num_key_value_heads": n_kv_heads, "pad_token_id": vocab - 4, "rms_norm_eps": 1e-06,
      "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
      "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
      "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
  }
  config.update(extra)
  return config


# ------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------

def _weights(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
  return (rng.standard_normal(shape) * scale).astype(BF16)


def _norm(rng: np.random.Generator, dim: int) -> np.ndarray:
  return (1.0 + 0.2 * rng.standard_normal(dim)).astype(BF16)


def llada_tensors(config: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """Random bf16 tensors with LLaDA's names and torch [out, in] shapes (`docs/llada.md` §3)."""
  rng = np.random.default_rng(seed)
  d, f, v = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
  s = d ** -0.5
  out = {"model.transformer.wte.weight": _weights(rng, (v, d), 1.0)}
  for i in range(config["n_layers"]):
    p = f"model.transformer.blocks.{i}."
    out[p + "attn_norm.weight"] = _norm(rng, d)
    for name in ("q_proj", "k_proj", "v_proj"):
      out[p + name + ".weight"] = _weights(rng, (d, d), 2 * s)
    out[p + "attn_out.weight"] = _weights(rng, (d, d), s)
    out[p + "ff_norm.weight"] = _norm(rng, d)
    out[p + "ff_proj.weight"] = _weights(rng, (f, d), s)
    out[p + "up_proj.weight"] = _weights(rng, (f, d), s)
    out[p + "ff_out.weight"] = _weights(rng, (d, f), f ** -0.5)
  out["model.transformer.ln_f.weight"] = _norm(rng, d)
  out["model.transformer.ff_out.weight"] = _weights(rng, (v, d), s)
  return out


def dream_tensors(config: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """Random bf16 tensors with Qwen2 / Dream names and shapes, q/k/v biases, GQA."""
  rng = np.random.default_rng(seed)
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  h, kvh = config["num_attention_heads"], config["num_key_value_heads"]
  hd = d // h
  s = d ** -0.5
  out = {"model.embed_tokens.weight": _weights(rng, (v, d), 1.0)}
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out[p + "input_layernorm.weight"] = _norm(rng, d)
    for name, heads in (("q_proj", h), ("k_proj", kvh), ("v_proj", kvh)):
      out[p + f"self_attn.{name}.weight"] = _weights(rng, (heads * hd, d), 2 * s)
      out[p + f"self_attn.{name}.bias"] = _weights(rng, (heads * hd,), 0.5)
    out[p + "self_attn.o_proj.weight"] = _weights(rng, (d, h * hd), s)
    out[p + "post_attention_layernorm.weight"] = _norm(rng, d)
    out[p + "mlp.gate_proj.weight"] = _weights(rng, (f, d), s)
    out[p + "mlp.up_proj.weight"] = _weights(rng, (f, d), s)
    out[p + "mlp.down_proj.weight"] = _weights(rng, (d, f), f ** -0.5)
  out["model.norm.weight"] = _norm(rng, d)
  out["lm_head.weight"] = _weights(rng, (v, d), s)
  return out


def write_weights(folder: pathlib.Path, tensors: Mapping[str, np.ndarray],
                  boundaries: Sequence[int] = ()) -> Optional[dict[str, str]]:
  """Writes ``tensors`` (in their order) with the reference safetensors writer: one
  ``model.safetensors`` when ``boundaries`` is empty, else shards split before the given tensor
  indices plus ``model.safetensors.index.json``. Returns the weight map (None for one file)."""
  folder.mkdir(parents=True, exist_ok=True)
  names = list(tensors)
  if not boundaries:
    safetensors.numpy.save_file(dict(tensors), str(folder / "model.safetensors"),
                                metadata={"format": "pt"})
    return None
  cuts = [0, *boundaries, len(names)]
  n = len(cuts) - 1
  weight_map = {}
  for k in range(n):
    file_name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    part = {name: tensors[name] for name in names[cuts[k]:cuts[k + 1]]}
    safetensors.numpy.save_file(part, str(folder / file_name), metadata={"format": "pt"})
    weight_map.update({name: file_name for name in part})
  total = sum(t.nbytes for t in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return weight_map


def write_config(folder: pathlib.Path, config: Mapping[str, Any]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_llada_checkpoint(folder: pathlib.Path, *, sharded: bool = True, tokenizer: Optional[str] = None,
                          seed: int = 0, **config_fields) -> dict[str, np.ndarray]:
  """A tiny LLaDA HF folder; returns its tensors.

  ``tokenizer``: None (no tokenizer; config.json holds mask/eos/pad ids inside the small vocab),
  ``"bpe"`` (trained BPE with specials at 0..5, vocab 320, no special ids in config.json: they
  must come from the tokenizer) or ``"real_ids"`` (LLaDA's real special ids, vocab 126464,
  d_model 16, ids in config.json as in the official checkpoint).
  With ``sharded``: 2 shards, split in the middle of layer 1 (layer-stacked parameters then
  come from both files).
  """
  if tokenizer is None:
    defaults = dict(vocab=128, mask_token_id=127, eos_token_id=126, pad_token_id=126)
  elif tokenizer == "bpe":
    defaults = dict(vocab=320)
  elif tokenizer == "real_ids":
    defaults = dict(vocab=LLADA_VOCAB_SIZE, d_model=16, mlp=32, mask_token_id=126336,
                    eos_token_id=126081, pad_token_id=126081)
  else:
    raise ValueError(f"unknown tokenizer option {tokenizer!r}")
  config = llada_config(**{**defaults, **config_fields})
  tensors = llada_tensors(config, seed)
  per_layer = 9
  write_weights(folder, tensors, [1 + per_layer + per_layer // 2] if sharded else [])
  write_config(folder, config)
  if tokenizer == "bpe":
    write_tokenizer(folder, train_tiny_bpe(LLADA_SPECIAL_TOKENS))
  elif tokenizer == "real_ids":
    write_tokenizer(folder, llada_real_ids_tokenizer(), {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
  return tensors


def make_dream_checkpoint(folder: pathlib.Path, *, sharded: bool = False, tokenizer: Optional[str] = None,
                          seed: int = 1, **config_fields) -> dict[str, np.ndarray]:
  """A tiny Dream HF folder (GQA 4/2 heads, q/k/v biases); returns its tensors.

  ``tokenizer``: None or ``"real_ids"`` (Dream's special ids, vocab 152064, hidden 16).
  """
  if tokenizer == "real_ids":
    defaults = dict(vocab=DREAM_VOCAB_SIZE, hidden=16, intermediate=32, mask_token_id=151666,
                    eos_token_id=151643, pad_token_id=151643, bos_token_id=151643)
  elif tokenizer is None:
    defaults = {}
  else:
    raise ValueError(f"unknown tokenizer option {tokenizer!r}")
  config = dream_config(**{**defaults, **config_fields})
  tensors = dream_tensors(config, seed)
  write_weights(folder, tensors, [1 + 12 + 6] if sharded else [])
  write_config(folder, config)
  if tokenizer == "real_ids":
    write_tokenizer(folder, dream_real_ids_tokenizer())
  return tensors


def read_all_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a HF folder through the reference reader (`safetensors.safe_open`)."""
  from safetensors import safe_open
  out = {}
  for file in sorted(folder.glob("*.safetensors")):
    with safe_open(str(file), framework="flax") as f:
      for name in f.keys():
        out[name] = np.asarray(f.get_tensor(name))
  return out
