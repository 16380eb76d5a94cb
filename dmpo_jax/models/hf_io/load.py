"""Loading a HF folder into a `Transformer`, each device's slice read straight into its shard."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from dmpo_jax.models.config import ModelConfig
from dmpo_jax.models.hf_io.hf_config import (
    HFCheckpointInfo, family_of, model_config_from_hf, read_hf_config)
from dmpo_jax.models.hf_io.names import _HF_NAMES, TensorSpec, tensor_specs
from dmpo_jax.models.hf_io.safetensors_io import (
    CONFIG_FILE, CheckpointError, PathLike, SafetensorsFiles, TensorEntry, _CODE_TO_PARAM_DTYPE,
    read_tensor_index)
from dmpo_jax.models.hf_io.validate import _expected_dtype, check_tensors
from dmpo_jax.models.transformer import Transformer


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

  Each array is built with `jax.make_array_from_callback`: the callback reads the device's slice
  from the files (`safetensors` ``get_slice``, stacking the layers of that slice), so weights go
  straight into their shards and no second full copy of the model exists in host memory.
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
  arrays: dict[tuple[str, ...], jax.Array] = {}
  with SafetensorsFiles() as files:  # the callbacks run inside `make_array_from_callback`
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
  """One (stacked) parameter; the callback reads, per layer, only the HF rows and columns of the
  device's block (`TensorSpec.hf_slice`) and relayouts them (`TensorSpec.to_flax`)."""
  target_dtype = np.dtype(abstract.dtype)
  stacked = specs[0].layer is not None

  def block(spec: TensorSpec, index: tuple[slice, ...]) -> np.ndarray:
    read, cut = spec.hf_slice(index)
    return spec.to_flax(files.read(entries[spec.hf_name], read))[cut]

  def slice_of(index: tuple[slice, ...]) -> np.ndarray:
    # np.array keeps the memory order of the (transposed) view: a plain sequential copy; a
    # C-order copy of a transposed bf16 view is several times slower in numpy. XLA relayouts.
    if not stacked:
      return np.array(block(specs[0], index), dtype=target_dtype)
    layers = range(len(specs))[index[0]]
    return np.stack([block(specs[i], index[1:]) for i in layers]).astype(target_dtype, copy=False)

  return jax.make_array_from_callback(abstract.shape, sharding, slice_of, dtype=target_dtype)
