"""Resumable training checkpoints (`TrainCheckpointer`, `docs/checkpoints.md` §2): an
`ocp.CheckpointManager` folder with one sub-folder per step holding the items ``state`` (params,
opt_state, step, RNG keys, ... any pytree; typed PRNG keys are stored as their raw ``key_data``),
``iterator`` (the data iterator's ``get_state()`` as JSON), ``metadata`` (consumed-prompt count +
the run config as JSON) and ``file_checksums.json`` (`integrity`), written by orbax's background
commit thread before the step folder is renamed (so the save call never waits for it and a
visible step always has its digests). Orbax writes every step into
``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a crash mid-save leaves the
previous checkpoint as the latest one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pathlib
from typing import Any, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dmpo_jax.checkpointing import integrity
from dmpo_jax.checkpointing.integrity import (
    _DAMAGED, CheckpointIntegrityError, _read_manifest, flatten_with_names)

PathLike = Union[str, os.PathLike]

STEP_CHECKSUMS_FILE = "file_checksums.json"
STATE_ITEM = "state"
ITERATOR_ITEM = "iterator"
METADATA_ITEM = "metadata"
STEP_ITEMS = (STATE_ITEM, ITERATOR_ITEM, METADATA_ITEM)
CORRUPT_PREFIX = "corrupt-"
_RESERVED_METADATA_KEYS = ("consumed_prompts", "checkpoint_step", "prng_key_impls")

_log = logging.getLogger(__name__)


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=".")


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
      impls[_leaf_name(path)] = _prng_key_impl_name(leaf)
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


# Not grain's `grain.checkpoint.CheckpointSave/Restore`: they take the live iterator (the loop
# hands over its `get_state()`) and write another item format, so existing runs could not resume.
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
  flat = flatten_with_names(target)
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
    # writing the files and renaming the step folder into place. The save policy is explicit:
    # orbax's default one also saves the first step of a fresh run (`InitialSavePolicy`).
    policy = checkpoint_managers.AnySavePolicy([
        checkpoint_managers.FixedIntervalPolicy(self.save_interval_steps),
        checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy,
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
    """True when ``step`` is newer than every checkpoint (saved or in flight) and a multiple of
    ``save_interval_steps``, or JAX's preemption sync point is reached (`reached_preemption`)."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's preemption service reached its sync point at ``step`` (multi-process runs
    with the coordination service; False otherwise): every process then saves and stops."""
    return self._manager.reached_preemption(step)

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
    names = integrity.list_files(folder, STEP_ITEMS)
    if not names:
      raise FileNotFoundError(f"checkpoint step {step}: no files found in {folder}")
    manifest = integrity.make_manifest(integrity.digest_files(folder, names))
    integrity.write_json_atomic(folder / STEP_CHECKSUMS_FILE, manifest)

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
    # The barrier name must be unique per run: it names the steps set aside.
    ocp.multihost.sync_global_processes(
        "dmpo_jax.checkpointing.set_aside." + "-".join(str(s) for s in steps))
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
    problems = integrity.verify_files(folder, manifest)
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
      name = _leaf_name(path)
      if _is_prng_key(leaf):
        if name not in key_impls:
          raise ValueError(f"{where}: state leaf {name!r} is a PRNG key in abstract_state but was "
                           "not saved as one")
        target_keys[name] = leaf
        return _abstract_key_data(leaf)
      return _abstract_leaf(leaf)

    # Every leaf is read straight into its target sharding (each device reads its own shard).
    target = jax.tree_util.tree_map_with_path(to_target, abstract_state)
    _check_target_matches(target, integrity.saved_shapes(self._item_path(step, STATE_ITEM), where), where)
    restored = self._restore_state(step, target)

    def from_data(path, leaf):
      name = _leaf_name(path)
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

