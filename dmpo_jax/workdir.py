"""The run folder (``--workdir``): one run at a time, the run's config record, atomic outputs.

* `RunFolder` checks the path (set, a folder, writable), creates it and holds an exclusive
  ``fcntl.flock`` on ``<workdir>/.lock`` for the whole run. A second run on the same workdir is
  refused with one line naming the process that holds it (pid, host and start time, which the
  holder writes into the lock file). The kernel drops the lock when its process ends, kill -9
  included, so a lock file left behind never blocks a later run. A folder the run created and
  left with nothing but the lock file (the run stopped at a config, data or model error) is
  removed again.
* The run record ``run_config.json`` holds the config a run started with (`write_run_config`);
  a re-run compares against it (`config_differences`).
* `publish_folder` puts a completed folder under its final name with a rename, so a reader sees
  either the previous folder or the complete new one, never a partial one
  (`temporary_sibling` names the folder to write first).

File-system failures become one `errors.Fault` line naming the path and the operation.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from dmpo_jax import errors

PathLike = Union[str, os.PathLike]

LOCK_FILE = ".lock"
RUN_CONFIG_FILE = "run_config.json"
TEMPORARY_MARKER = ".tmp"


def check_path(workdir: PathLike) -> pathlib.Path:
  """The workdir as a path; an empty value or a file in its place is a `errors.UserError`."""
  if workdir is None or not str(workdir).strip():
    raise errors.UserError("--workdir is empty: give the run folder, e.g. --workdir=runs/demo")
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise errors.UserError(f"--workdir {workdir} is a file, not a folder: give a folder for the run's "
                        "checkpoints and metrics")
  return path


class RunFolder:
  """Creates and locks a workdir for one run (see the module docstring). Use as a context
  manager; with ``lock=False`` (the processes other than 0 of a multi-host run) it only checks
  the path."""

  def __init__(self, workdir: PathLike, *, lock: bool = True):
    self.path = check_path(workdir)
    self.lock_path = self.path / LOCK_FILE
    self._lock = lock
    self._file = None
    self._created = False
    self._locked = False

  def __enter__(self) -> "RunFolder":
    if not self._lock:
      return self
    self._created = not self.path.exists()
    with errors.file_operation("create the workdir", self.path):
      self.path.mkdir(parents=True, exist_ok=True)
    try:
      with errors.file_operation("write the lock file of the workdir", self.lock_path):
        self._file = open(self.lock_path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
      try:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError as e:
        self._file.seek(0)
        holder = self._file.read().strip()
        raise errors.UserError(
            f"--workdir {self.path} is in use by another run ({_describe_holder(holder)}); wait "
            "for it to finish or stop it, or use another --workdir") from e
      self._locked = True
      with errors.file_operation("write the lock file of the workdir", self.lock_path):
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        self._file.flush()
    except BaseException:
      self._cleanup()
      raise
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is not None:
      self._cleanup()
    self._release()

  def _release(self) -> None:
    if self._file is not None:
      if self._locked:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None
      self._locked = False

  def _cleanup(self) -> None:
    """Removes a folder this run created (and still holds the lock of) when it holds nothing but
    the lock file."""
    remove = (self._created and self._locked and self.path.is_dir()
              and {p.name for p in self.path.iterdir()} <= {LOCK_FILE})
    if remove:
      self.lock_path.unlink(missing_ok=True)  # while locked: no other run holds this file
      shutil.rmtree(self.path, ignore_errors=True)
    self._release()


def _describe_holder(text: str) -> str:
  try:
    holder = json.loads(text)
    return f"process {holder['pid']} on host {holder['host']}, started {holder['started']}"
  except (ValueError, KeyError, TypeError):
    return "a process that has not written its id yet"


# ------------------------------------------------------------------------------------------------
# The run record
# ------------------------------------------------------------------------------------------------

def write_run_config(workdir: PathLike, config_json: Mapping[str, Any]) -> None:
  """Records the config a fresh run starts with (``run_config.json``, written atomically)."""
  path = pathlib.Path(workdir) / RUN_CONFIG_FILE
  write_text_atomic(path, json.dumps(dict(config_json), indent=2, sort_keys=True) + "\n",
                    operation="write the run record")


def read_run_config(workdir: PathLike) -> Optional[dict]:
  """The recorded config, or None when there is none (a workdir of an older version) or it is
  unreadable."""
  path = pathlib.Path(workdir) / RUN_CONFIG_FILE
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
  node: Any = tree
  for part in dotted.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                       keys: Optional[Sequence[str]] = None,
                       ignore: Sequence[str] = ()) -> list[str]:
  """``key: recorded -> current`` for every dotted key (``keys``, default: every leaf of either
  config; a key names a leaf or a whole block) whose JSON values differ, minus the ``ignore``d
  keys and blocks."""
  if keys is None:
    keys = sorted(set(_leaves(recorded)) | set(_leaves(current)))
  ignored = tuple(ignore)
  out = []
  for key in keys:
    if any(key == i or key.startswith(i + ".") for i in ignored):
      continue
    old, new = _get(recorded, key), _get(current, key)
    if old != new:
      out.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
  return out


# ------------------------------------------------------------------------------------------------
# Atomic outputs
# ------------------------------------------------------------------------------------------------

def temporary_sibling(target: PathLike, unique: bool = True) -> pathlib.Path:
  """``<parent>/.<name>.tmp[-<pid>]``: where to write ``target`` before `publish_folder` (the
  same name on every process when ``unique`` is False, for a collective write)."""
  target = pathlib.Path(target)
  suffix = f"{TEMPORARY_MARKER}-{os.getpid()}" if unique else TEMPORARY_MARKER
  return target.with_name(f".{target.name}{suffix}")


def remove_temporaries(target: PathLike) -> None:
  """Deletes what interrupted writes of ``target`` left behind (`temporary_sibling` folders and
  the previous version set aside by `publish_folder`)."""
  target = pathlib.Path(target)
  if not target.parent.is_dir():
    return
  for pattern in (f".{target.name}{TEMPORARY_MARKER}*", f".{target.name}.old-*"):
    for path in target.parent.glob(pattern):
      if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
      else:
        path.unlink(missing_ok=True)


def publish_folder(temporary: PathLike, target: PathLike) -> pathlib.Path:
  """Renames the completed folder ``temporary`` to ``target``, replacing an existing ``target``
  (set aside first, then deleted: a crash in between leaves no ``target``, never a mixed one)."""
  temporary, target = pathlib.Path(temporary), pathlib.Path(target)
  with errors.file_operation("publish", target):
    old = None
    if target.exists():
      old = target.with_name(f".{target.name}.old-{os.getpid()}")
      os.replace(target, old)
    os.replace(temporary, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return target


def write_text_atomic(path: PathLike, text: str, operation: str = "write") -> None:
  """Writes ``text`` to a temporary file next to ``path`` and renames it (readers never see a
  partial file; a failed write leaves the old file and no temporary)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}{TEMPORARY_MARKER}-{os.getpid()}")
  try:
    with errors.file_operation(operation, path):
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


# ------------------------------------------------------------------------------------------------
# Storage faults of array writers (orbax / tensorstore)
# ------------------------------------------------------------------------------------------------

# tensorstore (under orbax) reports a failed file write as a ValueError whose text ends with
# "[os_error_code='28']" instead of an OSError.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?")
_TENSORSTORE_FILE = re.compile(r'Failed (?:writing|to write)[^"]*"([^"]+)"')


def os_error_of(error: BaseException) -> Optional[OSError]:
  """The `OSError` behind ``error``: itself, its cause or context, or one rebuilt from a
  tensorstore message; None for other errors."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error
    match = _OS_ERROR_CODE.search(str(error))
    if match:
      code = int(match.group(1))
      file_match = _TENSORSTORE_FILE.search(str(error))
      return OSError(code, os.strerror(code), file_match.group(1) if file_match else None)
    error = error.__cause__ or error.__context__
  return None


class _StorageErrorFilter(logging.Filter):
  """Drops orbax's ERROR records (with tracebacks, one per background thread) about a file
  write that failed in the operating system: `storage_operation` reports it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return not _OS_ERROR_CODE.search(text)


def _is_closed_loop_callback(error: BaseException) -> bool:
  """The error of a tensorstore write callback that arrives after orbax closed its event loop
  (orbax stops the loop at the first failed write while other writes are in flight)."""
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


@contextlib.contextmanager
def quiet_storage_error_logs() -> Iterator[None]:
  """While active, orbax's own multi-line reports of failed file writes are not printed: its
  ERROR log records of them, and the tracebacks of the write callbacks that arrive after it
  closed its event loop (printed through `sys.excepthook`); `storage_operation` reports the
  failure in one line."""
  log_filter = _StorageErrorFilter()
  logger = logging.getLogger("absl")
  logger.addFilter(log_filter)
  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def hook(kind, error, tb):
    if not _is_closed_loop_callback(error):
      previous_hook(kind, error, tb)

  def unraisable(report):
    if not _is_closed_loop_callback(report.exc_value):
      previous_unraisable(report)

  sys.excepthook, sys.unraisablehook = hook, unraisable
  try:
    yield
  finally:
    sys.excepthook, sys.unraisablehook = previous_hook, previous_unraisable
    logger.removeFilter(log_filter)


@contextlib.contextmanager
def storage_operation(operation: str, path: PathLike, note: str = "") -> Iterator[None]:
  """Like `errors.file_operation`, for array writers too (orbax reports the operating system's error
  inside a ValueError): ``cannot <operation> <path> (<file>): <reason>[; <note>]``."""
  try:
    yield
  except errors.UserError:
    raise
  except (OSError, ValueError) as e:
    os_error = os_error_of(e)
    if os_error is None or os_error.errno not in errors.WRITE_ERRNOS:
      raise
    fault = errors.filesystem_fault(operation, path, os_error)
    raise errors.Fault(f"{fault}; {note}" if note else str(fault)) from e


# The suffix orbax gives a checkpoint step while it is written (renamed when complete).
ORBAX_TEMPORARY_MARKER = ".orbax-checkpoint-tmp"


def remove_incomplete_checkpoints(directory: PathLike, settle_s: float = 0.2,
                                  timeout_s: float = 5.0) -> None:
  """Deletes the step folders of saves that failed (``<step>.orbax-checkpoint-tmp*``) after a
  write error; complete steps are not touched. Writes of the failed save that were still in
  flight may create files again after a deletion, so the folder is checked again after
  ``settle_s`` seconds without new files (up to ``timeout_s``)."""
  directory = pathlib.Path(directory)
  deadline = time.monotonic() + timeout_s
  quiet_since = None
  while directory.is_dir() and time.monotonic() < deadline:
    leftovers = list(directory.glob(f"*{ORBAX_TEMPORARY_MARKER}*"))
    if leftovers:
      for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
      quiet_since = None
    elif quiet_since is None:
      quiet_since = time.monotonic()
    elif time.monotonic() - quiet_since >= settle_s:
      return
    time.sleep(settle_s / 4)
