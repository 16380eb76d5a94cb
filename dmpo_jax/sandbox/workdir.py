"""Host folders of sandbox runs: made per run, removed in linear time within a deadline.

Trainer side; standard library only. With namespaces a run's host folder is only the mount point
of its new root (its files live in a tmpfs that vanishes with the namespace); without them the
program writes into it, and it may leave anything there: any depth, any number of entries,
read-only folders, fifos, sockets, symlinks.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from typing import List, Optional, Tuple

_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_DEADLINE_CHECK_EVERY = 256  # entries between two looks at the clock


class _Deadline(Exception):
  pass


def make_folder(config, owner: Optional[Tuple[int, int]], prefix: str) -> str:
  """A fresh 0700 folder under ``config.temp_root``, owned by ``owner`` (uid, gid) when given."""
  path = tempfile.mkdtemp(prefix=prefix, dir=config.temp_root)
  if owner is not None:
    os.chown(path, *owner)
  os.chmod(path, 0o700)
  return path


def _clear(fd: int, deadline: Optional[float]) -> List[str]:
  """Makes the folder ``fd`` writable, removes every entry that is no folder (never following a
  link) and returns the names of the sub-folders."""
  try:
    os.fchmod(fd, 0o700)
  except OSError:
    pass
  folders = []
  with os.scandir(fd) as entries:
    for count, entry in enumerate(entries):
      if deadline is not None and count % _DEADLINE_CHECK_EVERY == 0 and time.monotonic() > deadline:
        raise _Deadline()
      try:
        if entry.is_dir(follow_symlinks=False):
          folders.append(entry.name)
          continue
      except OSError:
        pass
      try:
        os.unlink(entry.name, dir_fd=fd)
      except OSError:
        pass
  return folders


def remove_tree(path: str, deadline: Optional[float] = None) -> bool:
  """Removes ``path`` and everything under it; returns whether it is gone. Never raises.

  Each folder is listed once and each entry removed once (linear in the number of entries, with
  one descriptor open at a time and no recursion: any depth works); folders are made writable
  before they are emptied; links are removed, never followed. ``deadline`` (a
  ``time.monotonic()`` value): past it, stops and returns False with the rest left in place."""
  try:
    fd = os.open(path, _FLAGS)
  except FileNotFoundError:
    return True
  except OSError:
    try:
      os.unlink(path)
      return True
    except OSError:
      return False
  # One level per open folder above the current one: (its name in its parent, sub-folders of
  # the parent still to visit).
  stack: List[Tuple[str, List[str]]] = []
  try:
    pending = _clear(fd, deadline)
    while True:
      if deadline is not None and time.monotonic() > deadline:
        return False
      if pending:
        name = pending.pop()
        try:
          child = os.open(name, _FLAGS, dir_fd=fd)
        except OSError:
          try:
            os.chmod(name, 0o700, dir_fd=fd, follow_symlinks=False)
            child = os.open(name, _FLAGS, dir_fd=fd)
          except OSError:
            continue  # cannot be entered: stays, and so does every folder above it
        stack.append((name, pending))
        os.close(fd)
        fd = child
        pending = _clear(fd, deadline)
        continue
      if not stack:
        break
      name, pending = stack.pop()
      parent = os.open("..", _FLAGS, dir_fd=fd)
      os.close(fd)
      fd = parent
      try:
        os.rmdir(name, dir_fd=fd)
      except OSError:
        pass
  except _Deadline:
    return False
  except Exception:  # pylint: disable=broad-except
    pass
  finally:
    try:
      os.close(fd)
    except OSError:
      pass
  try:
    os.rmdir(path)
  except FileNotFoundError:
    pass
  except OSError:
    return False
  return True


class _Reaper:
  """One background thread that finishes removing folders whose removal ran past a run's
  deadline (so the run ends in time and the folder still goes)."""

  def __init__(self):
    self._queue: "queue.Queue[str]" = queue.Queue()
    self._thread: Optional[threading.Thread] = None
    self._lock = threading.Lock()

  def add(self, path: str) -> None:
    with self._lock:
      if self._thread is None or not self._thread.is_alive():
        self._thread = threading.Thread(target=self._run, name="sandbox-reaper", daemon=True)
        self._thread.start()
    self._queue.put(path)

  def _run(self) -> None:
    while True:
      remove_tree(self._queue.get())
      self._queue.task_done()

  def wait(self) -> None:
    """Blocks until every folder handed over so far is removed (tests, shutdown)."""
    self._queue.join()


REAPER = _Reaper()
