"""A sandbox for model-generated Python code whose verdict the code cannot reach (`docs/tasks.md` §6.5).

**Design.** Each run uses two fresh ``python -I -S`` processes started from
``sandbox_runner.py``, each in its own session:

* the *program process* executes the untrusted program, then waits for calls of its functions;
* the *judge process* executes the trusted test code (from the dataset). Every name the tests
  call that belongs to the program (``TestSuite.calls``, e.g. HumanEval's entry point, MBPP's
  function) is a proxy in the judge: its arguments are sent to the program process as plain
  data, the program's function runs *there*, and the result comes back as a tagged tree of plain
  data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, range,
  deque, OrderedDict, Counter; iterators as their items) that the judge rebuilds with its own
  constructors. The judge runs ``assert`` and every comparison on these values and writes the
  verdict (with a per-run nonce) to a socket that only it and the trainer hold (a socket, unlike a
  pipe, cannot be re-opened through ``/proc/<pid>/fd``).

**Threat model.** Everything inside the program process is compromised: its stdout, its copy
of the runner, ``json``, builtins, the audit hook and any report it makes. The trainer trusts
only the judge's verdict. The program can (a) return any plain value for any call — which is
what a look-up table of the visible tests' answers does, and needs no sandbox escape; (b) raise,
stall, exit, or send malformed frames — every one of which fails the run (``ProgramGone``,
``BadReply`` and ``Forbidden`` derive from ``BaseException``, so a test's ``except Exception``
cannot swallow them; a run passes only when the judge finished every test). Objects with a
custom ``__eq__``, subclasses of ``int``/``str``/..., and anything that is not plain data never
exist in the judge. To reach the judge's memory or verdict pipe the program would need
``ptrace``, ``/proc/<judge>/mem`` or ``/proc/<judge>/fd``: the judge is not dumpable (its
``/proc`` entries belong to root), runs under a different uid when the trainer is root, and lives
in a different PID namespace where the OS allows it; ``ptrace``/``process_vm_*`` are refused by
seccomp. Residual risk, only for a non-root trainer without user namespaces (same uid, no PID
namespace): a program racing the judge's interpreter start-up, before it makes itself not
dumpable, could write its memory through ``/proc``; run untrusted code as root or with user
namespaces.

**Layers** (each where the OS allows it; :func:`protection_report` says which held):

1. rlimits (always): CPU seconds, address space, file size, open files, no core dumps,
   ``RLIMIT_NPROC = 0`` (no new process or thread).
2. uid drop (root): program and judge each get their own random uid (no other sandbox or the
   trainer shares it), no supplementary groups.
3. namespaces (root, or non-root with unprivileged user namespaces): new mount, network, IPC and
   PID namespaces. In them: the whole file system read-only, ``/tmp``, ``/var/tmp``,
   ``/dev/shm``, ``/run`` covered by empty read-only tmpfs, a fresh ``/proc`` (only the sandbox's
   own process is visible: no other sandbox, no trainer argv), SysV IPC private and gone with the
   run, and the working folder a tmpfs of ``disk_bytes`` (total disk quota) that vanishes with
   the namespace.
4. seccomp (x86_64): ``socket``/``socketpair`` (no network, no unix socket anywhere), ``ptrace``,
   ``process_vm_*``, ``kill``/``tgkill``/pidfd signals, SysV/POSIX IPC, ``mount``/``unshare``/
   ``setns``, ``io_uring``, ``bpf``, ``perf_event_open``, keyrings, ``setsid``/``setpgid`` and
   changing the parent-death signal fail with ``EPERM``.
5. audit hook in the program process (defence in depth, *not* a boundary): subprocesses,
   sockets, ctypes, signals and writes outside the working folder raise ``PermissionError`` and
   fail the run with status ``forbidden``.
6. trainer side: output read from a pipe with a size cap (never from a file the program could
   replace by a fifo or a symlink); a wall-clock limit, then ``SIGKILL`` to both process
   groups; the host folder removed by :func:`remove_tree` (iterative, never follows links,
   never raises).
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

# Uids for sandboxes (trainer as root): two per run, drawn at random from this range, which no
# account uses; files they leave in a host folder are removed by the trainer.
UID_BASE = 0x60000000
UID_SLOTS = 1 << 24
_RUNNER = (pathlib.Path(__file__).resolve().parent / "sandbox_runner.py").read_text()
_OUTPUT_KEPT = 4000
_STATUSES = ("passed", "failed", "forbidden", "timeout", "memory_limit", "output_limit", "killed",
             "setup_error", "no_result", "bad_reply")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits of one program run. ``require_namespaces`` makes a run fail if namespaces fail.

  ``file_size_bytes`` bounds each file the program writes and its output; ``disk_bytes`` bounds
  all files together (needs namespaces). ``uid``/``gid``: fixed ids for the program process
  instead of a random one per run (trainer as root only)."""
  cpu_time_s: int = 5
  wall_time_s: float = 10.0
  memory_bytes: int = 1 << 30
  file_size_bytes: int = 1 << 20
  disk_bytes: int = 32 << 20
  max_inodes: int = 4096
  max_open_files: int = 64
  use_namespaces: bool = True
  require_namespaces: bool = False
  # Layer 5; tests switch it off to check that the OS-level layers hold on their own.
  audit_hook: bool = True
  python: Optional[str] = None
  uid: Optional[int] = None
  gid: Optional[int] = None
  # Where the per-run host folders are made (default: the system temporary folder).
  temp_root: Optional[str] = None

  def __post_init__(self):
    if self.cpu_time_s <= 0 or self.wall_time_s <= 0:
      raise ValueError(f"time limits must be positive, got cpu={self.cpu_time_s} "
                       f"wall={self.wall_time_s}")
    if self.memory_bytes < (64 << 20):
      raise ValueError(f"memory_bytes={self.memory_bytes} is too small for a Python interpreter")
    if self.disk_bytes < (1 << 20) or self.max_inodes < 16:
      raise ValueError(f"disk_bytes={self.disk_bytes} / max_inodes={self.max_inodes} too small")


@dataclasses.dataclass(frozen=True)
class TestSuite:
  """Trusted test code run by the judge: ``setup`` (imports, helpers from the prompt), then
  ``code``; each name in ``calls`` is bound (after ``setup``) to a proxy of the program's
  function of that name."""
  code: str
  calls: Tuple[str, ...] = ()
  setup: str = ""

  def __post_init__(self):
    for name in self.calls:
      if not name.isidentifier():
        raise ValueError(f"TestSuite.calls: {name!r} is not an identifier")


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  """``status``: passed, failed, forbidden, timeout, memory_limit, output_limit, killed,
  setup_error, no_result or bad_reply. ``protections`` lists the layers that held (as reported by
  the judge process, which runs no untrusted code)."""
  passed: bool
  status: str
  reason: str
  duration_s: float
  output: str = ""
  protections: Dict[str, bool] = dataclasses.field(default_factory=dict)


def called_names(test_code: str, setup: str = "", reference: Optional[str] = None
                 ) -> Tuple[str, ...]:
  """The program's functions the tests call (e.g. MBPP's ``assert similar_elements(...) == ...``),
  parsed from trusted code: with a ``reference`` solution, the names it defines at top level;
  without, the names neither the tests, the setup nor builtins define."""
  if reference is not None:
    tree = ast.parse(reference)
    own = {node.name for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    calls = [node.func.id for node in ast.walk(ast.parse(test_code))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    found = tuple(dict.fromkeys(name for name in calls if name in own))
    if found:
      return found
  defined = set(dir(builtins))
  called = []
  for source in (setup, test_code):
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        defined.update((a.asname or a.name).split(".")[0] for a in node.names)
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        defined.add(node.name)
      elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        defined.add(node.id)
      elif (source is test_code and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id not in called):
        called.append(node.func.id)
  return tuple(name for name in called if name not in defined)


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
  raise RuntimeError("no Python interpreter readable by an unprivileged uid; set "
                     "SandboxConfig.python")


_NAMESPACE_PROBE: Dict[str, bool] = {}


def _namespaces_work() -> bool:
  if "ok" not in _NAMESPACE_PROBE:
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    try:
      completed = subprocess.run(["unshare", *user, "--net", "--mount", "--ipc", "--pid", "--fork",
                                  "true"], capture_output=True, timeout=10, check=False)
      _NAMESPACE_PROBE["ok"] = completed.returncode == 0
    except (OSError, subprocess.SubprocessError):
      _NAMESPACE_PROBE["ok"] = False
  return _NAMESPACE_PROBE["ok"]


def _socket_pair() -> Tuple[int, int]:
  """Two connected stream-socket descriptors, used like the (read, write) ends of a pipe."""
  first, second = socket.socketpair()
  return first.detach(), second.detach()


def _protect_trainer() -> None:
  """Non-root without namespaces, programs run under the trainer's uid and see its /proc entry:
  making the trainer not dumpable puts its memory and descriptors (``/proc/<pid>/mem``,
  ``/proc/<pid>/fd``) out of their reach. Side effect: no core dumps of the trainer."""
  if _NAMESPACE_PROBE.get("trainer_protected"):
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
  _NAMESPACE_PROBE["trainer_protected"] = True


def _kill(process: subprocess.Popen) -> None:
  for kill, target in ((os.killpg, process.pid), (os.kill, process.pid)):
    try:
      kill(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def _close(*fds: int) -> None:
  for fd in fds:
    try:
      os.close(fd)
    except OSError:
      pass


def _uids(config: SandboxConfig) -> Tuple[int, int, int, int]:
  """(program uid, program gid, judge uid, judge gid)."""
  slot = UID_BASE + 2 * secrets.randbelow(UID_SLOTS)
  uid = config.uid if config.uid is not None else slot
  gid = config.gid if config.gid is not None else uid
  return uid, gid, slot + 1, slot + 1


def _start(config: SandboxConfig, job: dict, cwd: str, stdout: int, pass_fds: Sequence[int]
           ) -> subprocess.Popen:
  env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
         "PYTHONDONTWRITEBYTECODE": "1", "HOME": cwd, "TMPDIR": cwd}
  # The job (with the nonce) goes over a socket: unlike a pipe, a socket cannot be re-opened
  # through /proc/<pid>/fd by another process of the same uid.
  ours, theirs = socket.socketpair()
  try:
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [_interpreter(config), "-I", "-S", "-c", _RUNNER], cwd=cwd, stdin=theirs.fileno(),
        stdout=stdout, stderr=stdout, env=env, pass_fds=tuple(pass_fds), start_new_session=True,
        close_fds=True)
  finally:
    theirs.close()
  try:
    ours.sendall(json.dumps(job).encode())
    ours.shutdown(socket.SHUT_WR)
  except OSError:
    pass
  finally:
    ours.close()
  return process


def run_program(source: str, config: SandboxConfig = SandboxConfig(),
                tests: Optional[TestSuite] = None) -> ExecutionResult:
  """Runs ``source`` in the sandbox, then ``tests`` in the judge against its functions.

  ``passed`` is the judge's verdict: the program loaded and every test ran to the end. Without
  ``tests`` it only says that the program process reported that it ran to its end — a claim the
  program can make up, so never use a run without tests as a reward."""
  tests = tests or TestSuite(code="")
  start = time.monotonic()
  workdir = tempfile.mkdtemp(prefix="dmpo_sandbox_", dir=config.temp_root)
  judge_dir = tempfile.mkdtemp(prefix="dmpo_judge_", dir=config.temp_root)
  # Sockets between the processes (see _start); plain pipes for the text outputs.
  pipes = {name: _socket_pair() for name in ("requests", "replies", "verdict")}
  pipes.update({name: os.pipe() for name in ("output", "judge_output")})
  open_fds = {fd for pair in pipes.values() for fd in pair}
  processes: List[subprocess.Popen] = []
  try:
    uid, gid, judge_uid, judge_gid = _uids(config)
    if os.geteuid() == 0:
      os.chown(workdir, uid, gid)
      os.chown(judge_dir, judge_uid, judge_gid)
    os.chmod(workdir, 0o700)
    os.chmod(judge_dir, 0o700)
    nonce = secrets.token_hex(16)
    common = {"namespaces": config.use_namespaces, "require_namespaces": config.require_namespaces,
              "audit_hook": config.audit_hook, "disk_bytes": int(config.disk_bytes),
              "max_inodes": int(config.max_inodes),
              "limits": {"cpu": int(config.cpu_time_s), "memory": int(config.memory_bytes),
                         "fsize": int(config.file_size_bytes), "nofile": int(config.max_open_files)}}
    program_fds = {"requests": pipes["requests"][0], "replies": pipes["replies"][1]}
    judge_fds = {"requests": pipes["requests"][1], "replies": pipes["replies"][0],
                 "verdict": pipes["verdict"][1]}
    if os.geteuid() != 0 and not (config.use_namespaces and _namespaces_work()):
      _protect_trainer()
    # The judge starts first: nothing of this run's program exists while it is being started.
    processes.append(_start(config, dict(common, role="judge", nonce=nonce, uid=judge_uid,
                                         gid=judge_gid, fds=judge_fds, setup=tests.setup,
                                         tests=tests.code, calls=list(tests.calls)),
                            judge_dir, pipes["judge_output"][1], judge_fds.values()))
    processes.insert(0, _start(config, dict(common, role="program", source=source, uid=uid, gid=gid,
                                            fds=program_fds),
                               workdir, pipes["output"][1], program_fds.values()))
    # Only the read ends of verdict and outputs stay here (so EOF means the children are done).
    for fd in [pipes[name][1] for name in pipes] + [pipes["requests"][0], pipes["replies"][0]]:
      _close(fd)
      open_fds.discard(fd)
    verdict, output, ending = _collect(pipes, config, start, nonce)
    program_code = None
    if ending is None and verdict["status"] == "no_result":
      try:  # the judge saw the program's channel close: how did the program process end?
        program_code = processes[0].wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        pass
    for process in processes:
      _kill(process)
      process.wait()
    duration = time.monotonic() - start
    text = output.decode("utf-8", "replace")
    protections = {k: bool(v) for k, v in verdict.get("protections", {}).items()
                   if isinstance(v, bool)}
    if ending is not None:
      return ExecutionResult(False, ending[0], ending[1], duration, text, protections)
    status, reason = verdict["status"], verdict["reason"]
    if program_code is not None and program_code < 0:
      name = signal.Signals(-program_code).name
      if -program_code in (signal.SIGXCPU, signal.SIGKILL):
        status, reason = "timeout", f"CPU-time limit of {config.cpu_time_s}s ({name})"
      elif -program_code == signal.SIGXFSZ:
        status, reason = "output_limit", f"file-size limit ({name})"
      else:
        status, reason = "killed", f"the program process was killed by {name}"
    elif program_code == 128 + signal.SIGXCPU:  # the runner's SIGXCPU handler
      status, reason = "timeout", f"CPU-time limit of {config.cpu_time_s}s (SIGXCPU)"
    elif program_code is not None:
      reason += f" (exit code {program_code})"
    return ExecutionResult(status == "passed", status, reason, duration, text, protections)
  finally:
    for process in processes:
      if process.poll() is None:
        _kill(process)
        process.wait()
    _close(*open_fds)  # each descriptor exactly once: threads reuse the numbers at once
    remove_tree(workdir)
    remove_tree(judge_dir)


def _collect(pipes, config: SandboxConfig, start: float, nonce: str):
  """Reads the verdict and the program's output until the verdict is complete, the wall-clock
  limit, or the output cap. Returns (verdict, output head, (status, reason) or None)."""
  verdict_fd, output_fd, judge_output_fd = (pipes[k][0] for k in ("verdict", "output",
                                                                  "judge_output"))
  open_fds = {verdict_fd, output_fd, judge_output_fd}
  verdict_bytes, output, judge_output = bytearray(), bytearray(), bytearray()
  output_total = 0
  deadline = start + config.wall_time_s
  while verdict_fd in open_fds:
    left = deadline - time.monotonic()
    if left <= 0:
      return {}, bytes(output), ("timeout", f"wall-clock limit of {config.wall_time_s}s")
    ready, _, _ = select.select(list(open_fds), [], [], left)
    for fd in ready:
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        open_fds.discard(fd)
      elif fd == verdict_fd:
        verdict_bytes += chunk
        if len(verdict_bytes) > 1 << 20:
          return {}, bytes(output), ("setup_error", "judge verdict too large")
        if (len(verdict_bytes) >= 4 and
            len(verdict_bytes) >= 4 + int.from_bytes(verdict_bytes[:4], "big")):
          open_fds.discard(fd)  # complete: whoever else holds the pipe cannot delay the verdict
      elif fd == output_fd:
        output_total += len(chunk)
        output += chunk[:max(0, _OUTPUT_KEPT - len(output))]
        if output_total > config.file_size_bytes:
          return {}, bytes(output), ("output_limit", f"output over {config.file_size_bytes} "
                                                     "bytes")
      else:
        judge_output += chunk[:max(0, _OUTPUT_KEPT - len(judge_output))]
  verdict = _parse_verdict(bytes(verdict_bytes), nonce)
  if verdict is None:
    tail = judge_output.decode("utf-8", "replace")[-1000:]
    return {}, bytes(output), ("setup_error", "the judge process wrote no valid verdict" +
                               (f": {tail}" if tail else ""))
  return verdict, bytes(output), None


def _parse_verdict(data: bytes, nonce: str) -> Optional[dict]:
  if len(data) < 4:
    return None
  size = int.from_bytes(data[:4], "big")
  try:
    message = json.loads(data[4:4 + size])
  except ValueError:
    return None
  if (not isinstance(message, dict) or message.get("nonce") != nonce or
      message.get("status") not in _STATUSES or not isinstance(message.get("reason"), str)):
    return None
  if not isinstance(message.get("protections"), dict):
    message["protections"] = {}
  return message


def remove_tree(path: str) -> bool:
  """Removes ``path`` and everything under it, whatever the program made there: any depth
  (iterative, relative to directory descriptors, so no path-length or recursion limit),
  read-only folders (permissions fixed first), fifos, sockets, symlinks (removed, never
  followed). Never raises; returns whether the path is gone."""
  flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
  try:
    fd = os.open(path, flags)
  except FileNotFoundError:
    return True
  except OSError:
    try:
      os.unlink(path)
      return True
    except OSError:
      return False
  names: List[str] = []  # the path from ``path`` down to ``fd``
  stuck = set()  # (device, inode) of folders that could not be removed: never entered again
  try:
    while True:
      try:
        os.fchmod(fd, 0o700)
      except OSError:
        pass
      child = None
      with os.scandir(fd) as entries:
        listed = [(e.name, e.is_dir(follow_symlinks=False), e.inode()) for e in entries]
      for name, is_dir, inode in listed:
        if not is_dir:
          try:
            os.unlink(name, dir_fd=fd)
          except OSError:
            pass
          continue
        if inode in stuck:
          continue
        try:
          child = os.open(name, flags, dir_fd=fd)
        except OSError:
          try:
            os.chmod(name, 0o700, dir_fd=fd)  # a folder (not a link): listed without following
            child = os.open(name, flags, dir_fd=fd)
          except OSError:
            stuck.add(inode)
            continue
        names.append(name)
        break
      if child is not None:
        os.close(fd)
        fd = child
        continue
      if not names:
        break
      name = names.pop()
      inode = os.fstat(fd).st_ino
      parent = os.open("..", flags, dir_fd=fd)
      os.close(fd)
      fd = parent
      try:
        os.rmdir(name, dir_fd=fd)
      except OSError:
        stuck.add(inode)
  except Exception:  # pylint: disable=broad-except
    pass
  finally:
    _close(fd)
  try:
    os.rmdir(path)
  except FileNotFoundError:
    pass
  except OSError:
    return False
  return True


def run_programs(sources: Sequence[str], config: SandboxConfig = SandboxConfig(),
                 max_workers: Optional[int] = None,
                 tests: Optional[Sequence[Optional[TestSuite]]] = None) -> List[ExecutionResult]:
  """Runs programs in parallel (threads that each wait on one sandbox run), in input order."""
  suites = list(tests) if tests is not None else [None] * len(sources)
  if len(suites) != len(sources):
    raise ValueError(f"run_programs: {len(sources)} sources but {len(suites)} test suites")
  workers = max_workers or max(1, min(len(sources), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda pair: run_program(pair[0], config, pair[1]), zip(sources, suites)))


def protection_report(config: SandboxConfig = SandboxConfig()) -> Dict[str, object]:
  """Runs a probe program and reports which layers hold on this machine."""
  probe = run_program("def probe():\n  return 1\n", config, TestSuite("assert probe() == 1\n",
                                                                      ("probe",)))
  return {"euid": os.geteuid(), "interpreter": _interpreter(config), "status": probe.status,
          "reason": probe.reason, **probe.protections}
