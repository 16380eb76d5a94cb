"""Limits of a sandbox run, its result, and how a process's end maps to a status (`docs/sandbox.md`).

Trainer side; standard library only.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Dict, Optional, Tuple

# Every status a run can end with; only "passed" passes.
STATUSES = ("passed", "failed", "forbidden", "timeout", "memory_limit", "output_limit", "killed",
            "setup_error", "no_result", "bad_reply", "refused", "cleanup_timeout", "no_code")
# Seconds allowed for killing and reaping a run's processes, on top of the wall limit.
KILL_MARGIN_S = 2.0


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits and isolation of one program run.

  ``file_size_bytes`` bounds each file the program writes and its output; ``disk_bytes`` and
  ``max_inodes`` bound its working folder (with namespaces: a tmpfs). ``use_namespaces`` /
  ``use_landlock``: the isolation layers to try (`docs/sandbox.md` §3); ``require_namespaces``
  makes a run fail when namespaces fail; ``allow_unisolated`` lets a run go on when neither
  namespaces nor Landlock hold (refused otherwise). ``uid``/``gid``: fixed ids for the program
  process instead of a random one per run (trainer as root only). ``temp_root``: where the
  per-run host folders are made (default: the system temporary folder)."""
  cpu_time_s: int = 5
  wall_time_s: float = 10.0
  memory_bytes: int = 1 << 30
  file_size_bytes: int = 1 << 20
  disk_bytes: int = 32 << 20
  max_inodes: int = 4096
  max_open_files: int = 64
  use_namespaces: bool = True
  require_namespaces: bool = False
  use_landlock: bool = True
  allow_unisolated: bool = False
  # The audit hook (layer 6); tests switch it off to check that the OS-level layers hold alone.
  audit_hook: bool = True
  python: Optional[str] = None
  uid: Optional[int] = None
  gid: Optional[int] = None
  temp_root: Optional[str] = None

  def __post_init__(self):
    if not (self.cpu_time_s > 0 and self.wall_time_s > 0):
      raise ValueError(f"time limits must be positive, got cpu_time_s={self.cpu_time_s} "
                       f"wall_time_s={self.wall_time_s}")
    if self.memory_bytes < (64 << 20):
      raise ValueError(f"memory_bytes={self.memory_bytes} is too small for a Python interpreter")
    if self.disk_bytes < (1 << 20) or self.max_inodes < 16:
      raise ValueError(f"disk_bytes={self.disk_bytes} / max_inodes={self.max_inodes} too small")

  @property
  def max_duration_s(self) -> float:
    """Longest a `run_program` call takes: the wall limit for the run, the same again for
    removing its folders (then it stops and reports ``cleanup_timeout``), and a margin for
    killing and reaping the processes. A caller's own timeout must not be shorter."""
    return 2.0 * float(self.wall_time_s) + KILL_MARGIN_S


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  """``status``: one of `STATUSES`. ``protections`` lists the layers that held (as reported by
  the judge process, which runs no untrusted code)."""
  passed: bool
  status: str
  reason: str
  duration_s: float
  output: str = ""
  protections: Dict[str, object] = dataclasses.field(default_factory=dict)


def signal_name(number: int) -> str:
  """``SIGKILL`` for 9, ``SIGRTMIN+6`` for 40: a name for any signal number, never an error."""
  try:
    return signal.Signals(number).name
  except ValueError:
    low, high = getattr(signal, "SIGRTMIN", 34), getattr(signal, "SIGRTMAX", 64)
    if low <= number <= high:
      return f"SIGRTMIN+{number - low}"
    return f"signal {number}"


def classify_exit(code: Optional[int], config: SandboxConfig) -> Optional[Tuple[str, str]]:
  """(status, reason) for the program process's exit code when it explains the failure (a
  signal, the CPU limit), else None. Any integer is accepted."""
  if code is None:
    return None
  if code < 0:
    number = -code
    name = signal_name(number)
    if number in (signal.SIGXCPU, signal.SIGKILL):
      return "timeout", f"CPU-time limit of {config.cpu_time_s}s ({name})"
    if number == signal.SIGXFSZ:
      return "output_limit", f"file-size limit ({name})"
    return "killed", f"the program process was killed by {name}"
  if code == 128 + signal.SIGXCPU:  # the runner's SIGXCPU handler
    return "timeout", f"CPU-time limit of {config.cpu_time_s}s (SIGXCPU)"
  return None
