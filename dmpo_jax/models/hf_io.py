"""Hugging Face checkpoint I/O for LLaDA and Dream (`docs/llada.md` §1, §3, §9).

A HF folder holds ``config.json``, the weights as ``model.safetensors`` or as shards
``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (``weight_map``),
and optionally the tokenizer files. `load_pretrained` maps the per-layer PyTorch tensors onto the
stacked parameters of `Transformer`; `save_pretrained` writes them back under the same names,
shapes and dtype so that PyTorch / HF code can load the result.

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

Safetensors are parsed here (8-byte little-endian header length, JSON header, raw little-endian
bytes) and read through `np.memmap` with `ml_dtypes.bfloat16`: every device's slice is cut from
the memory-mapped file (`jax.make_array_from_callback`), so only the bytes a device needs are
read and the host never holds the whole model; and the writer emits byte-identical tensors
without going through torch or a framework conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shutil
import struct
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from dmpo_jax.models.config import ModelConfig
from dmpo_jax.models.transformer import Transformer

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Copied by `save_pretrained` from ``tokenizer_files_from`` (plus ``*.py`` remote-code files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # HF's default "5GB"
# Sub-folder of a project model checkpoint (`launch/convert.py`) holding the HF config.json and
# tokenizer / remote-code files of the checkpoint it was converted from.
HF_FILES_DIR = "hf_files"

# safetensors dtype code <-> numpy dtype.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_TORCH_DTYPE_TO_CODE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_CODE_TO_PARAM_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}
_MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
  """A checkpoint (HF folder or the project's format) is missing, malformed, damaged or does
  not match the model; the message names the file."""


# ------------------------------------------------------------------------------------------------
# Checkpoint description
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Safetensors format
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors file: absolute byte range ``[begin, end)`` in ``file``."""
  name: str
  file: pathlib.Path
  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def read_safetensors_header(file: PathLike) -> dict[str, TensorEntry]:
  """Parses a safetensors header: u64 little-endian N, N bytes of JSON
  ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``; offsets are
  relative to the first byte after the header."""
  file = pathlib.Path(file)
  if not file.is_file():
    raise CheckpointError(f"Weights file {file} not found")
  size = file.stat().st_size
  with open(file, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CheckpointError(f"{file} is not a safetensors file (only {len(prefix)} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
      raise CheckpointError(f"{file} is not a safetensors file (header length {header_len} "
                            f"for a file of {size} bytes)")
    try:
      header = json.loads(f.read(header_len))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
      raise CheckpointError(f"{file}: safetensors header is not valid JSON: "
                            f"{type(e).__name__}: {str(e)[:200]}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: safetensors header must be a JSON object, got {type(header).__name__}")
  data_start = 8 + header_len
  entries = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
      if not all(_is_int(v) and v >= 0 for v in (*shape, begin, end)) or not isinstance(dtype, str):
        raise TypeError("shape and data_offsets must be non-negative integers, dtype a string")
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}: {str(meta)[:200]}") from e
    if dtype not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}; supported: "
                            f"{sorted(SAFETENSORS_DTYPES)}")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != expected or begin < 0 or data_start + end > size:
      raise CheckpointError(f"{file}: tensor {name!r} ({dtype}, shape {shape}) has byte range "
                            f"[{begin}, {end}) inconsistent with its size {expected} or the file size")
    entries[name] = TensorEntry(name, file, dtype, shape, data_start + begin, data_start + end)
  return entries


class SafetensorsFiles:
  """Memory-mapped, lazily opened safetensors files; `view` returns a zero-copy array."""

  def __init__(self):
    self._maps: dict[pathlib.Path, np.memmap] = {}

  def view(self, entry: TensorEntry) -> np.ndarray:
    if entry.file not in self._maps:
      self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
    raw = self._maps[entry.file][entry.begin:entry.end]
    return raw.view(SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)


def _header_bytes(tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
  """JSON header (padded with spaces to a multiple of 8, as the reference writer does) and the
  byte size of each tensor, in order."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset, sizes = 0, []
  for name, dtype, shape in tensors:
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
    sizes.append(nbytes)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text, sizes


def write_safetensors(file: PathLike, tensors: Sequence[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[int], np.ndarray]) -> None:
  """Streams tensors into a safetensors file; ``produce(i)`` returns tensor i (any layout, cast to
  its declared dtype here), so only one tensor is in host memory at a time."""
  header, sizes = _header_bytes(tensors)
  with open(file, "wb") as f:
    f.write(header)
    for i, (name, dtype, shape) in enumerate(tensors):
      array = np.ascontiguousarray(np.asarray(produce(i)).astype(SAFETENSORS_DTYPES[dtype], copy=False))
      if array.shape != tuple(shape):
        raise CheckpointError(f"tensor {name!r}: produced shape {array.shape}, declared {tuple(shape)}")
      f.write(array.reshape(-1).view(np.uint8).data)


# ------------------------------------------------------------------------------------------------
# Reading the folder: config and tensor index
# ------------------------------------------------------------------------------------------------

def _read_json(file: pathlib.Path, what: str) -> Any:
  if not file.is_file():
    raise CheckpointError(f"{what} {file} not found")
  try:
    return json.loads(file.read_text(encoding="utf-8"))
  except (OSError, ValueError, RecursionError) as e:  # + UnicodeDecodeError, deep nesting
    raise CheckpointError(f"{file} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _weights_roots(folder: pathlib.Path) -> list[pathlib.Path]:
  """Where a HF folder's weight files may live (after resolving links): the folder itself, and
  for a Hugging Face hub cache snapshot (``.../snapshots/<rev>``, whose files link to
  ``../../blobs/<sha>``) that repository's ``blobs`` folder."""
  folder = folder.absolute()
  roots = [folder.resolve()]
  if folder.parent.name == "snapshots":
    roots.append((folder.parent.parent / "blobs").resolve())
  return roots


def _weights_file(folder: pathlib.Path, name: Any, source: pathlib.Path) -> pathlib.Path:
  """``folder / name`` for a weight file named in ``source``; a name that is not a plain relative
  path inside the folder (absolute, ``..``, a link pointing outside) is a `CheckpointError`."""
  if not isinstance(name, str) or not name or "\x00" in name:
    raise CheckpointError(f"{source}: shard path {name!r} is not a file name")
  relative = pathlib.PurePosixPath(name)
  if relative.is_absolute() or ".." in relative.parts or "\\" in name:
    raise CheckpointError(f"{source}: shard path {name!r} must be a relative path inside {folder}")
  file = folder / relative
  resolved = file.resolve()
  roots = _weights_roots(folder)
  if not any(resolved == root or root in resolved.parents for root in roots):
    raise CheckpointError(f"{source}: shard {name!r} resolves to {resolved}, outside {folder} "
                          "(links out of the checkpoint folder are not followed)")
  return file


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


def read_tensor_index(path: PathLike) -> tuple[dict[str, TensorEntry], Optional[dict[str, str]]]:
  """All tensors of a HF folder (single file or index + shards) and the index's weight map."""
  folder = pathlib.Path(path)
  index_file = folder / INDEX_FILE
  if index_file.is_file():
    index = _read_json(index_file, "Weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_file} has no 'weight_map' object")
    entries: dict[str, TensorEntry] = {}
    bad_names = sorted(repr(n) for n, v in weight_map.items() if not isinstance(v, str))
    if bad_names:
      raise CheckpointError(f"{index_file}: weight_map values must be shard file names; "
                            f"tensor(s) {', '.join(bad_names[:3])} map to something else")
    for shard in sorted(set(weight_map.values())):
      shard_file = _weights_file(folder, shard, index_file)
      if not shard_file.is_file():
        users = sorted(n for n, s in weight_map.items() if s == shard)
        raise CheckpointError(f"{index_file} maps {len(users)} tensor(s) (e.g. {users[0]!r}) to "
                              f"shard {shard!r}, but {shard_file} does not exist")
      for name, entry in read_safetensors_header(shard_file).items():
        if name not in weight_map:
          raise CheckpointError(f"{shard_file} holds tensor {name!r}, which {index_file} does not list")
        if weight_map[name] != shard:
          raise CheckpointError(f"{shard_file} holds tensor {name!r}, which {index_file} maps to "
                                f"{weight_map[name]!r}")
        entries[name] = entry
    missing = sorted(set(weight_map) - set(entries))
    if missing:
      raise CheckpointError(f"{index_file} lists tensor {missing[0]!r} in shard "
                            f"{weight_map[missing[0]]!r}, but that shard does not contain it")
    return entries, dict(weight_map)
  single = folder / SINGLE_WEIGHTS_FILE
  if not single.is_file():
    raise CheckpointError(f"No weights in {folder}: neither {SINGLE_WEIGHTS_FILE} nor {INDEX_FILE} found")
  return read_safetensors_header(_weights_file(folder, SINGLE_WEIGHTS_FILE, folder)), None


# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ------------------------------------------------------------------------------------------------

_REQUIRED = object()


def _field(hf_config: Mapping[str, Any], key: str, kind: str, default: Any = _REQUIRED, *,
           minimum: Optional[float] = None, exclusive: bool = False) -> Any:
  """``config.json[key]`` checked for type (``"int"``: an integer, not a bool; ``"float"``: a
  finite number; ``"bool"``) and range (>= ``minimum``, or > with ``exclusive``); a missing or
  null key gives ``default``. Raises `CheckpointError` naming the key, expected and got."""
  value = hf_config.get(key)
  if value is None:
    if default is _REQUIRED:
      raise CheckpointError(f"{CONFIG_FILE} is missing required key {key!r}")
    return default
  if kind == "int":
    ok = _is_int(value) or (isinstance(value, float) and value.is_integer())
    value = int(value) if ok else value
  elif kind == "float":
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    value = float(value) if ok else value
  else:
    ok = isinstance(value, bool)
  if not ok:
    expected = {"int": "an integer", "float": "a finite number", "bool": "true or false"}[kind]
    raise CheckpointError(f"{CONFIG_FILE}: {key} must be {expected}, got {value!r} "
                          f"({type(value).__name__})")
  if minimum is not None and (value <= minimum if exclusive else value < minimum):
    raise CheckpointError(f"{CONFIG_FILE}: {key} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
  return value


def _check_unsupported(hf_config: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  for key, allowed in expected.items():
    if key in hf_config and hf_config[key] is not None and hf_config[key] not in allowed:
      raise CheckpointError(f"{CONFIG_FILE}: unsupported {key}={hf_config[key]!r} (supported: "
                            f"{list(allowed)})")


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
  from dmpo_jax.models.config import get_preset
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


# ------------------------------------------------------------------------------------------------
# Tensor name mapping
# ------------------------------------------------------------------------------------------------

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

  def to_flax(self, tensor: np.ndarray) -> np.ndarray:
    """HF layout -> Flax layout of one layer; a view when ``tensor`` is (memory-mapped) contiguous."""
    if self.kind == "copy":
      return tensor
    if self.kind == "transpose":
      return tensor.T
    if self.kind == "qkv":
      out, d = tensor.shape
      return tensor.reshape(self.heads, out // self.heads, d).transpose(2, 0, 1)
    if self.kind == "out":
      d, inner = tensor.shape
      return tensor.reshape(d, self.heads, inner // self.heads).transpose(1, 2, 0)
    if self.kind == "bias":
      return tensor.reshape(self.heads, -1)
    raise AssertionError(self.kind)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax`."""
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


def _layer_sort_key(name: str):
  return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def check_tensors(specs: Sequence[TensorSpec], entries: Mapping[str, TensorEntry],
                  expected_dtype: str, source: str) -> None:
  """Every expected tensor present with its shape and dtype, nothing else in the checkpoint."""
  expected = {s.hf_name: s for s in specs}
  missing = sorted(set(expected) - set(entries), key=_layer_sort_key)
  if missing:
    raise CheckpointError(f"{source}: missing tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else ""))
  unexpected = sorted(set(entries) - set(expected), key=_layer_sort_key)
  if unexpected:
    raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                          + " not used by the model")
  for name, spec in expected.items():
    entry = entries[name]
    if entry.shape != spec.hf_shape:
      raise CheckpointError(f"{source}: tensor {name!r} ({entry.file.name}) has shape "
                            f"{list(entry.shape)}, expected {list(spec.hf_shape)} from config.json")
    if entry.dtype != expected_dtype:
      raise CheckpointError(f"{source}: tensor {name!r} ({entry.file.name}) has dtype {entry.dtype}, "
                            f"expected {expected_dtype}")


def _expected_dtype(hf_config: Mapping[str, Any], entries: Mapping[str, TensorEntry],
                    embed_name: str) -> str:
  """config.json ``torch_dtype`` when present, else the embedding's stored dtype."""
  torch_dtype = hf_config.get("torch_dtype")
  if torch_dtype is not None:
    if torch_dtype not in _TORCH_DTYPE_TO_CODE:
      raise CheckpointError(f"{CONFIG_FILE}: unsupported torch_dtype {torch_dtype!r}")
    return _TORCH_DTYPE_TO_CODE[torch_dtype]
  if embed_name in entries:
    return entries[embed_name].dtype
  return "BF16"


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def _flat_shardings(shardings: Any) -> dict[tuple[str, ...], jax.sharding.Sharding]:
  """State / nested dict of shardings (leaves possibly inside nnx.Variables) -> {path: sharding}."""
  if isinstance(shardings, nnx.State):
    return {tuple(str(k) for k in path): (leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
            for path, leaf in shardings.flat_state()}
  out = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(prefix + (str(key),), value)
    else:
      out[prefix] = node.get_value() if isinstance(node, nnx.Variable) else node
  visit((), shardings)
  return out


def abstract_model(config: ModelConfig) -> tuple[Any, nnx.State]:
  """(graphdef, abstract state) of a `Transformer` without allocating weights."""
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0)))
  return nnx.split(model)


def read_checkpoint_info(path: PathLike, *, param_dtype: Optional[str] = None,
                         dtype: Optional[str] = None, **config_overrides) -> HFCheckpointInfo:
  """Reads and validates a HF folder without loading weights: config.json, special ids, the
  tensor index (every expected tensor present with the right shape and dtype, nothing else).

  ``param_dtype`` defaults to the stored dtype, ``dtype`` (compute) to ``param_dtype``.
  """
  folder = pathlib.Path(path)
  hf_config = read_hf_config(folder)
  family = family_of(hf_config, str(folder / CONFIG_FILE))
  entries, weight_map = read_tensor_index(folder)
  tensor_dtype = _expected_dtype(hf_config, entries, _HF_NAMES[family]["embed"])
  if param_dtype is None:
    param_dtype = _CODE_TO_PARAM_DTYPE[tensor_dtype]
  config = model_config_from_hf(folder, hf_config, param_dtype=param_dtype,
                                dtype=dtype or param_dtype, **config_overrides)
  check_tensors(tensor_specs(config), entries, tensor_dtype, str(folder))
  return HFCheckpointInfo(family=family, hf_config=hf_config, tensor_dtype=tensor_dtype,
                          weight_map=weight_map, source_path=str(folder.absolute()),
                          model_config=config)


def load_pretrained(path: PathLike, *, mesh: Optional[jax.sharding.Mesh] = None,
                    rules: Optional[Mapping[str, Any]] = None, shardings: Any = None,
                    param_dtype: Optional[str] = None, dtype: Optional[str] = None,
                    **config_overrides) -> tuple[Transformer, HFCheckpointInfo]:
  """Loads a LLaDA / Dream HF folder into a `Transformer`.

  Args:
    path: folder with ``config.json`` and ``model.safetensors`` or an index + shards; the
      tokenizer files, when present, supply special token ids missing from config.json.
    mesh: a device mesh; parameters are placed by `dmpo_jax.sharding.state_shardings` under
      ``rules`` (default `TRAIN_RULES`).
    shardings: explicit shardings (an `nnx.State` or nested dict matching the params); takes
      precedence over ``mesh``/``rules``. Neither: everything on the first local device.
    param_dtype / dtype: override the parameter dtype (default: the stored dtype) and the
      compute dtype (default: the parameter dtype).
    **config_overrides: other `ModelConfig` fields (``remat``, ``use_key_padding_mask``, ...).

  Returns:
    ``(model, info)``: ``info`` (`HFCheckpointInfo`) keeps the raw config.json, the stored dtype
    and the shard layout so that `save_pretrained(model, out, info=info)` reproduces the
    checkpoint (bit-exact while the weights are unchanged).

  Each array is built with `jax.make_array_from_callback`: the callback cuts the device's slice
  out of the memory-mapped files (stacking the layers of that slice), so weights go straight into
  their shards and no second full copy of the model exists in host memory.
  """
  folder = pathlib.Path(path)
  info = read_checkpoint_info(folder, param_dtype=param_dtype, dtype=dtype, **config_overrides)
  config = info.model_config
  entries, _ = read_tensor_index(folder)
  specs = tensor_specs(config)

  if rules is not None and mesh is None:
    raise ValueError("rules needs a mesh")
  graphdef, abstract_state = abstract_model(config)
  if shardings is None and mesh is not None:
    from dmpo_jax import sharding as sharding_lib
    shardings = sharding_lib.state_shardings(abstract_state, mesh,
                                             sharding_lib.TRAIN_RULES if rules is None else rules)
  flat_shardings = None if shardings is None else _flat_shardings(shardings)
  default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  by_param: dict[tuple[str, ...], list[TensorSpec]] = {}
  for spec in specs:
    by_param.setdefault(spec.param, []).append(spec)
  files = SafetensorsFiles()
  arrays: dict[tuple[str, ...], jax.Array] = {}
  for path_key, variable in abstract_state.flat_state():
    path_key = tuple(str(k) for k in path_key)
    if path_key not in by_param:
      raise AssertionError(f"no checkpoint tensor maps to parameter {'.'.join(path_key)}")
    abstract = variable.get_value()
    if flat_shardings is None:
      sharding = default_sharding
    elif path_key in flat_shardings:
      sharding = flat_shardings[path_key]
    else:
      raise CheckpointError(f"shardings has no entry for parameter {'.'.join(path_key)}")
    arrays[path_key] = _load_param(by_param[path_key], entries, files, abstract, sharding)

  nested: dict[str, Any] = {}
  for path_key, array in arrays.items():
    node = nested
    for key in path_key[:-1]:
      node = node.setdefault(key, {})
    node[path_key[-1]] = array
  from dmpo_jax.models import finite  # pylint: disable=import-outside-toplevel  # imports this module
  finite.check_finite(nested, f"HF checkpoint {folder}")
  abstract_state.replace_by_pure_dict(nested)
  return nnx.merge(graphdef, abstract_state), info


def _load_param(specs: list[TensorSpec], entries: Mapping[str, TensorEntry], files: SafetensorsFiles,
                abstract: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.Array:
  target_dtype = np.dtype(abstract.dtype)
  stacked = specs[0].layer is not None

  def slice_of(index: tuple[slice, ...]) -> np.ndarray:
    # np.array keeps the memory order of the (transposed) view: a plain sequential copy; a
    # C-order copy of a transposed bf16 view is several times slower in numpy. XLA relayouts.
    if not stacked:
      return np.array(specs[0].to_flax(files.view(entries[specs[0].hf_name]))[index], dtype=target_dtype)
    layers = range(len(specs))[index[0]]
    parts = [specs[i].to_flax(files.view(entries[specs[i].hf_name]))[index[1:]] for i in layers]
    return np.stack(parts).astype(target_dtype, copy=False)

  return jax.make_array_from_callback(abstract.shape, sharding, slice_of, dtype=target_dtype)


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------

def parse_size(size: Union[int, str]) -> int:
  """``5000000000``, ``"5GB"`` (10^9), ``"500MiB"`` (2^20) -> bytes."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), flags=re.IGNORECASE)
  if not match:
    raise ValueError(f"Cannot parse shard size {size!r}; use bytes or e.g. '5GB', '500MiB'")
  number, unit = float(match.group(1)), (match.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
           "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(number * scale)


def _plan_shards(specs: Sequence[TensorSpec], tensor_dtype: str, max_shard_size: Optional[int],
                 weight_map: Optional[Mapping[str, str]]) -> dict[str, list[TensorSpec]]:
  """File name -> tensors. Reuses ``weight_map`` when given; otherwise fills shards greedily up to
  ``max_shard_size`` bytes (HF's rule: a tensor that does not fit starts a new shard)."""
  if weight_map is not None:
    names = {s.hf_name for s in specs}
    if set(weight_map) != names:
      raise CheckpointError("the original weight_map does not list exactly the model's tensors; "
                            "pass max_shard_size to re-shard")
    plan: dict[str, list[TensorSpec]] = {}
    for spec in specs:
      plan.setdefault(weight_map[spec.hf_name], []).append(spec)
    return plan
  itemsize = SAFETENSORS_DTYPES[tensor_dtype].itemsize
  groups: list[list[TensorSpec]] = [[]]
  current = 0
  for spec in specs:
    nbytes = math.prod(spec.hf_shape) * itemsize
    if groups[-1] and current + nbytes > max_shard_size:
      groups.append([])
      current = 0
    groups[-1].append(spec)
    current += nbytes
  if len(groups) == 1:
    return {SINGLE_WEIGHTS_FILE: groups[0]}
  n = len(groups)
  return {f"model-{k + 1:05d}-of-{n:05d}.safetensors": g for k, g in enumerate(groups)}


def _check_info_matches(info: HFCheckpointInfo, config: ModelConfig) -> None:
  arch = _architecture_from_hf(info.hf_config, info.family)
  diffs = [f"{k}: config.json gives {v!r}, model has {getattr(config, k)!r}"
           for k, v in arch.items() if k not in ("max_seq_len",) and getattr(config, k) != v]
  if diffs:
    raise CheckpointError("The model does not match the HF config it is saved with: " + "; ".join(diffs))


def copy_tokenizer_files(source: PathLike, target: PathLike) -> list[str]:
  """Copies tokenizer / generation / remote-code (``*.py``) files; returns the names copied."""
  source, target = pathlib.Path(source), pathlib.Path(target)
  if not source.is_dir():
    raise CheckpointError(f"tokenizer_files_from folder {source} does not exist")
  names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
  names += sorted(p.name for p in source.glob("*.py") if p.is_file())
  for name in names:
    if (source / name).resolve() != (target / name).resolve():
      shutil.copyfile(source / name, target / name)
  return names


@functools.partial(jax.jit, static_argnames=("kind", "heads", "hf_shape", "stacked", "dtype"))
def _device_hf_tensor(param: jax.Array, layer: jax.Array, *, kind: str, heads: int,
                      hf_shape: tuple[int, ...], stacked: bool, dtype: str) -> jax.Array:
  """One HF tensor computed on device: layer ``layer`` (traced: one compile per parameter, not
  per layer) of a stacked parameter, relayouted by `TensorSpec.to_hf` and cast to ``dtype``
  (round to nearest even, as torch and ml_dtypes do). The transposes run in XLA, not numpy."""
  part = jax.lax.dynamic_index_in_dim(param, layer, axis=0, keepdims=False) if stacked else param
  part = TensorSpec("", (), None, kind, hf_shape, heads).to_hf(part)
  return part.astype(SAFETENSORS_DTYPES[dtype])


def save_pretrained(model: Transformer, path: PathLike, *, info: Optional[HFCheckpointInfo] = None,
                    tokenizer_files_from: Optional[PathLike] = None,
                    max_shard_size: Optional[Union[int, str]] = None,
                    tensor_dtype: Optional[str] = None, overwrite: bool = False) -> pathlib.Path:
  """Writes ``model`` as a HF folder loadable by PyTorch / HF (`docs/llada.md` §3 names).

  Args:
    info: from `load_pretrained`; its raw config.json is written back unchanged and its dtype and
      shard layout are reused. Without it a config.json is generated from ``model.config``.
    tokenizer_files_from: folder whose tokenizer / ``*.py`` files are copied; default
      ``info.source_path`` when that folder still exists.
    max_shard_size: bytes or "5GB"-style; default: the original layout from ``info``, else 5GB.
    tensor_dtype: safetensors dtype code to store (default ``info.tensor_dtype``, else the
      model's param dtype); values are rounded to nearest-even when narrowing (as torch does).
    overwrite: replace weights already in ``path`` (stale shards are deleted).

  Each HF tensor is cut, relayouted and cast on device (`_device_hf_tensor`) and fetched on its
  own, so host memory holds one tensor at a time. Single-process only (arrays must be fully
  addressable).
  """
  config: ModelConfig = model.config
  folder = pathlib.Path(path)
  if info is not None:
    _check_info_matches(info, config)
    hf_config = dict(info.hf_config)
    tensor_dtype = tensor_dtype or info.tensor_dtype
  else:
    tensor_dtype = tensor_dtype or _TORCH_DTYPE_TO_CODE[config.param_dtype]
    hf_config = hf_config_from_model_config(config, tensor_dtype)
  if tensor_dtype not in SAFETENSORS_DTYPES:
    raise CheckpointError(f"unsupported tensor_dtype {tensor_dtype!r}; supported {sorted(SAFETENSORS_DTYPES)}")
  if info is not None and tensor_dtype != info.tensor_dtype:
    hf_config["torch_dtype"] = {v: k for k, v in _TORCH_DTYPE_TO_CODE.items()}[tensor_dtype]

  specs = tensor_specs(config)
  reuse_layout = max_shard_size is None and info is not None and info.weight_map is not None
  plan = _plan_shards(specs, tensor_dtype,
                      parse_size(max_shard_size if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE),
                      info.weight_map if reuse_layout else None)

  existing = sorted(folder.glob("*.safetensors")) + ([folder / INDEX_FILE] if (folder / INDEX_FILE).exists() else [])
  if existing and not overwrite:
    raise CheckpointError(f"{folder} already holds weights ({existing[0].name}); pass overwrite=True")
  folder.mkdir(parents=True, exist_ok=True)
  for stale in existing:
    stale.unlink()

  params = nnx.state(model, nnx.Param)
  flat_params = {tuple(str(k) for k in p): v.get_value() for p, v in params.flat_state()}
  for array in flat_params.values():
    if not getattr(array, "is_fully_addressable", True):
      raise CheckpointError("save_pretrained runs on one process; gather the model first")

  def host_tensor(spec: TensorSpec) -> np.ndarray:
    tensor = _device_hf_tensor(flat_params[spec.param], np.int32(spec.layer or 0), kind=spec.kind,
                               heads=spec.heads, hf_shape=spec.hf_shape,
                               stacked=spec.layer is not None, dtype=tensor_dtype)
    return np.asarray(jax.device_get(tensor))

  weight_map = {}
  for file_name, group in plan.items():
    write_safetensors(folder / file_name, [(s.hf_name, tensor_dtype, s.hf_shape) for s in group],
                      lambda i, group=group: host_tensor(group[i]))
    weight_map.update({s.hf_name: file_name for s in group})
  if len(plan) > 1 or (SINGLE_WEIGHTS_FILE not in plan):
    total = sum(math.prod(s.hf_shape) * SAFETENSORS_DTYPES[tensor_dtype].itemsize for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")

  if tokenizer_files_from is None and info is not None and info.source_path is not None \
      and pathlib.Path(info.source_path).is_dir():
    tokenizer_files_from = info.source_path
  if tokenizer_files_from is not None:
    copy_tokenizer_files(tokenizer_files_from, folder)
  return folder
