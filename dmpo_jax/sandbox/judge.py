"""The two roles of a sandbox process: the program (runs the untrusted code, then serves calls of
its functions) and the judge (runs the trusted tests against proxies, writes the verdict).

Runs inside the sandbox processes (sent as source by :mod:`dmpo_jax.sandbox.runner`); standard
library only. `main` is the entry point: it isolates the process (`isolation`), reads the job and
plays its role. Only plain data rebuilt by `codec.decode` reaches the tests (`docs/sandbox.md` §2).
"""

import os
import sys

from . import codec
from . import isolation


def audit_hook(violations):
  """Defence in depth in the program process (not a boundary): refuse and remember escapes."""
  workdir = os.path.realpath(os.getcwd())
  forbidden = ("os.system", "os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen",
               "pty.spawn", "socket.connect", "socket.bind", "socket.sendto", "ctypes.dlopen",
               "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill",
               "os.chroot", "os.setuid", "resource.setrlimit", "sys.addaudithook")
  path_events = {"os.remove": 0, "os.rmdir": 0, "os.rename": 1, "os.replace": 1, "os.link": 1,
                 "os.symlink": 1, "os.mkdir": 0, "os.chmod": 0, "os.chown": 0, "os.truncate": 0,
                 "os.utime": 0, "shutil.rmtree": 0, "os.removexattr": 0, "os.setxattr": 0}

  def inside(path):
    if isinstance(path, int):
      return True
    try:
      full = os.path.realpath(os.fsdecode(path))
    except Exception:  # pylint: disable=broad-except
      return False
    return full == workdir or full.startswith(workdir + os.sep)

  def hook(event, args):
    reason = None
    if event in forbidden or event.startswith("os.exec") or event.startswith("os.spawn"):
      reason = event
    elif event == "open":
      path, mode, flags = args
      writing = (mode is not None and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
      if writing and path is not None and not inside(path):
        reason = "write outside the working folder: %r" % (path,)
    elif event in path_events:
      paths = [args[0]] + ([args[1]] if path_events[event] else [])
      if not all(inside(p) for p in paths):
        reason = "%s outside the working folder: %r" % (event, paths)
    if reason is not None:
      violations.append(reason)
      raise PermissionError("sandbox: " + reason + " is not allowed")

  return hook


def serve_program(setup, source):
  """Runs the program, says whether it loaded, then answers calls of its functions."""
  requests, replies = setup["fds"]["requests"], setup["fds"]["replies"]
  violations = []
  if setup["audit_hook"]:
    sys.addaudithook(audit_hook(violations))
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  handles = []

  def reply(message):
    if violations:
      message = {"type": "forbidden", "violations": [str(v)[:300] for v in violations[:3]]}
    codec.send(replies, message)

  def flush():
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except BaseException:  # pylint: disable=broad-except
        pass

  try:
    exec(compile(source, "program.py", "exec"), namespace)  # pylint: disable=exec-used
    flush()
    reply({"type": "ready"})
  except BaseException as e:  # pylint: disable=broad-except
    flush()
    reply({"type": "error", "error": codec.describe(e)})
    os._exit(0)
  while True:
    request = codec.receive(requests)
    if request is None:
      os._exit(0)
    try:
      function = namespace.get(request["name"])
      if not callable(function):
        raise NameError("the program defines no function %r" % (request["name"],))
      args = codec.decode(["L", request["args"]], handles)
      kwargs = {k: codec.decode(v, handles) for k, v in request["kwargs"].items()}
      message = {"type": "return", "value": codec.encode(function(*args, **kwargs), 0, handles)}
    except BaseException as e:  # pylint: disable=broad-except
      message = {"type": "raise", "error": codec.describe(e)}
    flush()
    reply(message)


def judge(setup, job, report):
  """Waits for the program to load, runs the tests with proxies for the program's functions, and
  writes the verdict. A call of the program that raises one of `codec.ABORTING_EXCEPTIONS` fails
  the run wherever the tests make it (``ProgramAborted`` is no ``Exception``, and no iteration
  of ``map``/``filter`` ends on it)."""
  requests, replies, verdict_fd = (setup["fds"][k] for k in ("requests", "replies", "verdict"))

  def verdict(status, reason):
    codec.send(verdict_fd, {"nonce": job["nonce"], "status": status,
                            "reason": str(reason)[:2000], "protections": report})
    os._exit(0)

  def expect(message, types):
    if message is None:
      raise codec.ProgramGone("the program process ended before its tests finished")
    kind = message.get("type")
    if kind == "forbidden":
      violations = message.get("violations")
      raise codec.Forbidden("; ".join(str(v) for v in violations) if type(violations) is list else "")  # pylint: disable=unidiomatic-typecheck
    if kind not in types:
      raise codec.BadReply("unexpected message type %r" % (kind,))
    return message

  def proxy(name):
    def call(*args, **kwargs):
      request = {"name": name, "args": [codec.encode(a) for a in args],
                 "kwargs": {str(k): codec.encode(v) for k, v in kwargs.items()}}
      try:
        codec.send(requests, request)
        message = expect(codec.receive(replies), ("return", "raise"))
      except OSError:
        raise codec.ProgramGone("the program process ended before its tests finished") from None
      if message["type"] == "raise":
        raise codec.rebuild_exception(message.get("error"))
      if "value" not in message:
        raise codec.BadReply("return without a value")
      return codec.decode(message["value"])
    call.__name__ = call.__qualname__ = name
    return call

  try:
    first = expect(codec.receive(replies), ("ready", "error"))
    if first["type"] == "error":
      error = first.get("error")
      if type(error) is not list or len(error) != 2 or not all(type(x) is str for x in error):  # pylint: disable=unidiomatic-typecheck
        raise codec.BadReply("malformed exception report")
      name, message = error[0][:100], error[1][:1000]
      status = {"MemoryError": "memory_limit", "SandboxSetupError": "setup_error"}.get(name, "failed")
      if name == "SystemExit":
        message = "the program called exit(%s) before its tests ran" % (message,)
      if "[Errno 27]" in message:
        status = "output_limit"
      verdict(status, "%s: %s" % (name, message) if name != "SandboxSetupError" else message)
    namespace = {"__name__": "__main__"}
    exec(compile(job["setup"], "setup.py", "exec"), namespace)  # pylint: disable=exec-used
    for name in job["calls"]:
      namespace[name] = proxy(name)
    exec(compile(job["tests"], "tests.py", "exec"), namespace)  # pylint: disable=exec-used
  except codec.ProgramGone as e:
    verdict("no_result", e)
  except codec.Forbidden as e:
    verdict("forbidden", "forbidden operation: %s" % (e,))
  except codec.BadReply as e:
    verdict("bad_reply", "invalid reply from the program: %s" % (e,))
  except codec.ProgramAborted as e:
    verdict("failed", e)
  except MemoryError:
    verdict("memory_limit", "MemoryError")
  except BaseException as e:  # pylint: disable=broad-except
    where = ""
    traceback = e.__traceback__
    lines = job["tests"].splitlines()
    while traceback is not None:
      if traceback.tb_frame.f_code.co_filename == "tests.py":
        number = traceback.tb_lineno
        where = " at tests line %d: %s" % (number, lines[number - 1].strip()[:200]
                                           if 0 < number <= len(lines) else "")
      traceback = traceback.tb_next
    verdict("failed", "%s%s%s" % (type(e).__name__, ": %s" % e if str(e) else "", where))
  verdict("passed", "")


def main(setup):
  """Entry point of a sandbox process: ``setup`` (the first frame on stdin: role, limits,
  descriptors; nothing secret) is known; the job (nonce, program or tests) is read only once the
  process is not dumpable, then the isolation is completed before the role runs."""
  report = {"errors": []}
  job = None
  try:
    in_namespaces = isolation.prepare(setup, report)
    job = codec.receive(0)
    if job is None:
      raise EOFError("no job on stdin")
    os.close(0)
    isolation.isolate(setup, report, in_namespaces)
    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()  # the working folder
  except BaseException as e:  # pylint: disable=broad-except
    status = "refused" if isinstance(e, isolation.Refused) else "setup_error"
    message = "sandbox %s: %s: %s" % ("refused" if status == "refused" else "setup failed",
                                      type(e).__name__, e)
    if job is None:
      os.write(2, message.encode("utf-8", "replace")[:4000])
    elif setup["role"] == "judge":
      codec.send(setup["fds"]["verdict"], {"nonce": job["nonce"], "status": status,
                                           "reason": message, "protections": report})
    else:
      codec.send(setup["fds"]["replies"], {"type": "error", "error": ["SandboxSetupError", message]})
    os._exit(3)
  if setup["role"] == "judge":
    judge(setup, job, report)
  else:
    serve_program(setup, job["source"])
