"""The seccomp filter of the sandbox processes (x86_64; `docs/sandbox.md` §3, layer "seccomp").

Runs inside the sandbox processes (sent as source by :mod:`dmpo_jax.sandbox.runner`); standard
library only. System calls the sandbox never needs fail with ``EPERM``: sockets (no network, no
unix socket anywhere), tracing and other processes' memory, signals to other processes, SysV/POSIX
IPC, namespaces, mounts and ``pivot_root``, ``execve``, ``io_uring`` (which could create sockets
without socket(2)), kernel keyrings, bpf, perf, userfaultfd, new sessions/process groups, a path
``truncate``. Argument checks refuse what would direct signals at another process or let the
program change its death signal: ``fcntl`` ``F_SETOWN``/``F_SETOWN_EX``/``F_SETSIG``/
``F_SETLEASE``/``F_NOTIFY``, ``ioctl`` ``FIOSETOWN``/``SIOCSPGRP``/``FIOASYNC``/``TIOCSTI``,
``prctl`` ``PR_SET_PDEATHSIG``/``PR_SET_DUMPABLE``. With ``write_ban`` (the unisolated mode, where
nothing else stops a write) every system call that creates, changes or removes a file by path, and
every ``open`` for writing, fails too.
"""

import os

AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22

# x86_64 numbers. socket, socketpair, ptrace, process_vm_readv/writev, kill, tkill, tgkill,
# rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_send_signal, pidfd_open, pidfd_getfd, unshare, setns,
# mount, umount2, pivot_root, chroot, add_key, request_key, keyctl, bpf, perf_event_open,
# userfaultfd, io_uring_*, shmget/shmat/shmctl, semget/semop/semctl, msgget/msgsnd/msgrcv/msgctl,
# mq_open, setsid, setpgid, kexec_load, init/delete/finit_module, name_to_handle_at,
# open_by_handle_at, fsopen/fsconfig/fsmount/fspick/move_mount/open_tree, mount_setattr, execve,
# execveat, truncate, acct, swapon, swapoff, reboot, quotactl, lookup_dcookie.
BLOCKED = (
    41, 53, 101, 310, 311, 62, 200, 234, 129, 297, 424, 434, 438, 272, 308, 165, 166, 155, 161,
    248, 249, 250, 321, 298, 323, 425, 426, 427, 29, 30, 31, 64, 65, 66, 220, 68, 69, 70, 71, 240,
    112, 109, 246, 175, 176, 313, 303, 304, 428, 429, 430, 431, 432, 442, 59, 322, 76, 163, 167, 168,
    169, 179, 212)
# With write_ban: creat, link, unlink, symlink, mkdir, rmdir, rename, mknod, chmod, fchmod,
# chown, fchown, lchown, ftruncate, utime, utimes, setxattr family, removexattr family, renameat,
# mkdirat, mknodat, fchownat, futimesat, unlinkat, renameat2, linkat, symlinkat, fchmodat,
# utimensat, fallocate, openat2, fchmodat2, setxattrat, removexattrat.
WRITE_BANNED = (
    85, 86, 87, 88, 83, 84, 82, 133, 90, 91, 92, 93, 94, 77, 132, 235, 188, 189, 190, 197, 198,
    199, 264, 258, 259, 260, 261, 263, 316, 265, 266, 268, 280, 285, 437, 452, 463, 466)
_OPEN, _OPENAT, _FCNTL, _IOCTL, _PRCTL = 2, 257, 72, 16, 157
_FCNTL_REFUSED = (8, 15, 10, 1024, 1026)  # F_SETOWN, F_SETOWN_EX, F_SETSIG, F_SETLEASE, F_NOTIFY
_IOCTL_REFUSED = (0x8901, 0x8902, 0x5452, 0x5412)  # FIOSETOWN, SIOCSPGRP, FIOASYNC, TIOCSTI
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _DENY, _KILL = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # EPERM = 1


def _argument(index):
  """Offset of the low 32 bits of argument ``index`` in ``struct seccomp_data`` (little-endian)."""
  return 16 + 8 * index


def _refuse_values(number, argument, values):
  """Instructions: system call ``number`` with argument ``argument`` in ``values`` -> EPERM, with
  another value -> allowed; other system calls fall through."""
  body = [(_LD_W_ABS, 0, 0, _argument(argument))]
  for i, value in enumerate(values, 1):
    body.append((_JEQ, len(values) + 1 - i, 0, value))
  body += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _DENY)]
  return [(_JEQ, 0, len(body), number)] + body


def _refuse_bits(number, argument, mask):
  """Instructions: system call ``number`` with any bit of ``mask`` set in argument ``argument``
  -> EPERM, else allowed; other system calls fall through."""
  body = [(_LD_W_ABS, 0, 0, _argument(argument)), (_JSET, 0, 1, mask), (_RET, 0, 0, _DENY),
          (_RET, 0, 0, _ALLOW)]
  return [(_JEQ, 0, len(body), number)] + body


def filter_program(write_ban):
  """The filter as (code, jt, jf, k) instructions (classic BPF over ``struct seccomp_data``)."""
  code = [(_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, AUDIT_ARCH_X86_64), (_RET, 0, 0, _KILL),
          (_LD_W_ABS, 0, 0, 0), (_JGE, 0, 1, 0x40000000), (_RET, 0, 0, _DENY)]
  for number in BLOCKED + (WRITE_BANNED if write_ban else ()):
    code += [(_JEQ, 0, 1, number), (_RET, 0, 0, _DENY)]
  # Each block below returns (allow or deny) for its system call, so the accumulator may be
  # reloaded inside it.
  code += _refuse_values(_FCNTL, 1, _FCNTL_REFUSED)
  code += _refuse_values(_IOCTL, 1, _IOCTL_REFUSED)
  code += _refuse_values(_PRCTL, 0, (PR_SET_PDEATHSIG, PR_SET_DUMPABLE))
  if write_ban:
    code += _refuse_bits(_OPEN, 1, _WRITE_FLAGS)
    code += _refuse_bits(_OPENAT, 2, _WRITE_FLAGS)
  return code + [(_RET, 0, 0, _ALLOW)]


def install(report, write_ban=False):
  """Installs the filter (no_new_privs first). Off x86_64: nothing, with an error in ``report``."""
  import ctypes  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel
  if platform.machine() not in ("x86_64", "AMD64"):
    report["errors"].append("seccomp filter only written for x86_64, not %s" % platform.machine())
    return False
  libc = ctypes.CDLL(None, use_errno=True)

  class Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]

  class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

  code = filter_program(write_ban)
  instructions = (Instruction * len(code))(*[Instruction(*i) for i in code])
  program = Program(len(code), instructions)
  for what, arguments in (("no_new_privs", (PR_SET_NO_NEW_PRIVS, 1, 0)),
                          ("seccomp", (PR_SET_SECCOMP, 2, ctypes.byref(program)))):  # MODE_FILTER
    if libc.prctl(*arguments, 0, 0) != 0:
      errno = ctypes.get_errno()
      raise OSError(errno, "%s: %s" % (what, os.strerror(errno)))
  report["seccomp"] = True
  if write_ban:
    report["write_ban"] = True
  return True
