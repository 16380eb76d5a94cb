"""Runs one program and its tests in the sandbox and collects the judge's verdict (`docs/sandbox.md`).

Trainer side; standard library only. Each run starts two fresh ``python -I -S -c BOOT``
processes, each in its own process group (``start_new_session``), with a socket as stdin:
the first frame on it is the setup
(role, limits, descriptors, and the *source* of the in-sandbox modules ``codec``, ``seccomp``,
``isolation``, ``judge``, read once when this module is imported, so a sandbox process never
reads the project's files); the second frame, the job (nonce, program or tests), is read by the
process only once it is not dumpable. The judge starts first and holds the verdict socket; the
trainer reads the verdict and the output from sockets/pipes with a size cap until the wall
limit, kills both process groups, and removes the host folders within another wall limit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import secrets
import select
import socket
import stat
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import limits
from . import suite as suite_lib
from . import workdir

# Uids for sandboxes (trainer as root): two per run, drawn at random from this range, which no
# account uses; files they leave in a host folder are removed by the trainer.
UID_BASE = 0x60000000
UID_SLOTS = 1 << 24
_OUTPUT_KEPT = 4000
_HERE = pathlib.Path(__file__).resolve().parent
IN_SANDBOX_MODULES = ("codec", "seccomp", "isolation", "judge")
MODULE_SOURCES = tuple((name, (_HERE / f"{name}.py").read_text()) for name in IN_SANDBOX_MODULES)

# Builds the in-sandbox modules from the first frame on stdin (a package ``sandbox_boot``, so
# their relative imports work) and hands over to ``judge.main``.
BOOT = r"""
import json, os, sys, types
def _read(size):
  data = b""
  while len(data) < size:
    chunk = os.read(0, size - len(data))
    if not chunk:
      os._exit(3)
    data += chunk
  return data
setup = json.loads(_read(int.from_bytes(_read(4), "big")))
package = types.ModuleType("sandbox_boot")
package.__path__ = []
sys.modules["sandbox_boot"] = package
for name, source in setup.pop("modules"):
  module = types.ModuleType("sandbox_boot." + name)
  module.__package__ = "sandbox_boot"
  sys.modules[module.__name__] = module
  setattr(package, name, module)
  exec(compile(source, name + ".py", "exec"), module.__dict__)
sys.modules["sandbox_boot.judge"].main(setup)
"""

# Whether this machine lets this process create the namespaces (cached per process).
_NAMESPACE_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
user = os.geteuid() != 0
uid, gid = os.geteuid(), os.getegid()
if libc.unshare(0x00020000 | 0x40000000 | 0x08000000 | 0x20000000 | (0x10000000 if user else 0)):
  sys.exit(1)
if user:
  for path, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
    with open("/proc/self/" + path, "w") as f:
      f.write(text)
sys.exit(2 if libc.mount(None, b"/", None, (1 << 18) | 16384, None) else 0)
"""
_CACHE: Dict[str, object] = {}


def namespaces_possible() -> bool:
  if "namespaces" not in _CACHE:
    try:
      _CACHE["namespaces"] = subprocess.run(
          [sys.executable, "-I", "-S", "-c", _NAMESPACE_PROBE], capture_output=True, timeout=30,
          check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
      _CACHE["namespaces"] = False
  return bool(_CACHE["namespaces"])


def world_traversable(path: pathlib.Path) -> bool:
  """Whether every ancestor folder of ``path`` lets others in (x bit for others)."""
  for parent in list(path.resolve().parents):
    try:
      if not os.stat(parent).st_mode & stat.S_IXOTH:
        return False
    except OSError:
      return False
  return True


def interpreter(config: limits.SandboxConfig) -> str:
  """The Python that runs the sandbox processes: this one, unless the trainer is root without
  namespaces, where the dropped uid must read the interpreter and its standard library itself."""
  if config.python:
    return config.python
  if os.geteuid() != 0 or config.use_namespaces and namespaces_possible():
    return sys.executable
  for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
    if os.path.exists(candidate) and world_traversable(pathlib.Path(candidate)):
      return candidate
  raise RuntimeError("no Python interpreter readable by an unprivileged uid; set "
                     "SandboxConfig.python")


def protect_process() -> None:
  """Makes this process not dumpable (once): its memory and descriptors (``/proc/<pid>/mem``,
  ``/proc/<pid>/fd``) are then out of reach of every other process of its uid, and it cannot be
  ptraced by them. Used by a non-root trainer and its reward workers; side effect: no core dumps."""
  if _CACHE.get("protected"):
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
  _CACHE["protected"] = True


def _kill(process: subprocess.Popen) -> None:
  for kill, target in ((os.killpg, process.pid), (os.kill, process.pid)):
    try:
      kill(target, 9)
    except (ProcessLookupError, PermissionError):
      pass


def _close(*fds: int) -> None:
  for fd in fds:
    try:
      os.close(fd)
    except OSError:
      pass


def _frame(message: dict) -> bytes:
  body = json.dumps(message).encode()
  return len(body).to_bytes(4, "big") + body


def _start(config: limits.SandboxConfig, setup: dict, job: dict, cwd: str, stdout: int
           ) -> subprocess.Popen:
  env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
         "PYTHONDONTWRITEBYTECODE": "1"}
  # Setup and job go over a socket: unlike a pipe, a socket cannot be re-opened through
  # /proc/<pid>/fd by another process of the same uid.
  ours, theirs = socket.socketpair()
  try:
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [interpreter(config), "-I", "-S", "-c", BOOT], cwd=cwd, stdin=theirs.fileno(),
        stdout=stdout, stderr=stdout, env=env, pass_fds=tuple(setup["fds"].values()),
        start_new_session=True, close_fds=True)
  finally:
    theirs.close()
  try:
    ours.settimeout(float(config.wall_time_s))
    ours.sendall(_frame(dict(setup, modules=MODULE_SOURCES)) + _frame(job))
    ours.shutdown(socket.SHUT_WR)
  except OSError:
    pass  # the process ended or stalled: the run fails on its missing verdict
  finally:
    ours.close()
  return process


def _uids(config: limits.SandboxConfig) -> Tuple[int, int, int, int]:
  """(program uid, program gid, judge uid, judge gid)."""
  slot = UID_BASE + 2 * secrets.randbelow(UID_SLOTS)
  uid = config.uid if config.uid is not None else slot
  gid = config.gid if config.gid is not None else uid
  return uid, gid, slot + 1, slot + 1


def run_program(source: str, config: limits.SandboxConfig = limits.SandboxConfig(),
                tests: Optional[suite_lib.TestSuite] = None) -> limits.ExecutionResult:
  """Runs ``source`` in the sandbox, then ``tests`` in the judge against its functions.

  ``passed`` is the judge's verdict: the program loaded and every test ran to the end. Without
  ``tests`` it only says that the program process reported that it ran to its end, a claim the
  program can make up, so never use a run without tests as a reward. Takes at most
  ``config.max_duration_s``; nothing the program does makes it raise."""
  tests = tests or suite_lib.TestSuite(code="")
  start = time.monotonic()
  if os.geteuid() != 0:
    protect_process()
  uid, gid, judge_uid, judge_gid = _uids(config)
  root = os.geteuid() == 0
  folders = [workdir.make_folder(config, (uid, gid) if root else None, "dmpo_sandbox_"),
             workdir.make_folder(config, (judge_uid, judge_gid) if root else None, "dmpo_judge_")]
  result = None
  try:
    result = _run(source, config, tests, start, folders, (uid, gid, judge_uid, judge_gid))
  finally:
    deadline = time.monotonic() + float(config.wall_time_s)
    left = [path for path in folders if not workdir.remove_tree(path, deadline)]
    for path in left:
      workdir.REAPER.add(path)
  if left:
    result = dataclasses.replace(
        result, passed=False, status="cleanup_timeout",
        reason=f"removing the run's folder took longer than the wall limit of "
               f"{config.wall_time_s}s (the rest is removed in the background); before: "
               f"{result.status} {result.reason}"[:2000],
        duration_s=time.monotonic() - start)
  return result


def _run(source: str, config: limits.SandboxConfig, tests: suite_lib.TestSuite, start: float,
         folders: List[str], ids: Tuple[int, int, int, int]) -> limits.ExecutionResult:
  uid, gid, judge_uid, judge_gid = ids
  # Sockets between the processes (see _start); plain pipes for the text outputs.
  pipes = {name: tuple(s.detach() for s in socket.socketpair())
           for name in ("requests", "replies", "verdict")}
  pipes.update({name: os.pipe() for name in ("output", "judge_output")})
  open_fds = {fd for pair in pipes.values() for fd in pair}
  processes: List[subprocess.Popen] = []
  try:
    nonce = secrets.token_hex(16)
    common = {"parent_pid": os.getpid(), "namespaces": config.use_namespaces,
              "require_namespaces": config.require_namespaces, "landlock": config.use_landlock,
              "allow_unisolated": config.allow_unisolated, "audit_hook": config.audit_hook,
              "disk_bytes": int(config.disk_bytes), "max_inodes": int(config.max_inodes),
              "limits": {"cpu": int(config.cpu_time_s), "memory": int(config.memory_bytes),
                         "fsize": int(config.file_size_bytes), "nofile": int(config.max_open_files)}}
    program_fds = {"requests": pipes["requests"][0], "replies": pipes["replies"][1]}
    judge_fds = {"requests": pipes["requests"][1], "replies": pipes["replies"][0],
                 "verdict": pipes["verdict"][1]}
    # The judge starts first: nothing of this run's program exists while it is being started.
    processes.append(_start(
        config, dict(common, role="judge", uid=judge_uid, gid=judge_gid, fds=judge_fds),
        {"nonce": nonce, "setup": tests.setup, "tests": tests.code, "calls": list(tests.calls)},
        folders[1], pipes["judge_output"][1]))
    processes.insert(0, _start(
        config, dict(common, role="program", uid=uid, gid=gid, fds=program_fds),
        {"source": source}, folders[0], pipes["output"][1]))
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
    text = output.decode("utf-8", "replace")
    protections = {k: v for k, v in verdict.get("protections", {}).items()
                   if type(v) in (bool, int) or k == "errors" and isinstance(v, list)}
    if ending is not None:
      return limits.ExecutionResult(False, ending[0], ending[1], time.monotonic() - start, text,
                                    protections)
    status, reason = verdict["status"], verdict["reason"]
    explained = limits.classify_exit(program_code, config)
    if explained is not None:
      status, reason = explained
    elif program_code is not None:
      reason += f" (exit code {program_code})"
    return limits.ExecutionResult(status == "passed", status, reason, time.monotonic() - start,
                                  text, protections)
  finally:
    for process in processes:
      if process.poll() is None:
        _kill(process)
        process.wait()
    _close(*open_fds)  # each descriptor exactly once: threads reuse the numbers at once


def _collect(pipes, config: limits.SandboxConfig, start: float, nonce: str):
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
          open_fds.discard(fd)  # complete: whoever else holds the socket cannot delay it
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
      message.get("status") not in limits.STATUSES or not isinstance(message.get("reason"), str)):
    return None
  if not isinstance(message.get("protections"), dict):
    message["protections"] = {}
  return message


def run_programs(sources: Sequence[str], config: limits.SandboxConfig = limits.SandboxConfig(),
                 max_workers: Optional[int] = None,
                 tests: Optional[Sequence[Optional[suite_lib.TestSuite]]] = None
                 ) -> List[limits.ExecutionResult]:
  """Runs programs in parallel (threads that each wait on one sandbox run), in input order."""
  suites = list(tests) if tests is not None else [None] * len(sources)
  if len(suites) != len(sources):
    raise ValueError(f"run_programs: {len(sources)} sources but {len(suites)} test suites")
  workers = max_workers or max(1, min(len(sources), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda pair: run_program(pair[0], config, pair[1]), zip(sources, suites)))
