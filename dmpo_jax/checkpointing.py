"""Checkpoints: the project's model format, resumable training checkpoints, preemption handling.

Two formats (`docs/jax_patterns.md` §10):

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

Integrity: both formats store a checksum of every array and of every JSON file, computed at save
time and verified at restore (`array_checksums`); a mismatch raises `CheckpointIntegrityError`
naming the step (training checkpoints), the item / file and the array. A model checkpoint keeps
them in ``checksums.json``; a training step in its fourth item ``checksums``. Checksums are taken
from the logical (global) value of each array, so they do not depend on how it is sharded.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
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

from dmpo_jax.models import finite
from dmpo_jax.models.config import ModelConfig
from dmpo_jax.models.hf_io import CheckpointError
from dmpo_jax.models.transformer import Transformer

PathLike = Union[str, os.PathLike]

MODEL_CONFIG_FILE = "model_config.json"
MODEL_METADATA_FILE = "metadata.json"
MODEL_PARAMS_DIR = "params"
MODEL_CHECKSUMS_FILE = "checksums.json"

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
  """A saved array or JSON file does not match the checksum written with it (or cannot be read):
  the checkpoint's files were changed or damaged after the save."""


def _word_view(tile: np.ndarray) -> np.ndarray:
  """A host array's raw bits as unsigned words, without copying (unless the tile is not
  contiguous): one word per element (uint8 / uint16 / uint32 for 1-, 2-, 4-byte dtypes); 8-byte
  dtypes give a trailing axis of two uint32 words (low word first on little-endian hosts)."""
  tile = np.ascontiguousarray(tile)
  size = tile.dtype.itemsize
  if tile.dtype.kind == "c" or size not in (1, 2, 4, 8):
    raise TypeError(f"no checksum for dtype {tile.dtype}")
  if size == 8:
    return tile.view(np.uint32).reshape(tile.shape + (2,))
  return tile.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size])


def _tile_sums(tile: np.ndarray, start: tuple[int, ...],
               global_shape: tuple[int, ...]) -> tuple[int, int]:
  """This tile's share of (s1, s2) mod 2^32 (see `array_checksums`) for a tile at offset
  ``start`` of an array of ``global_shape``: one vectorised pass (row sums along the contiguous
  last axis, accumulated in uint32, i.e. mod 2^32), then a small weighted sum over the rows."""
  words = _word_view(tile)
  shape = tuple(global_shape) + words.shape[len(global_shape):]
  start = tuple(start) + (0,) * (len(shape) - len(start))
  if words.ndim == 0:
    words, shape, start = words.reshape(1), (1,), (0,)
  if words.size == 0:
    return 0, 0
  row_sums = words.sum(axis=-1, dtype=np.uint32)  # shape: the tile's leading axes
  row_index = np.zeros(row_sums.shape, np.uint64)
  stride = 1
  for axis in reversed(range(len(shape) - 1)):
    positions = np.arange(start[axis], start[axis] + words.shape[axis], dtype=np.uint64)
    row_index = row_index + (positions * np.uint64(stride)).reshape(
        (-1,) + (1,) * (len(shape) - 2 - axis))
    stride *= shape[axis]
  s1 = int(row_sums.sum(dtype=np.uint64))
  s2 = int(((row_index + np.uint64(1)) * row_sums.astype(np.uint64)).sum(dtype=np.uint64))
  return s1 & 0xFFFFFFFF, s2 & 0xFFFFFFFF


# Tiles larger than this are checksummed in row blocks on several threads.
_CHUNK_BYTES = 32 * 2**20


def _host_pieces(leaf):
  """Yields (host tile, start offset) pieces that together cover ``leaf`` exactly once: for a
  jax.Array this process's addressable shards with ``replica_id == 0`` (every element is owned by
  exactly one replica-0 shard over all processes), copied to the host one at a time (zero-copy
  on CPU); a host value is one piece, on process 0."""
  if isinstance(leaf, jax.Array):
    for shard in leaf.addressable_shards:
      if shard.replica_id == 0:
        yield np.asarray(shard.data), tuple(sl.start or 0 for sl in shard.index)
  elif jax.process_index() == 0:  # the same host value on every process: counted once
    yield np.asarray(leaf), (0,) * np.ndim(leaf)


def _row_blocks(tile: np.ndarray, start: tuple[int, ...]):
  """Splits a large tile along axis 0 into blocks of about `_CHUNK_BYTES` (views, no copy)."""
  if tile.ndim == 0 or tile.nbytes <= _CHUNK_BYTES or tile.shape[0] < 2:
    return [(tile, start)]
  rows = max(1, _CHUNK_BYTES * tile.shape[0] // tile.nbytes)
  return [(tile[i:i + rows], (start[0] + i,) + tuple(start[1:]))
          for i in range(0, tile.shape[0], rows)]


def array_checksums(tree) -> dict[str, dict[str, Any]]:
  """``{leaf path: {"dtype", "shape", "checksum"}}`` for every array leaf of ``tree``.

  Over the raw bits as words (one per element: uint8/16/32 for 1-, 2-, 4-byte dtypes, two uint32
  for 8-byte ones), grouped in rows along the last axis (row r = the r-th index over the leading
  axes, row-major), the checksum is the pair s1 = sum of all words and s2 = sum_r (r + 1) *
  (sum of row r), both mod 2^32. Changing any one word changes s1 (by a non-zero multiple of a
  power of two below 2^32); s2 also changes when rows are moved. Both are sums, so each process
  adds up the shares of its own replica-0 shards on the host (in row blocks on a thread pool:
  numpy releases the GIL) and the shares of all processes are added: the result is the checksum
  of the global value, whatever sharding it is saved from or restored into. With several
  processes this is a collective (an all-gather): call it on every process, like the save itself.
  Typed PRNG keys must be converted to ``key_data`` first.
  """
  flat = _flatten_with_names(tree)
  names = list(flat)
  sums = np.zeros((len(names), 2), np.uint64)
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
    for i, name in enumerate(names):
      global_shape = np.shape(flat[name])
      for tile, start in _host_pieces(flat[name]):
        blocks = _row_blocks(tile, start)
        for s1, s2 in pool.map(lambda block, shape=global_shape: _tile_sums(*block, shape), blocks):
          sums[i] += np.array([s1, s2], np.uint64)
  sums &= np.uint64(0xFFFFFFFF)
  if jax.process_count() > 1:  # uint32 shares (jax may lack 64-bit types), added mod 2^32
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    shares = multihost_utils.process_allgather(sums.astype(np.uint32))
    sums = np.asarray(shares).sum(axis=0, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
  out = {}
  for i, name in enumerate(names):
    leaf = flat[name]
    dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    s1, s2 = (int(v) for v in sums[i])
    out[name] = {"dtype": str(dtype), "shape": list(np.shape(leaf)),
                 "checksum": f"fletcher32x2:{s1:08x}{s2:08x}"}
  return out


def verify_array_checksums(tree, saved: Mapping[str, Mapping[str, Any]], where: str) -> None:
  """Recomputes `array_checksums` of the restored ``tree`` and compares with ``saved``; raises
  `CheckpointIntegrityError` naming ``where`` and every differing array."""
  got = array_checksums(tree)
  problems = []
  for name in sorted(set(got) | set(saved)):
    if name not in saved:
      problems.append(f"array {name!r} has no saved checksum")
    elif name not in got:
      problems.append(f"array {name!r} was not restored")
    elif got[name]["checksum"] != saved[name]["checksum"]:
      problems.append(f"array {name!r} ({saved[name]['dtype']}{tuple(saved[name]['shape'])}): "
                      f"checksum {got[name]['checksum']} != saved {saved[name]['checksum']}")
  if problems:
    raise CheckpointIntegrityError(f"{where}: " + "; ".join(problems) +
                                   " (the files were changed or damaged after the save)")


def json_checksum(value: Any) -> str:
  """SHA-256 of the canonical JSON text of ``value`` (sorted keys, no spaces)."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def _read_json_file(path: pathlib.Path) -> Any:
  """JSON file contents; unreadable or broken JSON raises `CheckpointIntegrityError` naming it."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
    raise CheckpointIntegrityError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from e


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
  checksums = {"params": array_checksums(params), "model_config": json_checksum(config_json),
               "metadata": None if extra_metadata is None else json_checksum(json.loads(metadata_text))}
  # Checkpointer (synchronous): the files exist when this function returns.
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(params_dir, args=ocp.args.StandardSave(params), force=overwrite)
  if jax.process_index() == 0:
    # model_config.json last: its presence marks a complete checkpoint.
    _write_text_atomic(path / MODEL_CHECKSUMS_FILE, json.dumps(checksums, indent=2, sort_keys=True))
    if extra_metadata is not None:
      _write_text_atomic(path / MODEL_METADATA_FILE, metadata_text)
    elif (path / MODEL_METADATA_FILE).exists():
      (path / MODEL_METADATA_FILE).unlink()  # overwrite: no stale metadata beside new weights
    _write_text_atomic(path / MODEL_CONFIG_FILE, json.dumps(config_json, indent=2, sort_keys=True))
  return path


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
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
  _verify_model_json(path, "model_config", data, config_path)
  if not isinstance(data, dict):
    raise CheckpointError(f"{config_path} must hold a JSON object, got {type(data).__name__}")
  return _model_config_from_json(data, config_path)


def _model_checksums(path: pathlib.Path) -> Optional[dict]:
  """The folder's ``checksums.json`` (None, with a warning, for checkpoints saved without one)."""
  checksums_path = path / MODEL_CHECKSUMS_FILE
  if not checksums_path.is_file():
    _log.warning("%s has no %s (saved by an older version): its arrays are not verified", path,
                 MODEL_CHECKSUMS_FILE)
    return None
  checksums = _read_json_file(checksums_path)
  if not isinstance(checksums, dict) or not isinstance(checksums.get("params"), dict):
    raise CheckpointIntegrityError(f"{checksums_path} does not hold a 'params' checksum table")
  return checksums


def _verify_model_json(path: pathlib.Path, key: str, data: Any, file: pathlib.Path) -> None:
  checksums = _model_checksums(path)
  if checksums is None:
    return
  saved = checksums.get(key)
  if saved != json_checksum(data):
    raise CheckpointIntegrityError(
        f"{file}: checksum {json_checksum(data)} != saved {saved} in {path / MODEL_CHECKSUMS_FILE} "
        f"(the file was changed or damaged; after a deliberate edit, delete {MODEL_CHECKSUMS_FILE} "
        "to load it unverified)")


def load_model_metadata(path: PathLike) -> dict:
  """The ``extra_metadata`` saved with a model checkpoint ({} when none was saved)."""
  path = pathlib.Path(path).absolute()
  metadata_path = path / MODEL_METADATA_FILE
  if not metadata_path.is_file():
    return {}
  data = _read_json_file(metadata_path)
  _verify_model_json(path, "metadata", data, metadata_path)
  return data


def _check_saved_shapes(params_dir: pathlib.Path, abstract: dict) -> None:
  """Compares the stored array shapes with the model's; raises naming every mismatching tensor."""
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    stored = checkpointer.metadata(params_dir)
  stored_tree = getattr(stored, "item_metadata", stored)
  stored_tree = getattr(stored_tree, "tree", stored_tree)
  stored_flat = _flatten_with_names(stored_tree)
  expected_flat = _flatten_with_names(abstract)
  problems = []
  for name in sorted(set(expected_flat) - set(stored_flat)):
    problems.append(f"parameter {name!r} is missing from the checkpoint")
  for name in sorted(set(stored_flat) - set(expected_flat)):
    problems.append(f"checkpoint has unexpected parameter {name!r}")
  for name in sorted(set(stored_flat) & set(expected_flat)):
    got = tuple(stored_flat[name].shape)
    want = tuple(expected_flat[name].shape)
    if got != want:
      problems.append(f"parameter {name!r}: checkpoint shape {got} != model shape {want}")
  if problems:
    raise ValueError(f"Model checkpoint {params_dir.parent} does not match its model_config.json: "
                     + "; ".join(problems))


def load_model_checkpoint(path: PathLike, *, mesh: Optional[jax.sharding.Mesh] = None,
                          shardings=None, dtype: Optional[str] = None) -> Transformer:
  """Rebuilds the `Transformer` saved by `save_model_checkpoint`.

  ``shardings``: a pytree of `jax.sharding.Sharding` with the params' structure (an `nnx.State`
  or nested dict, e.g. from `dmpo_jax.sharding`); every array is restored straight into its
  sharding. ``mesh`` without ``shardings``: every array is replicated over the mesh. Neither:
  arrays land on the default device. ``dtype`` overrides the stored ``param_dtype`` (cast on
  restore, e.g. "bfloat16" to load fp32 weights for inference).
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
    if mesh is not None:
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)

  checksums = _model_checksums(path)
  if checksums is not None and dtype is not None:
    # Verify the stored bits, then cast (orbax would cast while reading).
    stored_dtypes = {name: entry["dtype"] for name, entry in checksums["params"].items()}
    target = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, stored_dtypes.get(_key_path_str(p), x.dtype),
                                          sharding=x.sharding), target)
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
  except (ValueError, OSError) as e:
    raise CheckpointIntegrityError(f"Model checkpoint {path}: cannot read {params_dir}: {e}") from e
  if checksums is not None:
    verify_array_checksums(restored, checksums["params"], f"Model checkpoint {path}, {MODEL_PARAMS_DIR}/")
    restored = jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
                            restored, abstract)
  finite.check_finite(restored, f"Model checkpoint {path}")
  abstract_state.replace_by_pure_dict(restored)
  return nnx.merge(graphdef, abstract_state)


# ------------------------------------------------------------------------------------------------
# Training checkpoints
# ------------------------------------------------------------------------------------------------

STATE_ITEM = "state"
ITERATOR_ITEM = "iterator"
METADATA_ITEM = "metadata"
CHECKSUMS_ITEM = "checksums"
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


def _check_target_matches(target, saved_arrays: Mapping[str, Mapping[str, Any]], where: str) -> None:
  """Compares the restore target's leaf names and shapes with the saved checksum table."""
  flat = _flatten_with_names(target)
  problems = [f"{name!r} is not in the checkpoint" for name in sorted(set(flat) - set(saved_arrays))]
  problems += [f"checkpoint has {name!r}, abstract_state does not"
               for name in sorted(set(saved_arrays) - set(flat))]
  problems += [f"{name!r}: checkpoint shape {tuple(saved_arrays[name]['shape'])} != "
               f"abstract_state shape {tuple(flat[name].shape)}"
               for name in sorted(set(flat) & set(saved_arrays))
               if tuple(saved_arrays[name]["shape"]) != tuple(flat[name].shape)]
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

  Layout: ``directory/<step>/{state,iterator,metadata,checksums}``. A save runs in the background
  after the device-to-host copy (``async_save=True``); call `wait_until_finished` before reading
  the files and `close` at the end. The checksums are computed before the background write
  starts, from the values being saved. Only the newest ``max_to_keep`` steps are kept. An
  interrupted save stays a ``<step>.orbax-checkpoint-tmp*`` folder, which
  `latest_step`/`all_steps` ignore and the next save deletes.

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
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self.save_interval_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=create,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=(STATE_ITEM, ITERATOR_ITEM, METADATA_ITEM, CHECKSUMS_ITEM))

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
    """The user metadata saved with ``step`` (e.g. the run config), verified against its
    checksum, without reading the state."""
    checksums = (self._restore_json_item(step, CHECKSUMS_ITEM, None)
                 if self._item_path(step, CHECKSUMS_ITEM).is_dir() else {})
    meta = self._restore_json_item(step, METADATA_ITEM, (checksums or {}).get(METADATA_ITEM))
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
    # Checksums of the values being saved (on device, before the asynchronous write starts); the
    # JSON item is written by the primary process, like the other JSON items.
    checksums = {STATE_ITEM: array_checksums(state_data),
                 ITERATOR_ITEM: json_checksum(encoded_iterator),
                 METADATA_ITEM: json_checksum(meta)}
    return bool(self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state_data),
            ITERATOR_ITEM: ocp.args.JsonSave(encoded_iterator),
            METADATA_ITEM: ocp.args.JsonSave(meta),
            CHECKSUMS_ITEM: ocp.args.JsonSave(checksums),
        }),
        force=True))

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

  def _restore_json_item(self, step: int, item: str, saved_checksum: Optional[str]) -> Any:
    where = f"Checkpoint step {step} in {self.directory}, item {item!r}"
    item_dir = self._item_path(step, item)
    files = sorted(p for p in item_dir.glob("*") if p.is_file() and p.name != "commit_success.txt") \
        if item_dir.is_dir() else []
    try:
      value = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except (ValueError, OSError, RecursionError, UnicodeDecodeError) as e:
      names = ", ".join(str(p) for p in files) or str(item_dir)
      raise CheckpointIntegrityError(f"{where}: cannot read {names}: {type(e).__name__}: {e}") from e
    if saved_checksum is not None and json_checksum(value) != saved_checksum:
      names = ", ".join(str(p) for p in files) or str(item_dir)
      raise CheckpointIntegrityError(f"{where} ({names}): checksum {json_checksum(value)} != saved "
                                     f"{saved_checksum} (the file was changed or damaged)")
    return value

  def _restore_step(self, step: int, abstract_state) -> RestoredCheckpoint:
    where = f"Checkpoint step {step} in {self.directory}"
    if (self._item_path(step, CHECKSUMS_ITEM)).is_dir():
      checksums = self._restore_json_item(step, CHECKSUMS_ITEM, None)
      if not isinstance(checksums, dict) or not isinstance(checksums.get(STATE_ITEM), dict):
        raise CheckpointIntegrityError(f"{where}, item {CHECKSUMS_ITEM!r}: not a checksum table")
    else:
      _log.warning("%s has no checksums (saved by an older version): not verified", where)
      checksums = {}
    meta = self._restore_json_item(step, METADATA_ITEM, checksums.get(METADATA_ITEM))
    encoded_iterator = self._restore_json_item(step, ITERATOR_ITEM, checksums.get(ITERATOR_ITEM))
    if not isinstance(meta, dict) or not isinstance(encoded_iterator, dict):
      raise CheckpointIntegrityError(f"{where}: the metadata and iterator items must be JSON objects")
    meta = dict(meta)
    key_impls = meta.pop("prng_key_impls", {})
    try:
      iterator_state = _decode_iterator_state(encoded_iterator)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointIntegrityError(f"{where}, item {ITERATOR_ITEM!r}: {e}") from e
    saved_arrays = checksums.get(STATE_ITEM)

    if abstract_state is None:
      restored = self._restore_state(step, None)
      if saved_arrays is not None:
        verify_array_checksums(restored, saved_arrays, f"{where}, item {STATE_ITEM!r}")
      return RestoredCheckpoint(restored, iterator_state, meta)

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

    target = jax.tree_util.tree_map_with_path(to_target, abstract_state)
    stored_target = target
    if saved_arrays is not None:
      _check_target_matches(target, saved_arrays, where)
      # Read the stored dtype (verify the stored bits), cast to the requested one afterwards.
      def stored(path, leaf):
        entry = saved_arrays.get(_key_path_str(path))
        if entry is None or entry["dtype"] == str(np.dtype(leaf.dtype)):
          return leaf
        return jax.ShapeDtypeStruct(leaf.shape, np.dtype(entry["dtype"]), sharding=leaf.sharding)
      stored_target = jax.tree_util.tree_map_with_path(stored, target)
    restored = self._restore_state(step, stored_target)
    if saved_arrays is not None:
      verify_array_checksums(restored, saved_arrays, f"{where}, item {STATE_ITEM!r}")
      restored = jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
                              restored, target)

    def from_data(path, leaf):
      name = _key_path_str(path)
      if name in target_keys:
        return jax.random.wrap_key_data(leaf, impl=key_impls[name])
      return leaf

    state = jax.tree_util.tree_map_with_path(from_data, restored)
    return RestoredCheckpoint(state, iterator_state, meta)

  def _restore_state(self, step: int, target) -> Any:
    """The ``state`` item; orbax read errors (e.g. damaged compressed chunks) become
    `CheckpointIntegrityError`, a tree/shape mismatch with ``target`` a ValueError."""
    args = ocp.args.StandardRestore() if target is None else ocp.args.StandardRestore(target)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]
    except (ValueError, KeyError, TypeError) as e:
      if target is not None and not self._item_path(step, CHECKSUMS_ITEM).is_dir():
        # Without the checksum table the tree was not compared beforehand.
        raise ValueError(f"Checkpoint step {step} in {self.directory} does not match abstract_state: {e}") from e
      raise CheckpointIntegrityError(f"Checkpoint step {step} in {self.directory}, item {STATE_ITEM!r}: "
                                     f"cannot read {self._item_path(step, STATE_ITEM)}: {e}") from e
    except OSError as e:
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
