"""The files of a HF checkpoint folder: safetensors read and written through the `safetensors`
library, the shard index, and the error every reader of a checkpoint raises.

A HF folder holds ``config.json`` and the weights as ``model.safetensors`` or as shards
``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (``weight_map``).
Headers are read with `safetensors.safe_open` (``framework="numpy"``) without touching the data;
tensors are read as per-tensor slices of the memory-mapped file (``get_slice``), so a loader reads
only the bytes a device needs. BF16 tensors are `ml_dtypes.bfloat16` arrays, which the library's
numpy framework reads and `safetensors.numpy.save_file` writes natively (no conversion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Union

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The safetensors dtype codes of model weights <-> numpy dtype (other codes are refused).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_TORCH_DTYPE_TO_CODE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_CODE_TO_PARAM_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}
# Header metadata of every written file, as torch writes it (transformers' loader checks "format").
_FILE_METADATA = {"format": "pt"}


class CheckpointError(ValueError):
  """A checkpoint (HF folder or the project's format) is missing, malformed, damaged or does
  not match the model; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors file (from its header)."""
  name: str
  file: pathlib.Path
  dtype: str
  shape: tuple[int, ...]


def _library_error(file: pathlib.Path, error: Exception, problem: str) -> Exception:
  """The library's `SafetensorError` as one line naming the file: an `OSError` when the library
  reports one (``... (os error N)``: a full disk, a missing permission), else a `CheckpointError`
  saying ``problem``."""
  reason = " ".join(str(error).split())
  os_error = re.search(r"\(os error (\d+)\)", reason)
  if os_error:
    code = int(os_error.group(1))
    return OSError(code, os.strerror(code), str(file))
  return CheckpointError(f"{file}: {problem} ({reason[:240]})")


def read_safetensors_header(file: PathLike) -> dict[str, TensorEntry]:
  """Name -> `TensorEntry` of every tensor in a safetensors file (the header only; the library
  checks the JSON, the byte ranges and that the data covers the file)."""
  file = pathlib.Path(file)
  if not file.is_file():
    raise CheckpointError(f"Weights file {file} not found")
  entries = {}
  try:
    with safetensors.safe_open(file, framework="numpy") as handle:
      for name in handle.keys():
        tensor = handle.get_slice(name)
        entries[name] = TensorEntry(name, file, tensor.get_dtype(), tuple(tensor.get_shape()))
  except safetensors.SafetensorError as e:
    raise _library_error(file, e, "not a valid safetensors file") from e
  for name, entry in entries.items():
    if entry.dtype not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {entry.dtype!r}; "
                            f"supported: {sorted(SAFETENSORS_DTYPES)}")
  return entries


class SafetensorsFiles(contextlib.ExitStack):
  """Open safetensors files, one `safe_open` handle per file for the whole load (closed on exit);
  `read` returns a slice of one tensor, reading only that slice's bytes."""

  def __init__(self):
    super().__init__()
    self._handles: dict[pathlib.Path, Any] = {}

  def read(self, entry: TensorEntry, index: tuple[slice, ...]) -> np.ndarray:
    """``tensor[index]`` of ``entry`` in its stored (HF) layout and dtype."""
    try:
      if entry.file not in self._handles:
        self._handles[entry.file] = self.enter_context(
            safetensors.safe_open(entry.file, framework="numpy"))
      return self._handles[entry.file].get_slice(entry.name)[index]
    except safetensors.SafetensorError as e:
      raise _library_error(entry.file, e, f"cannot read tensor {entry.name!r}") from e


def write_safetensors(file: PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes one safetensors file with `safetensors.numpy.save_file` (the whole file's tensors
  are in host memory; the library orders them by dtype and name)."""
  for name, array in tensors.items():
    if array.dtype not in SAFETENSORS_DTYPES.values():
      raise CheckpointError(f"tensor {name!r}: dtype {array.dtype} is not a weight dtype "
                            f"{sorted(SAFETENSORS_DTYPES)}")
  try:
    safetensors.numpy.save_file({name: np.ascontiguousarray(a) for name, a in tensors.items()},
                                str(file), metadata=dict(_FILE_METADATA))
  except safetensors.SafetensorError as e:
    raise _library_error(pathlib.Path(file), e, "cannot write the safetensors file") from e


# ------------------------------------------------------------------------------------------------
# The folder: JSON files, shard paths, tensor index
# ------------------------------------------------------------------------------------------------

def _read_json(file: pathlib.Path, what: str) -> Any:
  if not file.is_file():
    raise CheckpointError(f"{what} {file} not found")
  try:
    return json.loads(file.read_text(encoding="utf-8"))
  except (OSError, ValueError, RecursionError) as e:  # + UnicodeDecodeError, deep nesting
    raise CheckpointError(f"{file} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e


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
