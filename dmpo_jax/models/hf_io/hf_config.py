"""config.json of a HF folder <-> `ModelConfig` (`docs/llada.md` §1 for LLaDA, §9 for Dream),
the special token ids of a checkpoint, and `HFCheckpointInfo` (what a load keeps for the save)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Optional

from dmpo_jax.models.config import ModelConfig, get_preset
from dmpo_jax.models.hf_io.safetensors_io import (
    CONFIG_FILE, CheckpointError, PathLike, _TORCH_DTYPE_TO_CODE, _read_json)
from dmpo_jax.models.hf_io.validate import _check_unsupported, _field


@dataclasses.dataclass(frozen=True)
class HFCheckpointInfo:
  """What `load_pretrained` read besides the weights; `save_pretrained` writes it back.

  Attributes:
    family: ``"llada"`` or ``"dream"``.
    hf_config: the raw ``config.json`` (all original keys, written back unchanged).
    tensor_dtype: safetensors dtype code of the stored tensors (``"BF16"``, ``"F32"``...).
    weight_map: tensor name -> shard file name for sharded checkpoints, None for a single file.
    source_path: the folder it was loaded from (tokenizer files are copied from here by default).
    model_config: the `ModelConfig` the weights were loaded into.
  """
  family: str
  hf_config: Mapping[str, Any]
  tensor_dtype: str
  weight_map: Optional[Mapping[str, str]]
  source_path: Optional[str]
  model_config: ModelConfig

  def to_json_dict(self) -> dict[str, Any]:
    """JSON-serialisable form (stored as metadata beside the project's own checkpoints)."""
    return {"family": self.family, "hf_config": dict(self.hf_config),
            "tensor_dtype": self.tensor_dtype,
            "weight_map": None if self.weight_map is None else dict(self.weight_map),
            "source_path": self.source_path,
            "model_config": dataclasses.asdict(self.model_config)}

  @classmethod
  def from_json_dict(cls, data: Mapping[str, Any]) -> "HFCheckpointInfo":
    missing = {"family", "hf_config", "tensor_dtype", "model_config"} - set(data)
    if missing:
      raise CheckpointError(f"HF checkpoint info is missing key(s) {sorted(missing)}")
    return cls(family=data["family"], hf_config=dict(data["hf_config"]),
               tensor_dtype=data["tensor_dtype"], weight_map=data.get("weight_map"),
               source_path=data.get("source_path"),
               model_config=ModelConfig(**data["model_config"]))


def read_hf_config(path: PathLike) -> dict[str, Any]:
  """The raw ``config.json`` of a HF folder."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise CheckpointError(f"HF checkpoint folder {folder} does not exist")
  config = _read_json(folder / CONFIG_FILE, "HF config")
  if not isinstance(config, dict):
    raise CheckpointError(f"{folder / CONFIG_FILE} must hold a JSON object")
  return config


def family_of(hf_config: Mapping[str, Any], source: str = CONFIG_FILE) -> str:
  """``model_type`` ``llada`` -> ``"llada"``; ``Dream``/``dream`` -> ``"dream"``."""
  model_type = hf_config.get("model_type")
  if model_type is None:
    raise CheckpointError(f"{source} has no 'model_type'; supported: 'llada', 'Dream'")
  if not isinstance(model_type, str):
    raise CheckpointError(f"{source}: model_type must be a string, got {model_type!r}")
  family = model_type.lower()
  if family not in ("llada", "dream"):
    raise CheckpointError(f"{source}: unknown model_type {model_type!r}; supported: 'llada', 'Dream'")
  return family



def _architecture_from_hf(hf_config: Mapping[str, Any], family: str) -> dict[str, Any]:
  """ModelConfig architecture fields from config.json (`docs/llada.md` §1 for LLaDA, §9 for Dream)."""
  if family == "llada":
    _check_unsupported(hf_config, {
        "block_type": ("llama",), "weight_tying": (False,), "include_bias": (False,),
        "alibi": (False,), "attention_layer_norm": (False,), "input_emb_norm": (False,),
        "scale_logits": (False,), "layer_norm_type": ("rms",), "activation_type": ("silu",),
        "rope": (True,), "layer_norm_with_affine": (True,), "bias_for_layer_norm": (False,)})
    d_model = _field(hf_config, "d_model", "int", minimum=1)
    n_heads = _field(hf_config, "n_heads", "int", minimum=1)
    if d_model % n_heads:
      raise CheckpointError(f"{CONFIG_FILE}: d_model={d_model} is not a multiple of n_heads={n_heads}")
    if _field(hf_config, "multi_query_attention", "bool", False):
      n_kv_heads = 1
    else:
      n_kv_heads = _field(hf_config, "n_kv_heads", "int", n_heads, minimum=1)
    mlp = _field(hf_config, "mlp_hidden_size", "int", None, minimum=1)
    if mlp is None:
      mlp = _field(hf_config, "mlp_ratio", "int", 4, minimum=1) * d_model
    vocab_key = "embedding_size" if hf_config.get("embedding_size") is not None else "vocab_size"
    return dict(
        family="llada", vocab_size=_field(hf_config, vocab_key, "int", minimum=1),
        d_model=d_model, n_layers=_field(hf_config, "n_layers", "int", minimum=1), n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=d_model // n_heads, mlp_hidden_size=mlp,
        rope_theta=_field(hf_config, "rope_theta", "float", 10000.0, minimum=0, exclusive=True),
        norm_eps=_field(hf_config, "rms_norm_eps", "float", 1e-5, minimum=0, exclusive=True),
        qkv_bias=_field(hf_config, "include_qkv_bias", "bool", False),
        logit_alignment="same_position", positions_from_padding=False,
        max_seq_len=_field(hf_config, "max_sequence_length", "int", 4096, minimum=1))
  _check_unsupported(hf_config, {"tie_word_embeddings": (False,), "hidden_act": ("silu",),
                                 "use_sliding_window": (False,)})
  if hf_config.get("rope_scaling") is not None:
    raise CheckpointError(f"{CONFIG_FILE}: rope_scaling={hf_config['rope_scaling']!r} is not supported")
  hidden = _field(hf_config, "hidden_size", "int", minimum=1)
  n_heads = _field(hf_config, "num_attention_heads", "int", minimum=1)
  head_dim = _field(hf_config, "head_dim", "int", None, minimum=1)
  if head_dim is None:
    if hidden % n_heads:
      raise CheckpointError(f"{CONFIG_FILE}: hidden_size={hidden} is not a multiple of "
                            f"num_attention_heads={n_heads} (and no head_dim is given)")
    head_dim = hidden // n_heads
  return dict(
      family="dream", vocab_size=_field(hf_config, "vocab_size", "int", minimum=1), d_model=hidden,
      n_layers=_field(hf_config, "num_hidden_layers", "int", minimum=1), n_heads=n_heads,
      n_kv_heads=_field(hf_config, "num_key_value_heads", "int", n_heads, minimum=1),
      head_dim=head_dim,
      mlp_hidden_size=_field(hf_config, "intermediate_size", "int", minimum=1),
      rope_theta=_field(hf_config, "rope_theta", "float", 10000.0, minimum=0, exclusive=True),
      norm_eps=_field(hf_config, "rms_norm_eps", "float", 1e-6, minimum=0, exclusive=True),
      qkv_bias=True, logit_alignment="shifted", positions_from_padding=True,
      max_seq_len=_field(hf_config, "max_position_embeddings", "int", 2048, minimum=1))


def model_config_from_hf(path: PathLike, hf_config: Optional[Mapping[str, Any]] = None,
                         **overrides) -> ModelConfig:
  """`ModelConfig` of a HF folder: architecture from config.json, special ids from config.json /
  tokenizer files (`resolve_special_token_ids`), then ``overrides``."""
  hf_config = read_hf_config(path) if hf_config is None else hf_config
  config_file = pathlib.Path(path) / CONFIG_FILE
  family = family_of(hf_config, str(config_file))
  try:
    fields = _architecture_from_hf(hf_config, family)
    fields.update(resolve_special_token_ids(path, family, hf_config, vocab_size=fields["vocab_size"]))
  except CheckpointError as e:
    message = str(e)
    if message.startswith(CONFIG_FILE):  # name the file with its folder
      raise CheckpointError(f"{config_file}{message[len(CONFIG_FILE):]}") from e
    raise
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise TypeError(f"Unknown ModelConfig override(s) {sorted(unknown)}")
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"{pathlib.Path(path) / CONFIG_FILE}: {e}") from e


# Special tokens: ModelConfig field -> token string per family (`docs/llada.md` §4, §9).
SPECIAL_TOKEN_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id", "bos_token_id")
SPECIAL_TOKEN_STRINGS: dict[str, dict[str, str]] = {
    "llada": {"mask_token_id": "<|mdm_mask|>", "eos_token_id": "<|endoftext|>",
              "pad_token_id": "<|endoftext|>", "eot_token_id": "<|eot_id|>",
              "bos_token_id": "<|startoftext|>"},
    "dream": {"mask_token_id": "<|mask|>", "eos_token_id": "<|endoftext|>",
              "pad_token_id": "<|endoftext|>", "eot_token_id": "<|im_end|>",
              "bos_token_id": "<|beginoftext|>"},
}
_FAMILY_PRESET = {"llada": "llada_8b", "dream": "dream_7b"}
_TOKENIZER_CONFIG_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                          "pad_token": "pad_token_id", "mask_token": "mask_token_id"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"


def resolve_special_token_ids(path: Optional[PathLike], family: str,
                              hf_config: Optional[Mapping[str, Any]] = None, *,
                              tokenizer: Any = None,
                              vocab_size: Optional[int] = None) -> dict[str, Optional[int]]:
  """Special ids of a checkpoint / tokenizer folder; later sources win:

  1. the family's preset (`get_preset('llada_8b' | 'dream_7b')`: LLaDA 126336 mask, 126081
     EOS = PAD, 126348 EOT, 126080 BOS; Dream 151666 mask, 151643 EOS = PAD, 151645 EOT);
  2. ``tokenizer.json``: the id of the family's token strings (``<|mdm_mask|>``, ``<|eot_id|>``...);
  3. ``tokenizer_config.json``: ``bos_token``/``eos_token``/``pad_token``/``mask_token`` strings;
  4. ``config.json``: ``mask_token_id``, ``eos_token_id``, ``pad_token_id``, ``bos_token_id``.

  ``tokenizer``: an already loaded `tokenizers.Tokenizer` (else read from ``path`` if present).
  With ``vocab_size``, optional ids (EOT, BOS) that only come from the preset and fall outside
  the vocabulary become None (tiny synthetic checkpoints).
  """
  preset = get_preset(_FAMILY_PRESET[family])
  ids: dict[str, Optional[int]] = {f: getattr(preset, f) for f in SPECIAL_TOKEN_FIELDS}
  from_preset = set(SPECIAL_TOKEN_FIELDS)
  folder = None if path is None else pathlib.Path(path)
  if tokenizer is None and folder is not None and (folder / TOKENIZER_FILE).is_file():
    import tokenizers
    try:
      tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as e:  # the Rust parser raises a plain Exception on any malformed file
      raise CheckpointError(f"{folder / TOKENIZER_FILE} cannot be parsed: {str(e)[:200]}") from e
  if tokenizer is not None:
    for field, token in SPECIAL_TOKEN_STRINGS[family].items():
      token_id = tokenizer.token_to_id(token)
      if token_id is not None:
        ids[field] = token_id
        from_preset.discard(field)
    if folder is not None and (folder / TOKENIZER_CONFIG_FILE).is_file():
      tokenizer_config = _read_json(folder / TOKENIZER_CONFIG_FILE, "Tokenizer config")
      if not isinstance(tokenizer_config, dict):
        raise CheckpointError(f"{folder / TOKENIZER_CONFIG_FILE} must hold a JSON object")
      for key, field in _TOKENIZER_CONFIG_KEYS.items():
        token = tokenizer_config.get(key)
        if isinstance(token, dict):
          token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
          ids[field] = tokenizer.token_to_id(token)
          from_preset.discard(field)
  if hf_config is None and folder is not None and (folder / CONFIG_FILE).is_file():
    hf_config = read_hf_config(folder)
  for field in SPECIAL_TOKEN_FIELDS:
    value = (hf_config or {}).get(field)
    if isinstance(value, list):  # HF allows a list of EOS ids; the first is the canonical one
      value = value[0] if value else None
    if value is not None:
      ids[field] = _field({field: value}, field, "int", minimum=0)
      from_preset.discard(field)
  if vocab_size is not None:
    for field in ("eot_token_id", "bos_token_id"):
      if field in from_preset and ids[field] is not None and ids[field] >= vocab_size:
        ids[field] = None
  return ids


_LLADA_CONFIG_TEMPLATE: dict[str, Any] = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "embedding_dropout": 0.0, "flash_attention": False, "include_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rope": True, "rope_full_precision": True, "scale_logits": False,
    "use_cache": False, "weight_tying": False,
}

_DREAM_CONFIG_TEMPLATE: dict[str, Any] = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "Dream", "rope_scaling": None,
    "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
    "use_sliding_window": False,
}


def hf_config_from_model_config(config: ModelConfig, tensor_dtype: str) -> dict[str, Any]:
  """A config.json for a model that was not loaded from HF (e.g. trained from scratch)."""
  torch_dtype = {v: k for k, v in _TORCH_DTYPE_TO_CODE.items()}[tensor_dtype]
  if config.family == "llada":
    if config.head_dim * config.n_heads != config.d_model:
      raise CheckpointError(f"LLaDA's config.json cannot express head_dim={config.head_dim} with "
                            f"d_model={config.d_model}, n_heads={config.n_heads}")
    out = dict(_LLADA_CONFIG_TEMPLATE)
    out.update(d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
               n_kv_heads=config.n_kv_heads, mlp_hidden_size=config.mlp_hidden_size,
               vocab_size=config.vocab_size, embedding_size=config.vocab_size,
               rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
               include_qkv_bias=config.qkv_bias, max_sequence_length=config.max_seq_len,
               mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_id,
               pad_token_id=config.pad_token_id, torch_dtype=torch_dtype)
    for field in ("bos_token_id", "eot_token_id"):  # not in LLaDA's config; read back on load
      if getattr(config, field) is not None:
        out[field] = getattr(config, field)
    return out
  if not config.qkv_bias:
    raise CheckpointError("Dream/Qwen2 checkpoints always have q/k/v biases; config.qkv_bias is False")
  out = dict(_DREAM_CONFIG_TEMPLATE)
  out.update(hidden_size=config.d_model, num_hidden_layers=config.n_layers,
             num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
             intermediate_size=config.mlp_hidden_size, vocab_size=config.vocab_size,
             rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
             max_position_embeddings=config.max_seq_len, max_window_layers=config.n_layers,
             mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_id,
             pad_token_id=config.pad_token_id, torch_dtype=torch_dtype)
  if config.head_dim * config.n_heads != config.d_model:
    out["head_dim"] = config.head_dim
  for field in ("bos_token_id", "eot_token_id"):
    if getattr(config, field) is not None:
      out[field] = getattr(config, field)
  return out
