"""Code run at the start of every sandbox process (see :mod:`dmpo_jax.tasks.sandbox`).

Never imported: ``sandbox.py`` starts ``python -I -S -c <the text of this file>`` and writes one
JSON job to its stdin. The job's ``role`` is ``"program"`` (runs the untrusted program, then serves
calls of its functions) or ``"judge"`` (runs the trusted tests, whose calls of the program's
functions go over two pipes to the program process, and writes the verdict). Both roles first
apply the same isolation (namespaces, read-only file system, tmpfs working folder, rlimits, uid
drop, seccomp filter). Everything up to ``exec`` of the program is trusted.

Wire format between the two processes: frames of a 4-byte big-endian length and a JSON body.
Values are tagged trees of plain data only (``["I", hex]`` for an int, ``["L", [...]]`` for a
list, ...); the judge rebuilds them with its own constructors, so nothing the program made (a
class, an ``__eq__``, a patched module) ever exists in the judge process.
"""

import json
import os
import resource
import struct
import sys

MAX_FRAME = 16 << 20
MAX_DEPTH = 100
MAX_NODES = 1 << 20
MAX_INT_HEX_DIGITS = 1 << 16
MAX_ITEMS_FROM_ITERATOR = 1 << 16

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWIPC = 0x00020000, 0x10000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22

# x86_64 system calls the sandbox never needs; they fail with EPERM (seccomp, layer "seccomp").
# Sockets (so no network and no unix socket anywhere), tracing and other processes' memory,
# signals (no kill of another sandbox or of the trainer), SysV/POSIX IPC, namespaces and mounts,
# io_uring (which could create sockets without socket(2)), kernel keyrings, bpf, perf,
# userfaultfd, new sessions/process groups (a program stays in the group the parent kills).
_BLOCKED_X86_64 = (
    41, 53, 101, 310, 311, 62, 200, 234, 129, 297, 424, 434, 438, 272, 308, 165, 166, 155, 161,
    250, 248, 249, 321, 298, 323, 425, 426, 427, 29, 30, 31, 64, 65, 66, 220, 68, 69, 70, 71, 240,
    112, 109, 246, 175, 313, 303, 304, 428, 429, 430, 431, 432, 442)
_PRCTL_X86_64 = 157
AUDIT_ARCH_X86_64 = 0xC000003E


class ProgramGone(BaseException):
  """The program process ended or closed its channel (not catchable by a test's ``except``)."""


class BadReply(BaseException):
  """The program process sent something that is not a valid frame of plain data."""


class Forbidden(BaseException):
  """The program process reported a forbidden operation (audit hook)."""


# ---------------------------------------------------------------- framing and plain-data codec


def write_all(fd, data):
  while data:
    data = data[os.write(fd, data):]


def send(fd, message):
  body = json.dumps(message, separators=(",", ":")).encode("ascii")
  write_all(fd, struct.pack(">I", len(body)) + body)


def read_exact(fd, size):
  chunks, got = [], 0
  while got < size:
    chunk = os.read(fd, min(size - got, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def receive(fd):
  """One frame as parsed JSON; None at end of file; BadReply for anything malformed."""
  head = read_exact(fd, 4)
  if head is None:
    return None
  (size,) = struct.unpack(">I", head)
  if size > MAX_FRAME:
    raise BadReply("frame of %d bytes is over the %d-byte limit" % (size, MAX_FRAME))
  body = read_exact(fd, size)
  if body is None:
    return None
  try:
    message = json.loads(body)
  except (ValueError, RecursionError) as e:
    raise BadReply("frame is not valid JSON: %s" % (type(e).__name__,)) from None
  if type(message) is not dict:  # pylint: disable=unidiomatic-typecheck
    raise BadReply("frame is not a JSON object")
  return message


class Opaque:
  """The judge's stand-in for an object of the program that is not plain data (a ``re.Match``, an
  instance of the program's class): equal only to itself, true or false as the program said, and
  passed back to the program as its handle. The program chooses nothing but that truth value."""
  __slots__ = ("handle", "type_name", "truth")

  def __init__(self, handle, type_name, truth):
    self.handle, self.type_name, self.truth = handle, type_name, truth

  def __bool__(self):
    return self.truth

  def __repr__(self):
    return "<%s object of the program>" % self.type_name

  __hash__ = object.__hash__


def encode(obj, depth=0, handles=None):
  """Tagged plain-data tree of ``obj``. Other objects: a handle into ``handles`` (the program
  side) or TypeError (the judge side, except for an ``Opaque``)."""
  import collections  # pylint: disable=import-outside-toplevel
  if depth > MAX_DEPTH:
    raise TypeError("value nested deeper than %d levels" % MAX_DEPTH)
  kind = type(obj)
  nested = lambda items: [encode(item, depth + 1, handles) for item in items]
  if obj is None:
    return ["N"]
  if kind is bool:
    return ["B", int(obj)]
  if kind is int:
    return ["I", format(obj, "x")]
  if kind is float:
    return ["F", obj.hex()]
  if kind is complex:
    return ["C", obj.real.hex(), obj.imag.hex()]
  if kind is str:
    return ["S", obj]
  if kind is bytes:
    return ["Y", obj.hex()]
  if kind is bytearray:
    return ["A", obj.hex()]
  if kind is list:
    return ["L", nested(obj)]
  if kind is tuple:
    return ["T", nested(obj)]
  if kind is set:
    return ["E", nested(obj)]
  if kind is frozenset:
    return ["Z", nested(obj)]
  if kind is range:
    return ["R", encode(obj.start), encode(obj.stop), encode(obj.step)]
  if kind is Opaque:
    return ["H", obj.handle]
  tags = {dict: "D", collections.OrderedDict: "O", collections.Counter: "K",
          collections.defaultdict: "D"}
  if kind in tags:
    return [tags[kind], [[encode(k, depth + 1, handles), encode(v, depth + 1, handles)]
                         for k, v in obj.items()]]
  if kind is collections.deque:
    return ["Q", nested(obj)]
  if hasattr(kind, "__next__") or kind.__name__ in ("dict_keys", "dict_values", "dict_items"):
    items = []
    for item in obj:
      if len(items) >= MAX_ITEMS_FROM_ITERATOR:
        raise TypeError("iterator longer than %d items" % MAX_ITEMS_FROM_ITERATOR)
      items.append(item)
    return ["G", nested(items)]
  if handles is not None and len(handles) < MAX_NODES:
    try:
      truth = bool(obj)
    except Exception:  # pylint: disable=broad-except
      truth = True
    handles.append(obj)
    return ["X", len(handles) - 1, str(kind.__name__)[:100], int(truth)]
  raise TypeError("a value of type %s is not plain data" % kind.__name__)


def decode(node, handles=None):
  """Rebuilds a value from an untrusted tagged tree with the judge's own constructors; ``X``
  nodes become ``Opaque`` (judge side), ``H`` nodes the program's objects (program side)."""
  import collections  # pylint: disable=import-outside-toplevel
  budget = [MAX_NODES]

  def text(value):
    if type(value) is not str:  # pylint: disable=unidiomatic-typecheck
      raise BadReply("expected a string in the value tree")
    return value

  def items(value, depth):
    if type(value) is not list:  # pylint: disable=unidiomatic-typecheck
      raise BadReply("expected a list in the value tree")
    return [build(item, depth + 1) for item in value]

  def build(value, depth):
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH + 2:
      raise BadReply("value tree too large or too deep")
    if type(value) is not list or not value or type(value[0]) is not str:  # pylint: disable=unidiomatic-typecheck
      raise BadReply("malformed value node")
    tag, args = value[0], value[1:]
    try:
      if tag == "N" and not args:
        return None
      if tag == "B" and len(args) == 1 and type(args[0]) is int and args[0] in (0, 1):  # pylint: disable=unidiomatic-typecheck
        return args[0] == 1
      if tag == "I" and len(args) == 1:
        digits = text(args[0])
        if len(digits) > MAX_INT_HEX_DIGITS:
          raise BadReply("integer too large")
        return int(digits, 16)
      if tag == "F" and len(args) == 1:
        return float.fromhex(text(args[0]))
      if tag == "C" and len(args) == 2:
        return complex(float.fromhex(text(args[0])), float.fromhex(text(args[1])))
      if tag == "S" and len(args) == 1:
        return text(args[0])
      if tag in ("Y", "A") and len(args) == 1:
        data = bytes.fromhex(text(args[0]))
        return data if tag == "Y" else bytearray(data)
      if tag == "X" and handles is None and len(args) == 3 and type(args[0]) is int and (  # pylint: disable=unidiomatic-typecheck
          type(args[2]) is int and args[2] in (0, 1)):  # pylint: disable=unidiomatic-typecheck
        return Opaque(args[0], text(args[1])[:100], args[2] == 1)
      if tag == "H" and handles is not None and len(args) == 1 and type(args[0]) is int:  # pylint: disable=unidiomatic-typecheck
        return handles[args[0]]
      if tag == "R" and len(args) == 3:
        start, stop, step = (build(a, depth + 1) for a in args)
        if not all(type(x) is int for x in (start, stop, step)):  # pylint: disable=unidiomatic-typecheck
          raise BadReply("range bounds must be integers")
        return range(start, stop, step)
      if len(args) == 1:
        if tag in ("L", "T", "E", "Z", "Q", "G"):
          built = items(args[0], depth)
          maker = {"L": list, "T": tuple, "E": set, "Z": frozenset, "Q": collections.deque,
                   "G": iter}[tag]
          return maker(built)
        if tag in ("D", "O", "K"):
          if type(args[0]) is not list:  # pylint: disable=unidiomatic-typecheck
            raise BadReply("expected a list of pairs")
          pairs = []
          for pair in args[0]:
            if type(pair) is not list or len(pair) != 2:  # pylint: disable=unidiomatic-typecheck
              raise BadReply("malformed key/value pair")
            pairs.append((build(pair[0], depth + 1), build(pair[1], depth + 1)))
          maker = {"D": dict, "O": collections.OrderedDict, "K": collections.Counter}[tag]
          return maker(dict(pairs)) if tag == "K" else maker(pairs)
    except (ValueError, TypeError, OverflowError, IndexError) as e:
      raise BadReply("invalid %r node: %s" % (tag, e)) from None
    raise BadReply("unknown value node %r" % (tag,))

  return build(node, 0)


def describe(error):
  """[type name, message] of an exception, as plain strings."""
  try:
    message = str(error)
  except BaseException:  # pylint: disable=broad-except
    message = "<unprintable>"
  return [type(error).__name__, message[:500]]


def rebuild_exception(error):
  """An exception for the judge from the program's [type name, message] (builtin types only)."""
  import builtins  # pylint: disable=import-outside-toplevel
  if (type(error) is not list or len(error) != 2 or  # pylint: disable=unidiomatic-typecheck
      not all(type(x) is str for x in error)):  # pylint: disable=unidiomatic-typecheck
    raise BadReply("malformed exception report")
  name, message = error[0][:100], error[1][:500]
  kind = getattr(builtins, name, None)
  if isinstance(kind, type) and issubclass(kind, Exception) and name != "AssertionError":
    try:
      return kind(message)
    except Exception:  # pylint: disable=broad-except
      pass
  return RuntimeError("the program raised %s: %s" % (name, message))


# ---------------------------------------------------------------- isolation


def _libc():
  import ctypes  # pylint: disable=import-outside-toplevel
  return ctypes, ctypes.CDLL(None, use_errno=True)


def _checked(ctypes, result, what):
  if result != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, "%s: %s" % (what, os.strerror(errno)))


def _write_file(path, text):
  fd = os.open(path, os.O_WRONLY)
  try:
    write_all(fd, text.encode())
  finally:
    os.close(fd)


def enter_namespaces(job, report):
  """New mount, network, IPC and PID namespaces (plus a user namespace when not root); forks so
  that the rest runs as init of the new PID namespace. Returns whether a user namespace is used."""
  ctypes, libc = _libc()
  outer_uid, outer_gid = os.geteuid(), os.getegid()
  user_namespace = outer_uid != 0
  flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
  if user_namespace:
    flags |= CLONE_NEWUSER
  _checked(ctypes, libc.unshare(flags), "unshare")
  if user_namespace:
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", "0 %d 1" % outer_uid)
    _write_file("/proc/self/gid_map", "0 %d 1" % outer_gid)
  keep_fds = set(job["fds"].values()) | {0, 1, 2}
  child = os.fork()
  if child:
    # Outside the new namespace: hold no pipe open (so the other side sees EOF when the child
    # ends), wait, and end the same way as the child (the parent classifies signals).
    import signal  # pylint: disable=import-outside-toplevel
    for fd in keep_fds:
      try:
        os.close(fd)
      except OSError:
        pass
    try:
      _, status = os.waitpid(child, 0)
    except BaseException:  # pylint: disable=broad-except
      os._exit(70)
    if os.WIFSIGNALED(status):
      number = os.WTERMSIG(status)
      signal.signal(number, signal.SIG_DFL)
      resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
      os.kill(os.getpid(), number)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 70)
  # Killed with the process outside (the trainer kills that one); getppid() is 0 in here.
  libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
  report["pid_namespace"] = report["ipc_namespace"] = report["network_namespace"] = True
  return user_namespace


def mount_file_systems(job, report, owner):
  """Read-only view of the whole file system, a fresh /proc, empty read-only tmpfs over the shared
  writable folders, and a size-limited tmpfs as the working folder (owned by ``owner``)."""
  ctypes, libc = _libc()

  def mount(source, target, fstype, flags, data=None):
    _checked(ctypes, libc.mount(source and source.encode(), target.encode(),
                                fstype and fstype.encode(), flags, data and data.encode()),
             "mount " + target)

  mount(None, "/", None, MS_REC | MS_PRIVATE)
  try:
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID}) (>= 5.12)
    attr = (ctypes.c_uint64 * 4)(1 | 2, 0, 0, 0)
    _checked(ctypes, libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), 32),
             "mount_setattr /")
    report["read_only_root"] = True
  except OSError as e:
    report["errors"].append(str(e))
  mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,mode=0755")
  os.mkdir("/tmp/work", 0o700)
  mount("tmpfs", "/tmp/work", "tmpfs", MS_NOSUID | MS_NODEV,
        "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (
            job["disk_bytes"], job["max_inodes"], owner[0], owner[1]))
  report["disk_quota"] = True
  # The interpreter's prefix is also bind-mounted (read-only) under the new /tmp, so a dropped
  # uid can import the standard library when the prefix lies in a private folder such as /root.
  prefix, prefix_mount = sys.base_prefix, "/tmp/.python"
  os.mkdir(prefix_mount)
  mount(prefix, prefix_mount, None, MS_BIND | MS_REC)
  mount(None, prefix_mount, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
  mount(None, "/tmp", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  moved = lambda p: p.replace(prefix, prefix_mount, 1) if p.startswith(prefix) else p
  sys.path[:] = [moved(p) for p in sys.path]
  for module in list(sys.modules.values()):
    if isinstance(getattr(module, "__path__", None), list):
      module.__path__[:] = [moved(p) for p in module.__path__]
  sys.path_importer_cache.clear()
  for folder in ("/var/tmp", "/dev/shm", "/run", "/dev/mqueue"):
    if os.path.isdir(folder) and not os.path.islink(folder):
      try:
        mount("tmpfs", folder, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "size=4k,mode=0755")
      except OSError as e:
        report["errors"].append(str(e))
  try:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    report["own_proc"] = True
  except OSError as e:
    # Cannot mount a proc of its own (e.g. in some containers): hide the host's instead.
    report["errors"].append(str(e))
    mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    report["proc_hidden"] = True
  os.chdir("/tmp/work")
  report["namespaces"] = True


def install_seccomp(report):
  import platform  # pylint: disable=import-outside-toplevel
  if platform.machine() not in ("x86_64", "AMD64"):
    report["errors"].append("seccomp filter only written for x86_64, not %s" % platform.machine())
    return
  ctypes, libc = _libc()

  class Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]

  class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

  load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
  allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
  code = [(load, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, kill), (load, 0, 0, 0),
          (jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]
  for number in _BLOCKED_X86_64:
    code += [(jeq, 0, 1, number), (ret, 0, 0, deny)]
  # prctl: no change of the parent-death signal or of dumpability.
  code += [(jeq, 0, 5, _PRCTL_X86_64), (load, 0, 0, 16), (jeq, 2, 0, PR_SET_PDEATHSIG),
           (jeq, 1, 0, PR_SET_DUMPABLE), (ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, allow)]
  instructions = (Instruction * len(code))(*[Instruction(*i) for i in code])
  program = Program(len(code), instructions)
  _checked(ctypes, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
  _checked(ctypes, libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(program), 0, 0), "seccomp")
  report["seccomp"] = True


def isolate(job, report):
  """All layers, in order; raises if a required one fails."""
  user_namespace = False
  in_namespaces = False
  if job["namespaces"]:
    try:
      user_namespace = enter_namespaces(job, report)
      in_namespaces = True
      owner = (0, 0) if user_namespace else (job["uid"], job["gid"])
      mount_file_systems(job, report, owner)
    except OSError as e:
      report["errors"].append("namespaces: %s" % (e,))
      if job["require_namespaces"] or in_namespaces:
        raise
  limits = job["limits"]
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
  # As PID 1 of its namespace the process would ignore a default-action SIGXCPU (the kernel
  # delivers to a namespace's init only the signals it handles): end with 128 + SIGXCPU so the
  # trainer reports the CPU-time limit. The program can change this handler, which changes
  # only the label of its failure, never the verdict.
  import signal as _signal  # pylint: disable=import-outside-toplevel
  _signal.signal(_signal.SIGXCPU, lambda *_: os._exit(128 + _signal.SIGXCPU))
  resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
  resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
  ctypes, libc = _libc()
  if os.geteuid() == 0 and not user_namespace:
    os.setgroups([])
    os.setgid(job["gid"])
    os.setuid(job["uid"])
    report["dropped_privileges"] = True
    if in_namespaces:
      libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # cleared by the uid change
  # Not dumpable: /proc/<pid> of this process is root's, so no process of the same uid can open
  # its memory or its file descriptors.
  _checked(ctypes, libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
  try:
    install_seccomp(report)
  except OSError as e:
    report["errors"].append(str(e))
  # After the uid change, so setuid is not affected; counts every task of the uid (threads too).
  resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
  report["rlimits"] = True


# ---------------------------------------------------------------- the two roles


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


def serve_program(job, source):
  """Runs the program, says whether it loaded, then answers calls of its functions."""
  requests, replies = job["fds"]["requests"], job["fds"]["replies"]
  violations = []
  if job["audit_hook"]:
    sys.addaudithook(audit_hook(violations))
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  handles = []

  def reply(message):
    if violations:
      message = {"type": "forbidden", "violations": [str(v)[:300] for v in violations[:3]]}
    send(replies, message)

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
    reply({"type": "error", "error": describe(e)})
    os._exit(0)
  while True:
    request = receive(requests)
    if request is None:
      os._exit(0)
    try:
      function = namespace.get(request["name"])
      if not callable(function):
        raise NameError("the program defines no function %r" % (request["name"],))
      args = decode(["L", request["args"]], handles)
      kwargs = {k: decode(v, handles) for k, v in request["kwargs"].items()}
      message = {"type": "return", "value": encode(function(*args, **kwargs), 0, handles)}
    except BaseException as e:  # pylint: disable=broad-except
      message = {"type": "raise", "error": describe(e)}
    flush()
    reply(message)


def judge(job, report):
  """Waits for the program to load, runs the tests with proxies for the program's functions, and
  writes the verdict. Only plain data rebuilt by ``decode`` reaches the tests."""
  requests, replies, verdict_fd = (job["fds"][k] for k in ("requests", "replies", "verdict"))

  def verdict(status, reason):
    send(verdict_fd, {"nonce": job["nonce"], "status": status, "reason": str(reason)[:2000],
                      "protections": report})
    os._exit(0)

  def expect(message, types):
    if message is None:
      raise ProgramGone("the program process ended before its tests finished")
    kind = message.get("type")
    if kind == "forbidden":
      violations = message.get("violations")
      raise Forbidden("; ".join(str(v) for v in violations) if type(violations) is list else "")  # pylint: disable=unidiomatic-typecheck
    if kind not in types:
      raise BadReply("unexpected message type %r" % (kind,))
    return message

  def proxy(name):
    def call(*args, **kwargs):
      request = {"name": name, "args": [encode(a) for a in args],
                 "kwargs": {str(k): encode(v) for k, v in kwargs.items()}}
      try:
        send(requests, request)
        message = expect(receive(replies), ("return", "raise"))
      except OSError:
        raise ProgramGone("the program process ended before its tests finished") from None
      if message["type"] == "raise":
        raise rebuild_exception(message.get("error"))
      if "value" not in message:
        raise BadReply("return without a value")
      return decode(message["value"])
    call.__name__ = call.__qualname__ = name
    return call

  try:
    first = expect(receive(replies), ("ready", "error"))
    if first["type"] == "error":
      error = first.get("error")
      if type(error) is not list or len(error) != 2 or not all(type(x) is str for x in error):  # pylint: disable=unidiomatic-typecheck
        raise BadReply("malformed exception report")
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
  except ProgramGone as e:
    verdict("no_result", e)
  except Forbidden as e:
    verdict("forbidden", "forbidden operation: %s" % (e,))
  except BadReply as e:
    verdict("bad_reply", "invalid reply from the program: %s" % (e,))
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


def main():
  # First of all: not dumpable, so that a process of the same uid (trainer not root, no
  # namespaces) can neither open this one's /proc memory nor, later, read the job's nonce.
  _, libc = _libc()
  libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
  chunks = []
  while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
      break
    chunks.append(chunk)
  os.close(0)
  job = json.loads(b"".join(chunks))
  report = {"errors": []}
  try:
    isolate(job, report)
  except BaseException as e:  # pylint: disable=broad-except
    message = "sandbox setup failed: %r" % (e,)
    if job["role"] == "judge":
      send(job["fds"]["verdict"], {"nonce": job["nonce"], "status": "setup_error",
                                   "reason": message, "protections": report})
    else:
      send(job["fds"]["replies"], {"type": "error", "error": ["SandboxSetupError", message]})
    os._exit(3)
  if job["role"] == "judge":
    judge(job, report)
  else:
    serve_program(job, job["source"])


if __name__ == "__main__":
  main()
