"""A sandbox for model-generated Python code (`tasks.md` §6.3: never run it in the trainer).

Each program runs in its own ``python -I -S`` process, in its own session (process group), with
a fresh temporary working folder and stdin closed. Layers, each applied where the OS allows it:

1. **rlimits** (always): CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file size
   (``RLIMIT_FSIZE``: also bounds the captured output), open files, no core dumps, and
   ``RLIMIT_NPROC = 0`` so no new process or thread can be created.
2. **dropped privileges** (when started as root): uid/gid ``nobody`` (65534), no supplementary
   groups; the working folder is chowned to it. As root the rlimit on processes and file
   permissions would stop nothing, so without this layer root runs are unsafe.
3. **namespaces** (when the process may call ``unshare``, i.e. root with CAP_SYS_ADMIN): a new
   network namespace (no interface is up: no network at all) and a new mount namespace where
   ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` are replaced by empty root-owned read-only
   tmpfs, so nothing world-writable remains outside the working folder. The interpreter's prefix
   is bind-mounted read-only under the new ``/tmp`` so the unprivileged program can still import the
   standard library when the interpreter lives under a private folder such as ``/root``.
4. **audit hook** (always; defence in depth, *not* a security boundary): ``os.system``,
   ``subprocess``, ``fork``/``exec``/``spawn``, sockets, ``ctypes``, signals to other processes, and
   writes, deletions or renames outside the working folder raise ``PermissionError`` and mark the run
   as failed with a reason, even if the program catches the exception.
5. **parent-side**: a wall-clock timeout, then ``SIGKILL`` to the whole process group; the working
   folder is deleted; a result counts only if it carries a per-run nonce written by the runner after
   all tests passed (a program that exits early or closes its descriptors scores 0).

:func:`protection_report` says which layers held on this machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

NOBODY_UID = 65534
NOBODY_GID = 65534
_OUTPUT_FILE = "output.txt"
_PROGRAM_FILE = "program.py"

# The runner is trusted code executed first in the sandbox process; it applies layers 1-4 and
# then executes the program. It reads its settings from argv[1] (JSON) and the nonce from stdin.
_RUNNER = r'''
import json, os, sys, resource
spec = json.loads(sys.argv[1])
nonce = sys.stdin.readline().strip()
os.close(0)
result_fd = spec["result_fd"]
report = {"namespaces": False, "dropped_privileges": False, "errors": []}

def setup():
  if spec["namespaces"] and os.geteuid() == 0:
    try:
      import ctypes
      libc = ctypes.CDLL(None, use_errno=True)
      CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
      MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REMOUNT, MS_REC, MS_PRIVATE = (
          1, 2, 4, 4096, 32, 16384, 1 << 18)
      def mount(source, target, fstype, flags, data):
        if libc.mount(source, target, fstype, flags, data) != 0:
          raise OSError(ctypes.get_errno(), "mount " + target.decode())
      if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
      mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
      # The working folder stays reachable as the current directory after /tmp is covered.
      for folder in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(folder) and not os.path.islink(folder):
          mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=0755")
      prefix_mount = "/tmp/.python"
      os.mkdir(prefix_mount)
      prefix = sys.base_prefix
      mount(prefix.encode(), prefix_mount.encode(), None, MS_BIND | MS_REC, None)
      mount(b"none", prefix_mount.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None)
      for folder in ("/tmp",):
        mount(b"none", folder.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
      moved = lambda p: p.replace(prefix, prefix_mount, 1) if p.startswith(prefix) else p
      sys.path[:] = [moved(p) for p in sys.path]
      for module in list(sys.modules.values()):
        if isinstance(getattr(module, "__path__", None), list):
          module.__path__[:] = [moved(p) for p in module.__path__]
      sys.path_importer_cache.clear()
      report["namespaces"] = True
    except Exception as e:
      report["errors"].append("namespaces: %s" % (e,))
      if spec["require_namespaces"]:
        raise
  limits = spec["limits"]
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
  resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
  resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
  if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    report["dropped_privileges"] = True
  # After the uid change, so setuid is not affected; counts every task of the uid (threads too).
  resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

def send(status, reason):
  message = dict(report, nonce=nonce, status=status, reason=reason[:2000])
  data = json.dumps(message).encode()
  while data:
    data = data[os.write(result_fd, data):]

try:
  setup()
except BaseException as e:
  send("setup_error", "sandbox setup failed: %r" % (e,))
  os._exit(3)

workdir = os.path.realpath(os.getcwd())
violations = []
_FORBIDDEN = ("os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
              "subprocess.Popen", "pty.spawn", "socket.connect", "socket.bind", "socket.sendto",
              "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg",
              "signal.pthread_kill", "os.chroot", "os.setuid", "resource.setrlimit", "sys.addaudithook")
_PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.rename": 1, "os.replace": 1, "os.link": 1,
                "os.symlink": 1, "os.mkdir": 0, "os.chmod": 0, "os.chown": 0, "os.truncate": 0,
                "os.utime": 0, "shutil.rmtree": 0, "os.removexattr": 0, "os.setxattr": 0}

def inside(path):
  if isinstance(path, int):
    return True
  try:
    full = os.path.realpath(os.fsdecode(path))
  except Exception:
    return False
  return full == workdir or full.startswith(workdir + os.sep)

def audit(event, args):
  reason = None
  if event in _FORBIDDEN or event.startswith("os.exec") or event.startswith("os.spawn"):
    reason = event
  elif event == "open":
    path, mode, flags = args
    writing = (mode is not None and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
    if writing and path is not None and not inside(path):
      reason = "write outside the working folder: %r" % (path,)
  elif event in _PATH_EVENTS:
    paths = [args[0]] + ([args[1]] if _PATH_EVENTS[event] else [])
    if not all(inside(p) for p in paths):
      reason = "%s outside the working folder: %r" % (event, paths)
  if reason is not None:
    violations.append(reason)
    raise PermissionError("sandbox: " + reason + " is not allowed")

if spec["audit_hook"]:
  sys.addaudithook(audit)
status, reason = "passed", ""
try:
  with open(spec["program"], "r", encoding="utf-8") as f:
    source = f.read()
  code = compile(source, "program.py", "exec")
  exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except MemoryError:
  status, reason = "memory_limit", "MemoryError (address-space limit)"
except SystemExit as e:
  status, reason = "failed", "program called exit(%r) before its tests finished" % (e.code,)
except BaseException as e:
  status, reason = "failed", "%s: %s" % (type(e).__name__, e)
  if isinstance(e, OSError) and e.errno == 27:
    status = "output_limit"
closed = []
for number, stream in ((1, sys.__stdout__), (2, sys.__stderr__)):
  try:
    os.fstat(number)
    if stream is None or stream.closed:
      raise OSError
  except OSError:
    closed.append(number)
if closed and status == "passed":
  status, reason = "failed", "program closed its standard output/error (fd %s)" % (closed,)
if violations:
  status, reason = "forbidden", "forbidden operation: " + "; ".join(violations[:3])
try:
  sys.stdout.flush()
except BaseException:
  pass
send(status, reason)
os._exit(0)
'''


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits of one program run. ``require_namespaces`` makes a run fail if namespaces fail."""
  cpu_time_s: int = 5
  wall_time_s: float = 10.0
  memory_bytes: int = 1 << 30
  file_size_bytes: int = 1 << 20
  max_open_files: int = 64
  use_namespaces: bool = True
  require_namespaces: bool = False
  # Layer 4; tests switch it off to check that the OS-level layers hold on their own.
  audit_hook: bool = True
  python: Optional[str] = None
  uid: int = NOBODY_UID
  gid: int = NOBODY_GID

  def __post_init__(self):
    if self.cpu_time_s <= 0 or self.wall_time_s <= 0:
      raise ValueError(f"time limits must be positive, got cpu={self.cpu_time_s} "
                       f"wall={self.wall_time_s}")
    if self.memory_bytes < (64 << 20):
      raise ValueError(f"memory_bytes={self.memory_bytes} is too small for a Python interpreter")


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  """``status``: passed, failed, forbidden, timeout, memory_limit, output_limit, killed,
  setup_error or no_result. ``protections`` lists the layers that held."""
  passed: bool
  status: str
  reason: str
  duration_s: float
  output: str = ""
  protections: Dict[str, bool] = dataclasses.field(default_factory=dict)


def _world_traversable(path: pathlib.Path) -> bool:
  """Whether every ancestor folder of ``path`` lets others in (x bit for others)."""
  for parent in list(path.resolve().parents):
    try:
      if not os.stat(parent).st_mode & stat.S_IXOTH:
        return False
    except OSError:
      return False
  return True


def _interpreter(config: SandboxConfig) -> str:
  if config.python:
    return config.python
  if os.geteuid() != 0 or config.use_namespaces and _world_traversable(pathlib.Path(sys.executable)):
    return sys.executable
  if config.use_namespaces and _namespaces_work():
    return sys.executable  # its prefix is bind-mounted into the sandbox
  # Root without namespaces: the dropped uid must be able to read the interpreter.
  for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
    if os.path.exists(candidate) and _world_traversable(pathlib.Path(candidate)):
      return candidate
  raise RuntimeError("no Python interpreter readable by uid nobody; set SandboxConfig.python")


_NAMESPACE_PROBE: Dict[str, bool] = {}


def _namespaces_work() -> bool:
  if "ok" not in _NAMESPACE_PROBE:
    try:
      completed = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True,
                                 timeout=10, check=False)
      _NAMESPACE_PROBE["ok"] = completed.returncode == 0
    except (OSError, subprocess.SubprocessError):
      _NAMESPACE_PROBE["ok"] = False
  return _NAMESPACE_PROBE["ok"]


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def run_program(source: str, config: SandboxConfig = SandboxConfig()) -> ExecutionResult:
  """Runs ``source`` (program and its tests) in the sandbox; ``passed`` iff it ran to the end."""
  start = time.monotonic()
  workdir = tempfile.mkdtemp(prefix="dmpo_sandbox_")
  read_fd, write_fd = os.pipe()
  process = None
  try:
    with open(os.path.join(workdir, _PROGRAM_FILE), "w", encoding="utf-8") as f:
      f.write(source)
    output_path = os.path.join(workdir, _OUTPUT_FILE)
    output = open(output_path, "wb")  # pylint: disable=consider-using-with
    if os.geteuid() == 0:
      for path in (workdir, output_path, os.path.join(workdir, _PROGRAM_FILE)):
        os.chown(path, config.uid, config.gid)
    os.chmod(workdir, 0o700)
    nonce = secrets.token_hex(16)
    spec = {"result_fd": write_fd, "program": _PROGRAM_FILE, "namespaces": config.use_namespaces,
            "require_namespaces": config.require_namespaces, "audit_hook": config.audit_hook,
            "uid": config.uid, "gid": config.gid,
            "limits": {"cpu": int(config.cpu_time_s), "memory": int(config.memory_bytes),
                       "fsize": int(config.file_size_bytes), "nofile": int(config.max_open_files)}}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": workdir, "TMPDIR": workdir}
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [_interpreter(config), "-I", "-S", "-c", _RUNNER, json.dumps(spec)], cwd=workdir,
        stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env=env,
        pass_fds=(write_fd,), start_new_session=True, close_fds=True)
    output.close()
    os.close(write_fd)
    write_fd = -1
    try:
      process.stdin.write((nonce + "\n").encode())
      process.stdin.close()
    except (BrokenPipeError, OSError):
      pass
    timed_out = False
    try:
      process.wait(timeout=config.wall_time_s)
    except subprocess.TimeoutExpired:
      timed_out = True
    _kill_group(process)
    process.wait()
    message = _read_result(read_fd)
    duration = time.monotonic() - start
    text = _read_head(output_path)
    protections = {k: bool(message.get(k)) for k in ("namespaces", "dropped_privileges")}
    protections["rlimits"] = True
    if timed_out:
      return ExecutionResult(False, "timeout", f"wall-clock limit of {config.wall_time_s}s",
                             duration, text, protections)
    if message.get("nonce") == nonce:
      status = message["status"]
      return ExecutionResult(status == "passed", status, message.get("reason", ""), duration, text,
                             protections)
    code = process.returncode
    if code is not None and code < 0:
      name = signal.Signals(-code).name
      if -code in (signal.SIGXCPU, signal.SIGKILL):
        return ExecutionResult(False, "timeout", f"CPU-time limit of {config.cpu_time_s}s ({name})",
                               duration, text, protections)
      if -code == signal.SIGXFSZ:
        return ExecutionResult(False, "output_limit", f"file-size limit ({name})", duration, text,
                               protections)
      return ExecutionResult(False, "killed", f"killed by {name}", duration, text, protections)
    return ExecutionResult(False, "no_result", f"exit code {code} without a valid result (the "
                           "program exited early or closed the result channel)", duration, text,
                           protections)
  finally:
    if process is not None and process.poll() is None:
      _kill_group(process)
      process.wait()
    if write_fd >= 0:
      os.close(write_fd)
    os.close(read_fd)
    shutil.rmtree(workdir, ignore_errors=True)


def _read_result(fd: int, limit: int = 1 << 16) -> dict:
  chunks, size = [], 0
  while size < limit:
    ready, _, _ = select.select([fd], [], [], 1.0)
    if not ready:
      break
    chunk = os.read(fd, limit - size)
    if not chunk:
      break
    chunks.append(chunk)
    size += len(chunk)
  try:
    return json.loads(b"".join(chunks).decode("utf-8", "replace"))
  except ValueError:
    return {}


def _read_head(path: str, limit: int = 2000) -> str:
  try:
    with open(path, "rb") as f:
      return f.read(limit).decode("utf-8", "replace")
  except OSError:
    return ""


def run_programs(sources: Sequence[str], config: SandboxConfig = SandboxConfig(),
                 max_workers: Optional[int] = None) -> List[ExecutionResult]:
  """Runs programs in parallel (threads that each wait on one sandbox process), in input order."""
  workers = max_workers or max(1, min(len(sources), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda s: run_program(s, config), sources))


def protection_report(config: SandboxConfig = SandboxConfig()) -> Dict[str, object]:
  """Runs a probe program and reports which layers hold on this machine."""
  probe = run_program("import os\nprint(os.getuid())\n", config)
  return {"euid": os.geteuid(), "interpreter": _interpreter(config), "status": probe.status,
          "reason": probe.reason, **probe.protections}
