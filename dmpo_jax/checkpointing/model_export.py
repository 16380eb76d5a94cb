"""The project's model checkpoint format (`docs/checkpoints.md` §1): `save_model_checkpoint` /
`load_model_checkpoint` write and read a folder with

  ``model_config.json``   `dataclasses.asdict(ModelConfig)`, enough to rebuild the architecture;
  ``params/``             an orbax (`StandardCheckpointHandler`) checkpoint of the NNX params as a
                          plain nested dict (``{"embed": arr, "blocks": {"q_proj": arr, ...}}``);
  ``metadata.json``       optional free-form JSON (source checkpoint, step, reward, ...);
  ``checksums.json``      the SHA-256 digests of every file (`integrity`), checked before reading.

The loader builds the abstract model with `nnx.eval_shape` (no host memory for weights), restores
each array straight into the requested sharding and merges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dmpo_jax import sharding as sharding_lib
from dmpo_jax.checkpointing import integrity
from dmpo_jax.checkpointing.integrity import (
    CheckpointIntegrityError, _check_files, _read_json_file, _read_manifest, flatten_with_names)
from dmpo_jax.models import finite
from dmpo_jax.models.config import ModelConfig
from dmpo_jax.models.hf_io import CheckpointError
from dmpo_jax.models.transformer import Transformer

PathLike = Union[str, os.PathLike]

MODEL_CONFIG_FILE = "model_config.json"
MODEL_METADATA_FILE = "metadata.json"
MODEL_PARAMS_DIR = "params"
MODEL_CHECKSUMS_FILE = "checksums.json"


def _params_as_pure_dict(model_or_state) -> dict:
  """NNX module / `nnx.State` / nested dict of arrays -> nested dict of arrays (no Variables)."""
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
    return state.to_pure_dict()
  if isinstance(model_or_state, nnx.State):
    return model_or_state.to_pure_dict()
  if isinstance(model_or_state, Mapping):
    return jax.tree.map(lambda x: x[...] if isinstance(x, nnx.Variable) else x, dict(model_or_state),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  raise TypeError(
      f"save_model_checkpoint expects an nnx.Module, an nnx.State or a dict of arrays, got "
      f"{type(model_or_state).__name__}")


def _model_config_to_json(config: ModelConfig) -> dict:
  if not isinstance(config, ModelConfig):
    raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
  return dataclasses.asdict(config)


def _model_config_from_json(data: Mapping[str, Any], source: PathLike) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
  try:
    return ModelConfig(**data)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e


def save_model_checkpoint(path: PathLike, model_or_state, config: ModelConfig,
                          extra_metadata: Optional[Mapping[str, Any]] = None, *,
                          overwrite: bool = False) -> pathlib.Path:
  """Writes ``path/{model_config.json, params/, metadata.json}``; returns the folder path.

  ``model_or_state`` is a `Transformer`, its `nnx.State` (e.g. ``split_model(model)[1]`` or the
  params of a train state) or the equivalent nested dict of arrays. Sharded arrays are written by
  every process cooperatively (call it on all processes). ``overwrite`` replaces an existing
  checkpoint; without it an existing folder is an error.
  """
  path = pathlib.Path(path).absolute()
  params = _params_as_pure_dict(model_or_state)
  config_json = _model_config_to_json(config)
  if extra_metadata is not None:
    try:
      metadata_text = json.dumps(dict(extra_metadata), indent=2, sort_keys=True)
    except TypeError as e:
      raise TypeError(f"extra_metadata for {path} is not JSON-serialisable: {e}") from e
  params_dir = path / MODEL_PARAMS_DIR
  if params_dir.exists() and not overwrite:
    raise FileExistsError(f"Model checkpoint {path} already exists (pass overwrite=True to replace it)")
  path.mkdir(parents=True, exist_ok=True)
  # Checkpointer (synchronous): the files exist when this function returns.
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(params_dir, args=ocp.args.StandardSave(params), force=overwrite)
  if jax.process_index() == 0:
    config_bytes = json.dumps(config_json, indent=2, sort_keys=True).encode("utf-8")
    files = integrity.digest_files(path, integrity.list_files(path, [MODEL_PARAMS_DIR]))
    files[MODEL_CONFIG_FILE] = integrity.digest_bytes(config_bytes)
    if extra_metadata is not None:
      files[MODEL_METADATA_FILE] = integrity.digest_bytes(metadata_text.encode("utf-8"))
    # model_config.json last: its presence marks a complete checkpoint.
    integrity.write_json_atomic(path / MODEL_CHECKSUMS_FILE, integrity.make_manifest(files))
    if extra_metadata is not None:
      integrity.write_bytes_atomic(path / MODEL_METADATA_FILE, metadata_text.encode("utf-8"))
    elif (path / MODEL_METADATA_FILE).exists():
      (path / MODEL_METADATA_FILE).unlink()  # overwrite: no stale metadata beside new weights
    integrity.write_bytes_atomic(path / MODEL_CONFIG_FILE, config_bytes)
  if jax.process_count() > 1:  # every process returns once process 0's files exist
    ocp.multihost.sync_global_processes(f"dmpo_jax.model_saved.{path.name}")
  return path


def load_model_config(path: PathLike) -> ModelConfig:
  """The `ModelConfig` stored in a model checkpoint folder."""
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"Model checkpoint folder {path} does not exist")
  config_path = path / MODEL_CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(
        f"{config_path} not found: {path} is not a dmpo_jax model checkpoint (expected "
        f"{MODEL_CONFIG_FILE} and {MODEL_PARAMS_DIR}/)")
  data = _read_json_file(config_path)
  _verify_model_json(path, config_path)
  if not isinstance(data, dict):
    raise CheckpointError(f"{config_path} must hold a JSON object, got {type(data).__name__}")
  return _model_config_from_json(data, config_path)


def _model_checksums(path: pathlib.Path) -> Optional[dict]:
  """The folder's file-digest manifest (None, with a warning, for checkpoints saved without one)."""
  return _read_manifest(path / MODEL_CHECKSUMS_FILE, f"model checkpoint {path}")


def _verify_model_json(path: pathlib.Path, file: pathlib.Path) -> None:
  """Checks one JSON file of a model checkpoint against its saved digest (this process alone)."""
  manifest = _model_checksums(path)
  if manifest is None:
    return
  if file.name not in manifest["files"]:
    raise CheckpointIntegrityError(f"{file} has no saved checksum in {path / MODEL_CHECKSUMS_FILE}")
  try:
    _check_files(path, manifest, f"Model checkpoint {path}", names=[file.name], collective=False)
  except CheckpointIntegrityError as e:
    raise CheckpointIntegrityError(
        f"{e}; after a deliberate edit of {file.name}, delete {MODEL_CHECKSUMS_FILE} to load the "
        "checkpoint unverified") from e


def load_model_metadata(path: PathLike) -> dict:
  """The ``extra_metadata`` saved with a model checkpoint ({} when none was saved)."""
  path = pathlib.Path(path).absolute()
  metadata_path = path / MODEL_METADATA_FILE
  if not metadata_path.is_file():
    return {}
  data = _read_json_file(metadata_path)
  _verify_model_json(path, metadata_path)
  return data



def _check_saved_shapes(params_dir: pathlib.Path, abstract: dict) -> None:
  """Compares the stored array shapes with the model's; raises naming every mismatching tensor."""
  stored_shapes = integrity.saved_shapes(params_dir, f"Model checkpoint {params_dir.parent}")
  expected_flat = flatten_with_names(abstract)
  problems = []
  for name in sorted(set(expected_flat) - set(stored_shapes)):
    problems.append(f"parameter {name!r} is missing from the checkpoint")
  for name in sorted(set(stored_shapes) - set(expected_flat)):
    problems.append(f"checkpoint has unexpected parameter {name!r}")
  for name in sorted(set(stored_shapes) & set(expected_flat)):
    got = stored_shapes[name]
    want = tuple(expected_flat[name].shape)
    if got != want:
      problems.append(f"parameter {name!r}: checkpoint shape {got} != model shape {want}")
  if problems:
    raise ValueError(f"Model checkpoint {params_dir.parent} does not match its model_config.json: "
                     + "; ".join(problems))


def load_model_checkpoint(path: PathLike, *, mesh: Optional[jax.sharding.Mesh] = None,
                          shardings=None, dtype: Optional[str] = None,
                          rules: Optional[Mapping[str, Any]] = None) -> Transformer:
  """Rebuilds the `Transformer` saved by `save_model_checkpoint`; every array is read straight
  into its sharding (each device reads only its own shard: no full copy on any device).

  ``shardings``: a pytree of `jax.sharding.Sharding` with the params' structure (an `nnx.State`
  or nested dict, e.g. from `dmpo_jax.sharding`). ``mesh`` without ``shardings``: the shardings
  of the parameters' logical axes under ``rules`` (default `sharding.TRAIN_RULES`: FSDP), as
  `hf_io.load_pretrained` places them. Neither: arrays land on the default device. ``dtype``
  overrides the stored ``param_dtype`` (cast while reading, e.g. "bfloat16" to load fp32 weights
  for inference). The files are checked against their saved digests first (a collective with
  several processes: call it on every process).
  """
  # orbax returns no metadata for a relative path: resolve it once here, for every caller.
  path = pathlib.Path(path).absolute()
  config = load_model_config(path)
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  params_dir = path / MODEL_PARAMS_DIR
  if not params_dir.is_dir():
    raise FileNotFoundError(f"{params_dir} not found: the model checkpoint {path} has no parameters")

  abstract_model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  abstract = abstract_state.to_pure_dict()
  _check_saved_shapes(params_dir, abstract)

  if shardings is None and mesh is not None:
    shardings = sharding_lib.state_shardings(abstract_state, mesh,
                                             sharding_lib.TRAIN_RULES if rules is None else rules)
  if shardings is not None:
    sharding_tree = shardings.to_pure_dict() if isinstance(shardings, nnx.State) else shardings
    sharding_flat = flatten_with_names(sharding_tree)
    names = flatten_with_names(abstract)
    missing = sorted(set(names) - set(sharding_flat))
    if missing:
      raise ValueError(f"shardings has no entry for parameter(s) {missing}")
    target = jax.tree.unflatten(jax.tree.structure(abstract), [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_flat[name])
        for name, x in names.items()])
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)

  manifest = _model_checksums(path)
  if manifest is not None:
    params_files = [name for name in manifest["files"] if name.startswith(MODEL_PARAMS_DIR + "/")]
    _check_files(path, manifest, f"Model checkpoint {path}, {MODEL_PARAMS_DIR}/", names=params_files)
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
  except (ValueError, OSError) as e:
    raise CheckpointIntegrityError(f"Model checkpoint {path}: cannot read {params_dir}: {e}") from e
  finite.check_finite(restored, f"Model checkpoint {path}")
  abstract_state.replace_by_pure_dict(restored)
  return nnx.merge(graphdef, abstract_state)

