"""Checkpoint integrity from the written files: SHA-256 digests of every file, taken on the host
once the files are on disk and checked before anything is read back (`docs/checkpoints.md` §3).

Nothing here touches an accelerator: a save's digests are computed from the files orbax wrote
(for training checkpoints in orbax's background commit thread, so the training step never waits
for them), and a restore checks the files before orbax reads them. The digests describe the
bytes on disk, so they do not depend on the sharding a checkpoint is saved from or restored into.

Each file is hashed in segments of `SEGMENT_BYTES` (one SHA-256 per segment, the segments of all
files on a thread pool: hashlib releases the GIL), so one large file is hashed by several cores and
a mismatch names the byte range. A manifest is JSON::

  {"format": FORMAT, "segment_bytes": n,
   "files": {"<path relative to the checkpoint folder>": {"bytes": size, "sha256": [hex, ...]}}}

With several JAX processes, `verify_files` is a collective: each process hashes every P-th file
and the verdicts are exchanged (`multihost_utils.process_allgather`), so every process raises the
same error.

A restore reads the manifest (`_read_manifest`) and raises `CheckpointIntegrityError` naming the
damaged files (`_check_files`); `saved_shapes` reads the array shapes an orbax item stores, so a
restore target is compared with them before any array is read.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dmpo_jax.models.hf_io import CheckpointError

_log = logging.getLogger(__name__)

FORMAT = "dmpo_jax.file_sha256.v1"
SEGMENT_BYTES = 64 * 2**20
_READ_BYTES = 8 * 2**20

# Verdict codes exchanged between processes (`verify_files`).
_OK, _MISSING, _SIZE, _DIGEST = 0, 1, 2, 3


def _segment_sha256(path: pathlib.Path, offset: int, length: int) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    f.seek(offset)
    remaining = length
    while remaining > 0:
      block = f.read(min(remaining, _READ_BYTES))
      if not block:
        break
      digest.update(block)
      remaining -= len(block)
  return digest.hexdigest()


def _segments(size: int, segment_bytes: int) -> list[tuple[int, int]]:
  """(offset, length) of each segment; an empty file has one empty segment."""
  return [(offset, min(segment_bytes, size - offset))
          for offset in range(0, max(size, 1), segment_bytes)]


def list_files(root: pathlib.Path, entries: Iterable[str]) -> list[str]:
  """Sorted POSIX paths, relative to ``root``, of every regular file in the folders (or the
  files) ``entries`` under ``root``; entries that do not exist are skipped."""
  root = pathlib.Path(root)
  names = set()
  for entry in entries:
    path = root / entry
    if path.is_file():
      names.add(path.relative_to(root).as_posix())
    elif path.is_dir():
      names.update(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file())
  return sorted(names)


def digest_files(root: pathlib.Path, names: Iterable[str], *,
                 segment_bytes: int = SEGMENT_BYTES) -> dict[str, dict[str, Any]]:
  """``{name: {"bytes": size, "sha256": [segment digests]}}`` of the files ``root/name``."""
  root = pathlib.Path(root)
  names = list(names)
  sizes = {name: (root / name).stat().st_size for name in names}
  jobs = [(name, offset, length) for name in names
          for offset, length in _segments(sizes[name], segment_bytes)]
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
    digests = list(pool.map(lambda job: _segment_sha256(root / job[0], job[1], job[2]), jobs))
  out = {name: {"bytes": sizes[name], "sha256": []} for name in names}
  for (name, _, _), digest in zip(jobs, digests):
    out[name]["sha256"].append(digest)
  return out


def digest_bytes(data: bytes, *, segment_bytes: int = SEGMENT_BYTES) -> dict[str, Any]:
  """The manifest entry of a file that will hold exactly ``data``."""
  return {"bytes": len(data),
          "sha256": [hashlib.sha256(data[offset:offset + length]).hexdigest()
                     for offset, length in _segments(len(data), segment_bytes)]}


def make_manifest(files: Mapping[str, Mapping[str, Any]], *,
                  segment_bytes: int = SEGMENT_BYTES) -> dict[str, Any]:
  return {"format": FORMAT, "segment_bytes": segment_bytes, "files": dict(files)}


def manifest_problem(manifest: Any) -> Optional[str]:
  """Why ``manifest`` (parsed JSON) is not a manifest of this format, or None."""
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    return f"not a {FORMAT} manifest"
  files = manifest.get("files")
  segment = manifest.get("segment_bytes")
  if not isinstance(segment, int) or segment < 1 or not isinstance(files, dict) or not all(
      isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), list)
      for e in files.values()):
    return "malformed manifest (segment_bytes / files entries)"
  return None


def _local_verdicts(root: pathlib.Path, files: Mapping[str, Mapping[str, Any]], names: list[str],
                    segment_bytes: int) -> dict[str, tuple[int, int]]:
  """(code, first bad segment) of each of ``names``; the segments of all files are hashed on
  one thread pool, like `digest_files`."""
  verdicts, jobs = {}, []
  for name in names:
    try:
      size = (root / name).stat().st_size
    except OSError:
      verdicts[name] = (_MISSING, 0)
      continue
    segments = _segments(size, segment_bytes)
    if size != files[name]["bytes"] or len(files[name]["sha256"]) != len(segments):
      verdicts[name] = (_SIZE, 0)
      continue
    verdicts[name] = (_OK, 0)
    jobs += [(name, index, offset, length) for index, (offset, length) in enumerate(segments)]

  def check(job):
    name, index, offset, length = job
    try:
      return _segment_sha256(root / name, offset, length) == files[name]["sha256"][index]
    except OSError:
      return None

  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
    for (name, index, _, _), ok in zip(jobs, pool.map(check, jobs)):
      if ok is None:
        verdicts[name] = (_MISSING, 0)
      elif not ok and (verdicts[name][0] == _OK or index < verdicts[name][1]):
        verdicts[name] = (_DIGEST, index)
  return verdicts


def verify_files(root: pathlib.Path, manifest: Mapping[str, Any], *, collective: bool = True,
                 names: Optional[Iterable[str]] = None) -> list[str]:
  """Checks the files of ``manifest`` under ``root``; returns one line per damaged file (empty
  when all match): ``"<name>: missing"``, ``"<name>: <size> bytes, saved <n>"`` or ``"<name>:
  bytes [a, b) differ from the saved SHA-256"``.

  ``names``: check only these manifest entries (default: all). ``collective`` (with several JAX
  processes): the files are split between the processes and the verdicts exchanged, so this must
  be called on every process; otherwise this process checks every file itself.
  """
  segment_bytes = int(manifest["segment_bytes"])
  files = manifest["files"]
  names = sorted(files if names is None else names)
  processes = jax.process_count() if collective else 1
  mine = names[jax.process_index()::processes] if processes > 1 else names
  local = _local_verdicts(root, files, mine, segment_bytes)
  verdicts = np.asarray([local.get(name, (_OK, 0)) for name in names], np.int32).reshape(-1, 2)
  if processes > 1 and names:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    verdicts = np.asarray(multihost_utils.process_allgather(verdicts)).sum(axis=0)
  problems = []
  for name, (code, segment) in zip(names, verdicts.tolist()):
    if code == _MISSING:
      problems.append(f"{name}: missing or unreadable")
    elif code == _SIZE:
      size = (root / name).stat().st_size if (root / name).is_file() else "?"
      problems.append(f"{name}: {size} bytes, saved {files[name]['bytes']}")
    elif code == _DIGEST:
      start = segment * segment_bytes
      end = min(start + segment_bytes, files[name]["bytes"])
      problems.append(f"{name}: bytes [{start}, {end}) differ from the saved SHA-256")
  return problems


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_json_atomic(path: pathlib.Path, value: Any) -> None:
  """Writes JSON to ``path`` atomically (`write_bytes_atomic`)."""
  write_bytes_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# Verification at restore
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
  problem = manifest_problem(manifest)
  if problem:
    raise CheckpointIntegrityError(f"{manifest_path}: {problem}")
  return manifest


def _check_files(root: pathlib.Path, manifest: Optional[dict], where: str, *,
                 names: Optional[list[str]] = None, collective: bool = True) -> None:
  """Raises `CheckpointIntegrityError` (``where``: damaged file(s) ...) when a file under ``root``
  differs from ``manifest`` (`verify_files`)."""
  if manifest is None:
    return
  problems = verify_files(root, manifest, names=names, collective=collective)
  if problems:
    raise CheckpointIntegrityError(
        f"{where}: " + "; ".join(f"file {root}/{p}" for p in problems) + f" ({_DAMAGED})")


def flatten_with_names(tree) -> dict[str, Any]:
  """``{"a.b.0": leaf}``: leaves by their dotted key path (the names checkpoints store)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}


def saved_shapes(item_dir: pathlib.Path, where: str) -> dict[str, tuple]:
  """``{leaf name: shape}`` of an orbax pytree item, from its metadata (no array is read)."""
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      stored = checkpointer.metadata(item_dir)
  except (ValueError, OSError, KeyError, TypeError) as e:
    raise CheckpointIntegrityError(f"{where}: cannot read the metadata of {item_dir}: {e}") from e
  stored_tree = getattr(stored, "item_metadata", stored)
  stored_tree = getattr(stored_tree, "tree", stored_tree)
  return {name: tuple(leaf.shape) for name, leaf in flatten_with_names(stored_tree).items()}
