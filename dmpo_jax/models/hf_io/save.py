"""Writing a `Transformer` as a HF folder (`docs/llada.md` §3 names) that PyTorch / HF code loads:
the shard plan, the safetensors files (`safetensors.numpy.save_file`), config.json, the index and
the tokenizer files."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
import shutil
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx

from dmpo_jax.models.config import ModelConfig
from dmpo_jax.models.hf_io.hf_config import (
    HFCheckpointInfo, _architecture_from_hf, hf_config_from_model_config)
from dmpo_jax.models.hf_io.names import TensorSpec, tensor_specs
from dmpo_jax.models.hf_io.safetensors_io import (
    CONFIG_FILE, INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_WEIGHTS_FILE, CheckpointError, PathLike,
    _TORCH_DTYPE_TO_CODE, write_safetensors)
from dmpo_jax.models.transformer import Transformer

# Copied by `save_pretrained` from ``tokenizer_files_from`` (plus ``*.py`` remote-code files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # HF's default "5GB"
# Sub-folder of a project model checkpoint (`launch/convert.py`) holding the HF config.json and
# tokenizer / remote-code files of the checkpoint it was converted from.
HF_FILES_DIR = "hf_files"


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
  own; `safetensors.numpy.save_file` writes a whole file at once, so host memory holds one shard
  (at most ``max_shard_size``, one tensor more when that tensor alone is larger). Single-process
  only (arrays must be fully addressable).
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
    tensor = np.asarray(jax.device_get(tensor))
    if tensor.shape != spec.hf_shape:
      raise CheckpointError(f"tensor {spec.hf_name!r}: produced shape {tensor.shape}, expected {spec.hf_shape}")
    return tensor

  weight_map = {}
  for file_name, group in plan.items():
    write_safetensors(folder / file_name, {spec.hf_name: host_tensor(spec) for spec in group})
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
