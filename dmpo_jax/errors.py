"""The errors the library raises for a user's mistake or a failed environment, and the helpers that
turn a low-level failure into ONE line naming the problem.

* `UserError` (exit code 2): a mistake in the command line, a config or an input file;
* `Fault` (exit code 1): the environment failed (a read-only or full disk, a file where a folder
  belongs, a missing permission), named with the path and the operation.

The CLI layer (`run_main` in `cli.py`) prints them as ``error: <message>`` and exits with their
``exit_code``; the library raises them and never imports the CLI layer.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
from typing import Iterator, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_FAULT = 1


class UserError(Exception):
  """A mistake in the command line, a config or an input file (not a bug).

  `cli.run_main` prints it as ``error: <message>`` on one line and exits with `exit_code` (2).
  """
  exit_code = EXIT_USER_ERROR


class Fault(UserError):
  """The environment failed (disk full, read-only or missing permission, a file where a folder
  belongs): one line naming the path and the operation, exit code 1."""
  exit_code = EXIT_FAULT


# errno values of a failed write: the disk is full or read-only, a permission is missing, a file
# is where a folder belongs (or the reverse), the device fails.
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG", "ENOTDIR", "EISDIR", "EIO")
                         if hasattr(errno, name))
# errno values of a file-system fault (as opposed to a bug): reported as one `Fault` line.
FILESYSTEM_ERRNOS = WRITE_ERRNOS | frozenset(getattr(errno, name) for name in (
    "EEXIST", "ENOENT", "ENAMETOOLONG", "ENOTEMPTY", "EBUSY", "ETXTBSY") if hasattr(errno, name))


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line (a `KeyError`'s key without its quotes)."""
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = str(error.args[0])
  else:
    text = str(error) or type(error).__name__
  return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def filesystem_fault(operation: str, path, error: OSError) -> Fault:
  """``cannot <operation> <path>: <reason>`` for an OSError of a file-system call."""
  reason = error.strerror or one_line(error)
  where = error.filename if error.filename not in (None, "") else path
  extra = f" ({where})" if str(where) != str(path) else ""
  return Fault(f"cannot {operation} {path}{extra}: {reason}")


@contextlib.contextmanager
def file_operation(operation: str, path) -> Iterator[None]:
  """Reports an `OSError` raised inside as a `Fault` naming ``operation`` (e.g. "write the
  checkpoint") and ``path``: ``error: cannot write the checkpoint runs/x/checkpoints: No space
  left on device``."""
  try:
    yield
  except UserError:
    raise
  except OSError as e:
    raise filesystem_fault(operation, path, e) from e


@contextlib.contextmanager
def user_input(what: str, *errors: type) -> Iterator[None]:
  """Reports the failures of reading user input (``what``: e.g. "model checkpoint") as a
  `UserError`: by default `ValueError` (malformed files, `CheckpointError`), `OSError` (missing
  files) and `KeyError` (missing fields)."""
  try:
    yield
  except UserError:
    raise
  except (errors or (ValueError, OSError, KeyError)) as e:
    raise UserError(f"{what}: {one_line(e)}") from e


def check(condition: bool, message: str) -> None:
  """Raises a `UserError` with ``message`` unless ``condition``."""
  if not condition:
    raise UserError(message)


def closest(name: str, known: Sequence[str]) -> str:
  """`` (did you mean 'x'?)`` for the closest known name, or ``""``."""
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


def model_folder_problem(path: str) -> Optional[str]:
  """Why ``path`` is no model folder (None when it is one): a model is an HF folder (with
  ``config.json``) or a checkpoint written by this project (``model_config.json`` + ``params/``)."""
  expected = ("expected an HF folder with config.json or a dmpo_jax model checkpoint with "
              "model_config.json")
  if not os.path.exists(path):
    return f"{path} does not exist"
  if not os.path.isdir(path):
    return f"{path} is a file, not a model folder ({expected})"
  if not any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model_config.json")):
    return f"{path} is not a model folder ({expected})"
  return None
