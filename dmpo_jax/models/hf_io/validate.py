"""Checks of a HF checkpoint against the model: config.json values (type and range) and the stored
tensors (every expected tensor present with its shape and dtype, nothing else). Each failure is
one `CheckpointError` line naming the file, the key or tensor, expected and got."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

from dmpo_jax.models.hf_io.names import TensorSpec
from dmpo_jax.models.hf_io.safetensors_io import (
    CONFIG_FILE, CheckpointError, TensorEntry, _TORCH_DTYPE_TO_CODE)

_REQUIRED = object()


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


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
