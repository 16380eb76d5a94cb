"""Checkpoints: the project's model format, resumable training checkpoints, preemption handling.

Two formats (`docs/checkpoints.md` §1-§3):

* **Model checkpoint** (`save_model_checkpoint` / `load_model_checkpoint`): a folder with
    ``model_config.json``   `dataclasses.asdict(ModelConfig)`, enough to rebuild the architecture;
    ``params/``             an orbax (`StandardCheckpointHandler`) checkpoint of the NNX params as a
                            plain nested dict (``{"embed": arr, "blocks": {"q_proj": arr, ...}}``);
    ``metadata.json``       optional free-form JSON (source checkpoint, step, reward, ...).
  The loader builds the abstract model with `nnx.eval_shape` (no host memory for weights),
  restores each array straight into the requested sharding and merges.

* **Training checkpoint** (`TrainCheckpointer`): an `ocp.CheckpointManager` folder with one
  sub-folder per step holding the items ``state`` (params, opt_state, step, RNG keys, ... any
  pytree; typed PRNG keys are stored as their raw ``key_data``), ``iterator`` (the data iterator's
  ``get_state()`` as JSON) and ``metadata`` (consumed-prompt count + the run config as JSON).
  Orbax writes every step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so
  a crash mid-save leaves the previous checkpoint as the latest one.

Integrity (`dmpo_jax.file_digests`): both formats store the SHA-256 digests of every file they
wrote and check them before reading anything back; a mismatch raises `CheckpointIntegrityError`
naming the step (training checkpoints), the item and the file. A model checkpoint keeps them in
``checksums.json``; a training step in ``file_checksums.json``, written by orbax's background
commit thread before the step folder is renamed (so the save call never waits for it and a
visible step always has its digests). The digests are of the bytes on disk, so they do not depend
on how the arrays are sharded when saved or restored.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import pathlib
import signal
import threading
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dmpo_jax import file_digests, sharding as sharding_lib
from dmpo_jax.models import finite
from dmpo_jax.models.config import ModelConfig
from dmpo_jax.models.hf_io import CheckpointError
from dmpo_jax.models.transformer import Transformer

PathLike = Union[str, os.PathLike]

MODEL_CONFIG_FILE = "model_config.json"
MODEL_METADATA_FILE = "metadata.json"
MODEL_PARAMS_DIR = "params"
MODEL_CHECKSUMS_FILE = "checksums.json"
STEP_CHECKSUMS_FILE = "file_checksums.json"

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Pytree helpers
# ------------------------------------------------------------------------------------------------

def _key_path_str(path) -> str:
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    else:
      parts.append(str(entry))
  return ".".join(parts)


def _flatten_with_names(tree) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_key_path_str(path): leaf for path, leaf in leaves}


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


# ------------------------------------------------------------------------------------------------
# Integrity: checksums written at save time, verified at restore
# ------------------------------------------------------------------------------------------------

class CheckpointIntegrityError(CheckpointError):
  """A checkpoint file does not match the digest written with it (or cannot be read): the
  checkpoint's files were changed or damaged after the save."""


def _read_json_file(path: pathlib.Path) -> Any:
  """JSON file contents; unreadable or broken JSON raises `CheckpointIntegrityError` naming it."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
    raise CheckpointIntegrityError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from e


_DAMAGED = "checksum mismatch: changed or damaged after the save"


def _read_manifest(manifest_path: pathlib.Path, what: str) -> Optional[dict]:
  """The file-digest manifest at ``manifest_path``; None (with a warning) when there is none or
  it is in an older format (the files are then not verified)."""
  if not manifest_path.is_file():
    _log.warning("%s has no %s (saved by an older version): its files are not verified", what,
                 manifest_path.name)
    return None
  manifest = _read_json_file(manifest_path)
  if isinstance(manifest, dict) and "format" not in manifest:
    _log.warning("%s is in an older checksum format: the files of %s are not verified",
                 manifest_path, what)
    return None
  problem = file_digests.manifest_problem(manifest)
  if problem:
    raise CheckpointIntegrityError(f"{manifest_path}: {problem}")
  return manifest


def _check_files(root: pathlib.Path, manifest: Optional[dict], where: str, *,
                 names: Optional[list[str]] = None, collective: bool = True) -> None:
  """Raises `CheckpointIntegrityError` (``where``: damaged file(s) ...) when a file under ``root``
  differs from ``manifest`` (`file_digests.verify_files`)."""
  if manifest is None:
    return
  problems = file_digests.verify_files(root, manifest, names=names, collective=collective)
  if problems:
    raise CheckpointIntegrityError(
        f"{where}: " + "; ".join(f"file {root}/{p}" for p in problems) + f" ({_DAMAGED})")


# ------------------------------------------------------------------------------------------------
# Model checkpoints (the project's own model format)
# ------------------------------------------------------------------------------------------------

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
    files = file_digests.digest_files(path, file_digests.list_files(path, [MODEL_PARAMS_DIR]))
    files[MODEL_CONFIG_FILE] = file_digests.digest_bytes(config_bytes)
    if extra_metadata is not None:
      files[MODEL_METADATA_FILE] = file_digests.digest_bytes(metadata_text.encode("utf-8"))
    # model_config.json last: its presence marks a complete checkpoint.
    file_digests.write_json_atomic(path / MODEL_CHECKSUMS_FILE, file_digests.make_manifest(files))
    if extra_metadata is not None:
      _write_bytes_atomic(path / MODEL_METADATA_FILE, metadata_text.encode("utf-8"))
    elif (path / MODEL_METADATA_FILE).exists():
      (path / MODEL_METADATA_FILE).unlink()  # overwrite: no stale metadata beside new weights
    _write_bytes_atomic(path / MODEL_CONFIG_FILE, config_bytes)
  return path


def _write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


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


def _saved_shapes(item_dir: pathlib.Path, where: str) -> dict[str, tuple]:
  """``{leaf name: shape}`` of an orbax pytree item, from its metadata (no array is read)."""
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      stored = checkpointer.metadata(item_dir)
  except (ValueError, OSError, KeyError, TypeError) as e:
    raise CheckpointIntegrityError(f"{where}: cannot read the metadata of {item_dir}: {e}") from e
  stored_tree = getattr(stored, "item_metadata", stored)
  stored_tree = getattr(stored_tree, "tree", stored_tree)
  return {name: tuple(leaf.shape) for name, leaf in _flatten_with_names(stored_tree).items()}


def _check_saved_shapes(params_dir: pathlib.Path, abstract: dict) -> None:
  """Compares the stored array shapes with the model's; raises naming every mismatching tensor."""
  stored_shapes = _saved_shapes(params_dir, f"Model checkpoint {params_dir.parent}")
  expected_flat = _flatten_with_names(abstract)
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
    sharding_flat = _flatten_with_names(sharding_tree)
    names = _flatten_with_names(abstract)
    missing = sorted(set(names) - set(sharding_flat))
    if missing:
      raise ValueError(f"shardings has no entry for parameter(s) {missing}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    target = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_flat[_key_path_str(p)])
        for p, x in leaves])
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


# ------------------------------------------------------------------------------------------------
# Training checkpoints
# ------------------------------------------------------------------------------------------------

STATE_ITEM = "state"
ITERATOR_ITEM = "iterator"
METADATA_ITEM = "metadata"
STEP_ITEMS = (STATE_ITEM, ITERATOR_ITEM, METADATA_ITEM)
CORRUPT_PREFIX = "corrupt-"
_RESERVED_METADATA_KEYS = ("consumed_prompts", "checkpoint_step", "prng_key_impls")


def _is_prng_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _prng_key_impl_name(key: jax.Array) -> str:
  impl = jax.random.key_impl(key)
  return getattr(impl, "name", str(impl))


def _keys_to_data(state) -> tuple[Any, dict[str, str]]:
  """Typed PRNG key leaves -> their uint32 ``key_data``; returns (tree, {leaf path: impl name})."""
  impls: dict[str, str] = {}

  def convert(path, leaf):
    if _is_prng_key(leaf):
      impls[_key_path_str(path)] = _prng_key_impl_name(leaf)
      return jax.random.key_data(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(convert, state), impls


def _abstract_leaf(x):
  """Array / ShapeDtypeStruct / scalar -> ShapeDtypeStruct (keeping a jax.Array's sharding)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
  raise TypeError(f"abstract_state leaf of type {type(x).__name__} is not an array or ShapeDtypeStruct")


def _abstract_key_data(leaf) -> jax.ShapeDtypeStruct:
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  sharding = getattr(leaf, "sharding", None)
  if sharding is not None and isinstance(sharding, jax.sharding.NamedSharding):
    # key_data adds trailing (unsharded) key-word axes.
    spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  elif sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    sharding = None
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _encode_iterator_state(iterator_state) -> dict:
  """grain ``get_state()`` (bytes for DataLoader iterators, dict for dataset iterators) -> JSON."""
  if iterator_state is None:
    return {"kind": "none"}
  if isinstance(iterator_state, (bytes, bytearray)):
    try:
      return {"kind": "bytes_utf8", "value": bytes(iterator_state).decode("utf-8")}
    except UnicodeDecodeError:
      return {"kind": "bytes_base64", "value": base64.b64encode(bytes(iterator_state)).decode("ascii")}
  try:
    json.dumps(iterator_state)
  except TypeError as e:
    raise TypeError(f"iterator_state must be bytes or JSON-serialisable, got {type(iterator_state).__name__}: {e}") from e
  return {"kind": "json", "value": iterator_state}


def _decode_iterator_state(encoded: Mapping[str, Any]):
  kind = encoded.get("kind")
  if kind == "none":
    return None
  if kind == "bytes_utf8":
    return encoded["value"].encode("utf-8")
  if kind == "bytes_base64":
    return base64.b64decode(encoded["value"])
  if kind == "json":
    return encoded["value"]
  raise ValueError(f"Unknown iterator state encoding {kind!r} in checkpoint")


def _check_target_matches(target, saved_shapes: Mapping[str, tuple], where: str) -> None:
  """Compares the restore target's leaf names and shapes with the saved ones (orbax metadata)."""
  flat = _flatten_with_names(target)
  problems = [f"{name!r} is not in the checkpoint" for name in sorted(set(flat) - set(saved_shapes))]
  problems += [f"checkpoint has {name!r}, abstract_state does not"
               for name in sorted(set(saved_shapes) - set(flat))]
  problems += [f"{name!r}: checkpoint shape {tuple(saved_shapes[name])} != "
               f"abstract_state shape {tuple(flat[name].shape)}"
               for name in sorted(set(flat) & set(saved_shapes))
               if tuple(saved_shapes[name]) != tuple(flat[name].shape)]
  if problems:
    raise ValueError(f"{where} does not match abstract_state: " + "; ".join(problems))


class RestoredCheckpoint(NamedTuple):
  """What `TrainCheckpointer.restore` returns; unpacks as ``state, iterator_state, metadata``.

  ``metadata`` is the user metadata dict plus ``consumed_prompts`` (int) and ``checkpoint_step``.
  """
  state: Any
  iterator_state: Any
  metadata: dict


class TrainCheckpointer:
  """Periodic, asynchronous, pruned training checkpoints around `ocp.CheckpointManager`.

  Layout: ``directory/<step>/{state,iterator,metadata}/`` and ``file_checksums.json``. A save
  runs in the background after the device-to-host copy; call `wait_until_finished` before
  reading the files and `close` at the end (``async_save=False`` waits inside `save`). The file
  digests are computed in orbax's background commit thread, after the files are written and
  before the step folder is renamed into place (`_write_step_checksums`). Only the newest
  ``max_to_keep`` steps are kept. An interrupted save stays a ``<step>.orbax-checkpoint-tmp*``
  folder, which `latest_step`/`all_steps` ignore and the next save deletes.

  Typical loop::

    ckpt = TrainCheckpointer(workdir / "checkpoints", save_interval_steps=50, max_to_keep=3)
    if ckpt.latest_step() is not None:
      state, iterator_state, meta = ckpt.restore(abstract_state=state)
    ...
    ckpt.save(step, state, iterator_state=it.get_state(), consumed_prompts=n, metadata=cfg_dict)
  """

  def __init__(self, directory: PathLike, *, save_interval_steps: int = 1,
               max_to_keep: Optional[int] = 3, async_save: bool = True, create: bool = True):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist")
    self.save_interval_steps = int(save_interval_steps)
    self._async_save = bool(async_save)
    self._saving_step: Optional[int] = None
    # Always orbax's asynchronous path: its commit thread runs `_write_step_checksums` between
    # writing the files and renaming the step folder into place.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self.save_interval_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_step_checksums),
        create=create,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=STEP_ITEMS)

  # -- queries -----------------------------------------------------------------------------------
  @staticmethod
  def steps_in(directory: PathLike) -> list[int]:
    """Finalized checkpoint steps in ``directory`` without opening a manager (ascending)."""
    directory = pathlib.Path(directory).absolute()
    return sorted(ocp.step.checkpoint_steps(directory)) if directory.is_dir() else []

  def all_steps(self) -> list[int]:
    """Steps of finalized checkpoints on disk, ascending (an in-flight async save appears once
    it is complete; interrupted ``*.orbax-checkpoint-tmp*`` folders never do)."""
    return self.steps_in(self.directory)

  def latest_step(self) -> Optional[int]:
    """Newest finalized checkpoint step on disk, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def metadata(self, step: int) -> dict:
    """The user metadata saved with ``step`` (e.g. the run config), without reading the state
    (and without the file digests, which `restore` checks)."""
    meta = self._restore_json_item(step, METADATA_ITEM)
    if not isinstance(meta, dict):
      raise CheckpointIntegrityError(f"Checkpoint step {step} in {self.directory}: the metadata "
                                     "item must be a JSON object")
    return meta

  def should_save(self, step: int) -> bool:
    """True when ``step`` is a multiple of ``save_interval_steps`` and not saved yet."""
    return step % self.save_interval_steps == 0 and step not in self._manager.all_steps()

  # -- save / restore ----------------------------------------------------------------------------
  def save(self, step: int, state, *, iterator_state=None, consumed_prompts: int = 0,
           metadata: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves when `should_save(step)` (or ``force``, e.g. at preemption or the last step).

    ``state``: any pytree of arrays (params, opt_state, step counter, typed or raw PRNG keys).
    ``iterator_state``: the grain iterator's ``get_state()`` (bytes or JSON-able dict) or None.
    ``metadata``: JSON-able dict (run config, objective name, ...). Returns whether it saved; a
    step that already has a checkpoint is never written twice (returns False).
    """
    step = int(step)
    if step in self._manager.all_steps():  # includes this manager's in-flight save
      return False
    if not force and not self.should_save(step):
      return False
    user_metadata = dict(metadata or {})
    clash = sorted(set(user_metadata) & set(_RESERVED_METADATA_KEYS))
    if clash:
      raise ValueError(f"metadata keys {clash} are reserved by TrainCheckpointer")
    state_data, key_impls = _keys_to_data(state)
    meta = {**user_metadata, "consumed_prompts": int(consumed_prompts), "checkpoint_step": step,
            "prng_key_impls": key_impls}
    try:
      json.dumps(meta)
    except TypeError as e:
      raise TypeError(f"checkpoint metadata for step {step} is not JSON-serialisable: {e}") from e
    encoded_iterator = _encode_iterator_state(iterator_state)
    self._manager.wait_until_finished()  # the previous save's commit thread reads _saving_step
    self._saving_step = step
    saved = bool(self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state_data),
            ITERATOR_ITEM: ocp.args.JsonSave(encoded_iterator),
            METADATA_ITEM: ocp.args.JsonSave(meta),
        }),
        force=True))
    if not self._async_save:
      self._manager.wait_until_finished()
    return saved

  def _write_step_checksums(self) -> None:
    """orbax's post-finalization callback (primary process, background commit thread, after
    every process wrote its files and before the step folder is renamed): writes the SHA-256
    digests of the step's item files into ``file_checksums.json`` inside the folder."""
    step = self._saving_step
    pending = sorted(self.directory.glob(f"{step}{ocp.step.TMP_DIR_SUFFIX}*"))
    folder = pending[-1] if pending else self.directory / str(step)  # commit-file atomicity
    names = file_digests.list_files(folder, STEP_ITEMS)
    if not names:
      raise FileNotFoundError(f"checkpoint step {step}: no files found in {folder}")
    manifest = file_digests.make_manifest(file_digests.digest_files(folder, names))
    file_digests.write_json_atomic(folder / STEP_CHECKSUMS_FILE, manifest)

  def restore(self, step: Optional[int] = None, *, abstract_state=None,
              fallback: bool = False) -> RestoredCheckpoint:
    """Restores ``step`` (default: the latest) -> (state, iterator_state, metadata).

    ``abstract_state``: the state pytree as arrays or `jax.ShapeDtypeStruct`s (e.g. the freshly
    initialised train state, or its `jax.eval_shape`); it fixes the tree structure (NamedTuples of
    optax states, `nnx.State`), dtypes and target shardings, and typed PRNG key leaves are
    re-wrapped with the implementation they were saved with. Without it the raw saved tree is
    returned (nested dicts/lists, keys as uint32 data).

    Every array and JSON item is checked against the checksums saved with the step; a mismatch
    or an unreadable file raises `CheckpointIntegrityError` naming the step, item and array.
    ``fallback=True`` (only with ``step=None``) instead logs the error and tries the next older
    step; the damaged newer steps are renamed ``corrupt-<step>`` (kept for inspection, ignored
    by orbax) so the run can save those steps again. ``metadata["checkpoint_step"]`` says which
    step was restored.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No complete checkpoint in {self.directory}")
      if fallback:
        return self._restore_newest_intact(steps, abstract_state)
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available: {steps}")
    return self._restore_step(step, abstract_state)

  def _restore_newest_intact(self, steps: list[int], abstract_state) -> RestoredCheckpoint:
    damaged = []
    for step in reversed(steps):
      try:
        restored = self._restore_step(step, abstract_state)
      except CheckpointIntegrityError as e:
        _log.error("checkpoint step %d is damaged, trying the previous one: %s", step, e)
        damaged.append((step, e))
        continue
      if damaged:
        self._set_aside([s for s, _ in damaged])
      return restored
    raise CheckpointIntegrityError(
        f"Every checkpoint in {self.directory} is damaged: " +
        "; ".join(f"step {s}: {e}" for s, e in damaged)) from damaged[0][1]

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged step folders to ``corrupt-<step>`` and reloads the manager's step list."""
    if jax.process_index() == 0:
      for step in steps:
        target = self.directory / f"{CORRUPT_PREFIX}{step}"
        suffix = 0
        while target.exists():
          suffix += 1
          target = self.directory / f"{CORRUPT_PREFIX}{step}.{suffix}"
        os.replace(self.directory / str(step), target)
        _log.warning("moved the damaged checkpoint %s aside to %s", self.directory / str(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("dmpo_jax.checkpointing.set_aside")
    self._manager.reload()

  def _item_path(self, step: int, item: str) -> pathlib.Path:
    return self.directory / str(step) / item

  def _verify_step_files(self, step: int, where: str) -> None:
    """Checks every file of the step against ``file_checksums.json`` (a collective with several
    processes); raises `CheckpointIntegrityError` naming the item and file of each mismatch."""
    folder = self.directory / str(step)
    manifest = _read_manifest(folder / STEP_CHECKSUMS_FILE, where)
    if manifest is None:
      return
    problems = file_digests.verify_files(folder, manifest)
    if problems:
      raise CheckpointIntegrityError(
          f"{where}: " + "; ".join(f"item {p.split('/', 1)[0]!r}: file {folder}/{p}" for p in problems)
          + f" ({_DAMAGED})")

  def _restore_json_item(self, step: int, item: str) -> Any:
    where = f"Checkpoint step {step} in {self.directory}, item {item!r}"
    item_dir = self._item_path(step, item)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except (ValueError, OSError, RecursionError, UnicodeDecodeError) as e:
      raise CheckpointIntegrityError(f"{where}: cannot read {item_dir}: {type(e).__name__}: {e}") from e

  def _restore_step(self, step: int, abstract_state) -> RestoredCheckpoint:
    where = f"Checkpoint step {step} in {self.directory}"
    self._verify_step_files(step, where)
    meta = self._restore_json_item(step, METADATA_ITEM)
    encoded_iterator = self._restore_json_item(step, ITERATOR_ITEM)
    if not isinstance(meta, dict) or not isinstance(encoded_iterator, dict):
      raise CheckpointIntegrityError(f"{where}: the metadata and iterator items must be JSON objects")
    meta = dict(meta)
    key_impls = meta.pop("prng_key_impls", {})
    try:
      iterator_state = _decode_iterator_state(encoded_iterator)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointIntegrityError(f"{where}, item {ITERATOR_ITEM!r}: {e}") from e

    if abstract_state is None:
      return RestoredCheckpoint(self._restore_state(step, None), iterator_state, meta)

    target_keys: dict[str, Any] = {}

    def to_target(path, leaf):
      name = _key_path_str(path)
      if _is_prng_key(leaf):
        if name not in key_impls:
          raise ValueError(f"{where}: state leaf {name!r} is a PRNG key in abstract_state but was "
                           "not saved as one")
        target_keys[name] = leaf
        return _abstract_key_data(leaf)
      return _abstract_leaf(leaf)

    # Every leaf is read straight into its target sharding (each device reads its own shard).
    target = jax.tree_util.tree_map_with_path(to_target, abstract_state)
    _check_target_matches(target, _saved_shapes(self._item_path(step, STATE_ITEM), where), where)
    restored = self._restore_state(step, target)

    def from_data(path, leaf):
      name = _key_path_str(path)
      if name in target_keys:
        return jax.random.wrap_key_data(leaf, impl=key_impls[name])
      return leaf

    state = jax.tree_util.tree_map_with_path(from_data, restored)
    return RestoredCheckpoint(state, iterator_state, meta)

  def _restore_state(self, step: int, target) -> Any:
    """The ``state`` item (``target``: its abstract tree, compared with the saved one before);
    orbax read errors (e.g. damaged compressed chunks) become `CheckpointIntegrityError`."""
    args = ocp.args.StandardRestore() if target is None else ocp.args.StandardRestore(target)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]
    except (ValueError, KeyError, TypeError, OSError) as e:
      raise CheckpointIntegrityError(f"Checkpoint step {step} in {self.directory}, item {STATE_ITEM!r}: "
                                     f"cannot read {self._item_path(step, STATE_ITEM)}: {e}") from e

  # -- lifecycle ---------------------------------------------------------------------------------
  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Preemption
# ------------------------------------------------------------------------------------------------

class PreemptionHandler:
  """Turns SIGTERM (and optionally other signals) into a flag the training loop polls.

  The handler only sets a flag; the loop calls `should_stop()` once per step and, when it is
  True, saves a checkpoint (``force=True``), waits for it and exits. A second delivery of the same
  signal hands it to the previous handler (e.g. the default SIGTERM action kills the process), so
  a stuck job can still be killed. With several JAX processes `should_stop()` is a collective
  (any process signalled -> all stop at the same step); call it at the same point on every process.

  Use as a context manager (restores the previous handlers on exit) or `install()`/`uninstall()`.
  Signal handlers can only be installed from the main thread.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self.signals = tuple(signals)
    self._received: dict[int, int] = {}
    self._previous: dict[int, Any] = {}
    self._stop_requested = False
    self._installed = False

  def _handle(self, signum, frame) -> None:
    self._received[signum] = self._received.get(signum, 0) + 1
    if self._stop_requested and self._received[signum] > 1:
      previous = self._previous.get(signum, signal.SIG_DFL)
      _log.warning("Signal %d received again: passing it to the previous handler", signum)
      self.uninstall()
      if callable(previous):
        previous(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    _log.warning("Signal %d received: the training loop will checkpoint and stop", signum)
    self._stop_requested = True

  def install(self) -> "PreemptionHandler":
    if self._installed:
      return self
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler.install() must be called from the main thread "
                         "(Python only delivers signals there)")
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    self._installed = True
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were active before `install()`."""
    if not self._installed:
      return
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
    self._installed = False

  def request_stop(self) -> None:
    """Sets the flag by hand (e.g. a wall-clock budget ran out)."""
    self._stop_requested = True

  @property
  def stop_requested(self) -> bool:
    """This process's flag (no cross-process agreement)."""
    return self._stop_requested

  def should_stop(self) -> bool:
    """Whether the loop should checkpoint and exit now (agreed across JAX processes)."""
    if jax.process_count() == 1:
      return self._stop_requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(self._stop_requested, dtype=np.int32))
    return bool(np.any(flags))

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
