"""Isolation of one sandbox process: namespaces, a minimal root, Landlock, rlimits, uid drop.

Runs inside the sandbox processes (sent as source by :mod:`dmpo_jax.sandbox.runner`); standard
library only; every step here is trusted code that runs before the program. `docs/sandbox.md` §3
lists the layers and what each mode gets. Order matters:

1. `prepare` (before the process holds any secret): parent-death signal; with namespaces, new
   user (non-root only), mount, network, IPC and PID namespaces, the uid/gid maps written while
   the process may still write its own ``/proc/self`` files; then not dumpable; then a fork, so
   the rest runs as init of the new PID namespace.
2. `isolate` (after the job arrived): with namespaces, a new root holding only the working folder
   (a size-limited tmpfs), a read-only view of the interpreter's standard library (site-packages
   covered), the system library folders, ``/dev/null``-like devices, then ``pivot_root``; Landlock
   (where the kernel has it) restricting file access to the same paths; rlimits; the uid drop
   (root) or dropped capabilities (user namespace); not dumpable; seccomp; no new process.
"""

import os
import resource
import stat
import struct
import sys

from . import seccomp

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWIPC = 0x00020000, 0x10000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
# System calls without a libc wrapper: (pivot_root, capset) per machine.
_SYSCALLS = {"x86_64": (155, 126), "aarch64": (41, 91)}
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446

# Landlock file-system rights (include/uapi/linux/landlock.h).
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_MAKE_CHAR, LL_MAKE_BLOCK, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 6, 1 << 11, 1 << 14, 1 << 15
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
READ = LL_READ_FILE | LL_READ_DIR
WORK = ((1 << 16) - 1) & ~(LL_MAKE_CHAR | LL_MAKE_BLOCK | LL_EXECUTE | LL_IOCTL_DEV)
# Names never shown from the interpreter's or the system's library folders.
HIDDEN_NAMES = ("site-packages", "dist-packages")
_DEVICES = (("null", LL_READ_FILE | LL_WRITE_FILE), ("zero", LL_READ_FILE),
            ("urandom", LL_READ_FILE), ("random", LL_READ_FILE))


def _libc():
  import ctypes  # pylint: disable=import-outside-toplevel
  return ctypes, ctypes.CDLL(None, use_errno=True)


class Refused(Exception):
  """Neither namespaces nor Landlock isolate the program and unisolated runs are not allowed."""


def _checked(ctypes, result, what):
  """``result`` of a libc call or system call (-1 on failure, with errno set)."""
  if result < 0:
    errno = ctypes.get_errno()
    raise OSError(errno, "%s: %s" % (what, os.strerror(errno)))
  return result


def _write_file(path, text):
  fd = os.open(path, os.O_WRONLY)
  try:
    os.write(fd, text.encode())
  finally:
    os.close(fd)


def _set_parent_death_signal(libc, parent_pid):
  """SIGKILL when the parent ends; exits at once if it already has (``parent_pid`` is None inside
  a new PID namespace, where the parent is not visible)."""
  libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
  if parent_pid is not None and os.getppid() != parent_pid:
    os._exit(70)


def prepare(setup, report):
  """Step 1. Returns whether the process now runs inside new namespaces."""
  ctypes, libc = _libc()
  _set_parent_death_signal(libc, setup["parent_pid"])
  in_namespaces = False
  if setup["namespaces"]:
    user_namespace = os.geteuid() != 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
    try:
      outer_uid, outer_gid = os.geteuid(), os.getegid()
      _checked(ctypes, libc.unshare(flags | (CLONE_NEWUSER if user_namespace else 0)), "unshare")
      if user_namespace:
        # Still dumpable here: a process that is not dumpable cannot write these files.
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", "0 %d 1" % outer_uid)
        _write_file("/proc/self/gid_map", "0 %d 1" % outer_gid)
        report["user_namespace"] = True
      in_namespaces = True
    except OSError as e:
      report["errors"].append("namespaces: %s" % (e,))
      if setup["require_namespaces"]:
        raise
  # Not dumpable before any secret arrives: no process of the same uid can open this one's
  # memory or descriptors through /proc, nor ptrace it.
  _checked(ctypes, libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
  if in_namespaces:
    _become_namespace_init(libc)
    report["pid_namespace"] = report["ipc_namespace"] = report["network_namespace"] = True
  return in_namespaces


def _become_namespace_init(libc):
  """Forks; the child (init of the new PID namespace) returns. The parent stays outside, holds
  no descriptor (so the other side sees EOF when the child ends), and ends the way the child
  did (the trainer classifies the signal)."""
  child = os.fork()
  if not child:
    _set_parent_death_signal(libc, None)
    return
  os.closerange(0, 1 << 16)
  try:
    _, status = os.waitpid(child, 0)
  except BaseException:  # pylint: disable=broad-except
    os._exit(70)
  if os.WIFSIGNALED(status):
    import signal  # pylint: disable=import-outside-toplevel
    number = os.WTERMSIG(status)
    try:
      signal.signal(number, signal.SIG_DFL)
    except (OSError, ValueError):
      pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), number)
  os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 70)


# ---------------------------------------------------------------- what the program may see


def _real_dirs(paths):
  """Existing folders among ``paths`` (resolved), without one that lies inside another."""
  found = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
  return [p for p in found if not any(p.startswith(q + os.sep) for q in found if q != p)]


def interpreter_view():
  """Host paths of the minimal interpreter: ``stdlib`` (the folders on ``sys.path`` of a
  ``python -I -S``: the standard library and its extension modules), ``libraries`` (the folders
  of the shared libraries mapped now, e.g. libc's, where the extension modules' libraries are
  found) and ``files`` (the loader cache). Inside these, `_visible_entries` hides installed
  packages."""
  mapped = set()
  try:
    with open("/proc/self/maps") as maps:
      for line in maps:
        fields = line.split(None, 5)
        path = fields[5].strip() if len(fields) == 6 else ""
        if path.startswith("/") and ".so" in os.path.basename(path):
          mapped.add(os.path.dirname(os.path.realpath(path)))
  except OSError:
    pass
  files = [p for p in ("/etc/ld.so.cache",) if os.path.isfile(p)]
  return {"stdlib": _real_dirs(sys.path), "libraries": _real_dirs(mapped), "files": files}


def _hidden(folder, name):
  """Whether entry ``name`` of a library or standard-library folder stays out of view (the
  standard library itself is shown by its own entries): site-packages / dist-packages, and every
  ``python*`` folder (another interpreter's, or a prefix's ``lib/python3.X`` with its packages)."""
  path = os.path.join(folder, name)
  return name in HIDDEN_NAMES or (name.startswith("python") and os.path.isdir(path)
                                  and not os.path.islink(path))


def _visible_entries(folder):
  """Entries of a library or standard-library folder that the program may read."""
  return [name for name in sorted(os.listdir(folder)) if not _hidden(folder, name)]


# ---------------------------------------------------------------- the new root


def _mount(ctypes, libc, source, target, fstype, flags, data=None):
  _checked(ctypes, libc.mount(source and source.encode(), target.encode(),
                              fstype and fstype.encode(), flags, data and data.encode()),
           "mount " + target)


def _remount(ctypes, libc, target, flags):
  """Remounts the bind mount ``target`` with ``flags`` added, keeping its atime and noexec flags
  (in a user namespace those are locked and a remount that drops them fails)."""
  kept = os.statvfs(target).f_flag & (MS_NOEXEC | 1024 | 2048 | 4096)  # NOATIME NODIRATIME RELATIME
  _mount(ctypes, libc, None, target, None, MS_REMOUNT | MS_BIND | flags | kept)


def _make_dirs(root, path):
  current = root
  for part in path.strip("/").split("/"):
    current = os.path.join(current, part)
    if not os.path.isdir(current):
      os.mkdir(current, 0o755)
  return current


def build_root(setup, report, view, owner):
  """Step 2 with namespaces: the new root in the run's host folder (the current folder), then
  ``pivot_root``. Afterwards the current folder is ``/work``."""
  ctypes, libc = _libc()
  machine = os.uname().machine
  if machine not in _SYSCALLS:
    raise OSError(0, "no pivot_root number for %s" % machine)
  pivot_root = _SYSCALLS[machine][0]
  mount = lambda *args: _mount(ctypes, libc, *args)
  read_only = lambda target: _remount(ctypes, libc, target, MS_RDONLY | MS_NOSUID | MS_NODEV)
  root = os.getcwd()
  mount(None, "/", None, MS_REC | MS_PRIVATE)
  mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
  os.chdir(root)
  # Library folders, what they hide covered, then the standard library (which may lie in a
  # covered folder) and what it hides covered.
  for folders in (view["libraries"], view["stdlib"]):
    for folder in folders:
      target = _make_dirs(root, folder)
      mount(folder, target, None, MS_BIND)
      read_only(target)
    for folder in folders:
      for name in os.listdir(folder):
        if _hidden(folder, name):
          mount("tmpfs", root + os.path.join(folder, name), "tmpfs",
                MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1,mode=0555")
  for path in view["files"]:
    target = _make_dirs(root, os.path.dirname(path)) + "/" + os.path.basename(path)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o444))
    mount(path, target, None, MS_BIND)
    read_only(target)
  for name in os.listdir("/"):  # merged-/usr links such as lib -> usr/lib
    if os.path.islink("/" + name) and not os.path.exists(os.path.join(root, name)):
      os.symlink(os.readlink("/" + name), os.path.join(root, name))
  os.mkdir(os.path.join(root, "dev"), 0o755)
  for name, access in _DEVICES:
    if os.path.exists("/dev/" + name):
      target = os.path.join(root, "dev", name)
      os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
      mount("/dev/" + name, target, None, MS_BIND)
      _remount(ctypes, libc, target, MS_NOSUID | MS_NOEXEC |
               (0 if access & LL_WRITE_FILE else MS_RDONLY))
  os.mkdir(os.path.join(root, "work"), 0o755)
  mount("tmpfs", os.path.join(root, "work"), "tmpfs", MS_NOSUID | MS_NODEV,
        "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (setup["disk_bytes"], setup["max_inodes"],
                                                          owner[0], owner[1]))
  report["disk_quota"] = True
  # pivot_root(".", "."): the old root ends up on top of the new one and is detached at once.
  _checked(ctypes, libc.syscall(pivot_root, b".", b"."), "pivot_root")
  _checked(ctypes, libc.umount2(b".", MNT_DETACH), "umount old root")
  os.chdir("/")
  mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir("/work")
  report["minimal_root"] = True


# ---------------------------------------------------------------- Landlock


def landlock_rules(view, workdir):
  """(path, rights) pairs: the working folder, each visible entry of the standard library and
  the library folders (never site-packages), the loader cache, the devices."""
  rules = [(workdir, WORK)]
  for folder in view["stdlib"] + view["libraries"]:
    rules += [(os.path.join(folder, name), READ) for name in _visible_entries(folder)]
  rules += [(path, LL_READ_FILE) for path in view["files"]]
  rules += [("/dev/" + name, access) for name, access in _DEVICES if os.path.exists("/dev/" + name)]
  return rules


def _fill_import_caches():
  """Lists every ``sys.path`` folder into its import finder now, so imports keep working once
  Landlock denies listing the standard library's folder itself (which would show its
  site-packages); the finder only stats the folder afterwards."""
  import importlib.machinery  # pylint: disable=import-outside-toplevel
  for path in sys.path:
    finder = importlib.machinery.PathFinder._path_importer_cache(path)  # pylint: disable=protected-access
    if finder is not None and hasattr(finder, "_fill_cache"):
      try:
        finder._fill_cache()  # pylint: disable=protected-access
        finder._path_mtime = os.stat(path).st_mtime  # pylint: disable=protected-access
      except OSError:
        pass


def apply_landlock(rules, report):
  """Restricts this process (and the program after it) to ``rules``; False when the kernel has
  no Landlock. Rights the kernel's ABI lacks are dropped; ABI >= 4 also refuses every TCP bind
  and connect, ABI >= 6 signals and abstract unix sockets outside the sandbox."""
  ctypes, libc = _libc()
  abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
  if abi < 1:
    report["errors"].append("landlock: not available (%s)" % os.strerror(ctypes.get_errno()))
    return False
  handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0) | (
      LL_IOCTL_DEV if abi >= 5 else 0)
  attr = struct.pack("=QQQ", handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
  attr = attr[:8 if abi < 4 else 16 if abi < 6 else 24]
  buffer = ctypes.create_string_buffer(attr, len(attr))
  ruleset = _checked(ctypes, libc.syscall(_LANDLOCK_CREATE_RULESET, buffer, len(attr), 0),
                     "landlock_create_ruleset")
  try:
    _fill_import_caches()
    for path, rights in rules:
      try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
      except OSError:
        continue
      try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        allowed = rights & handled & (~0 if is_dir else LL_FILE_RIGHTS)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
        _checked(ctypes, libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0),
                 "landlock_add_rule " + path)
      finally:
        os.close(fd)
    _checked(ctypes, libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
    _checked(ctypes, libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
  finally:
    os.close(ruleset)
  report["landlock"] = True
  report["landlock_abi"] = abi
  return True


# ---------------------------------------------------------------- all layers


def _drop_capabilities(ctypes, libc):
  """Root of a user namespace keeps no capability (bounding set emptied, then capset 0)."""
  for capability in range(64):
    libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
  header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)
  data = ctypes.create_string_buffer(24)
  _checked(ctypes, libc.syscall(_SYSCALLS[os.uname().machine][1], header, data), "capset")


def isolate(setup, report, in_namespaces):
  """Step 2: every remaining layer; raises when a required one fails. Returns whether the run
  is unisolated (no namespaces and no Landlock: only allowed with ``allow_unisolated``)."""
  ctypes, libc = _libc()
  view = interpreter_view()
  user_namespace = bool(report.get("user_namespace"))
  if in_namespaces:
    build_root(setup, report, view, (0, 0) if user_namespace else (setup["uid"], setup["gid"]))
    report["namespaces"] = True
  landlock = False
  if setup["landlock"]:
    try:
      landlock = apply_landlock(landlock_rules(view, os.getcwd()), report)
    except OSError as e:
      report["errors"].append("landlock: %s" % (e,))
  unisolated = not in_namespaces and not landlock
  if unisolated and not setup["allow_unisolated"]:
    raise Refused("neither namespaces nor Landlock could isolate the program "
                          "(%s); set allow_unisolated=True to run it anyway"
                          % "; ".join(report["errors"]))
  limits = setup["limits"]
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
  # As PID 1 of its namespace the process would ignore a default-action SIGXCPU (the kernel
  # delivers to a namespace's init only the signals it handles): end with 128 + SIGXCPU so the
  # trainer reports the CPU-time limit. The program can change this handler, which changes
  # only the label of its failure, never the verdict.
  import signal  # pylint: disable=import-outside-toplevel
  signal.signal(signal.SIGXCPU, lambda *_: os._exit(128 + signal.SIGXCPU))
  resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
  resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
  if os.geteuid() == 0 and not user_namespace:
    os.setgroups([])
    os.setgid(setup["gid"])
    os.setuid(setup["uid"])
    report["dropped_privileges"] = True
    # The uid change cleared the parent-death signal.
    _set_parent_death_signal(libc, None if in_namespaces else setup["parent_pid"])
  elif user_namespace:
    _drop_capabilities(ctypes, libc)
    report["dropped_capabilities"] = True
  _checked(ctypes, libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
  try:
    filtered = seccomp.install(report, write_ban=unisolated)
  except OSError as e:
    report["errors"].append(str(e))
    filtered = False
  if unisolated and not filtered:  # the write ban is all that keeps the trainer's files safe
    raise Refused("an unisolated run needs the seccomp write ban, which failed: %s"
                  % "; ".join(report["errors"]))
  # After the uid change, so setuid is not affected; counts every task of the uid (threads too).
  resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
  report["rlimits"] = True
  report["unisolated"] = unisolated
  return unisolated
