"""Running sandbox code as an unprivileged user from tests that run as root (as CI does).

The user is uid/gid 65534 (``nobody``), a real non-root account with no supplementary groups.
Two ways, both real runs of the code under test:

* `run_package_as_user`: a copy of the stdlib-only ``dmpo_jax/sandbox`` package, imported by a
  Python interpreter the user can read (``/usr/bin/python3`` when this venv's lives in a private
  folder such as ``/root``).
* `run_repo_as_user`: this repository's Python with its whole environment (numpy, the tasks,
  ``RewardPool``), for a driver script. When the interpreter lies under a folder the user cannot
  enter (``/root``), the driver runs in a private mount namespace in which that folder is a
  world-readable tmpfs holding only a bind mount of the interpreter's installation; nothing else
  changes. Needs root with ``unshare``/``mount`` (skipped with the reason otherwise).
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
USER = 65534
ROOT = os.geteuid() == 0


def _traversable(path):
  for parent in pathlib.Path(path).resolve().parents:
    if not os.stat(parent).st_mode & 0o001:
      return False
  return True


def user_python():
  """An interpreter (with its standard library) that the unprivileged user can run."""
  for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
    if os.path.exists(candidate) and _traversable(candidate):
      return candidate
  return None


def public_folder(prefix):
  """A fresh world-readable folder the user can write into (not pytest's private tmp_path)."""
  base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
  folder = tempfile.mkdtemp(prefix=prefix, dir=base)
  os.chmod(folder, 0o777)
  return pathlib.Path(folder)


def _as_user():
  return {"user": USER, "group": USER, "extra_groups": []} if ROOT else {}


def run_package_as_user(driver, payload, timeout=180):
  """Runs ``driver`` (Python text; ``sbx`` is the sandbox package, ``PAYLOAD`` the decoded
  ``payload``) as the user with a copy of ``dmpo_jax/sandbox``; returns its JSON output."""
  python = user_python() if ROOT else sys.executable
  if python is None:
    pytest.skip("no Python interpreter readable by an unprivileged user")
  folder = public_folder("sbx_user_")
  try:
    shutil.copytree(REPO / "dmpo_jax" / "sandbox", folder / "sbx",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [folder, *folder.rglob("*")]:
      os.chmod(path, 0o755 if path.is_dir() else 0o644)
    text = ("import json, sys\nsys.path.insert(0, %r)\nimport sbx\nPAYLOAD = json.loads(sys.stdin.read())\n"
            % str(folder)) + driver
    completed = subprocess.run([python, "-I", "-c", text], input=json.dumps(payload),
                               capture_output=True, text=True, timeout=timeout, cwd=folder,
                               check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(folder)},
                               **_as_user())
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return json.loads(completed.stdout.splitlines()[-1])


def run_repo_as_user(script, args=(), env=None, timeout=300):
  """Runs ``script`` (a file) with this repository's interpreter as the user; returns the
  completed process. See the module docstring for the interpreter's visibility."""
  if not ROOT:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
  if not (shutil.which("unshare") and shutil.which("setpriv")):
    pytest.skip("running the repository as another user needs unshare and setpriv")
  base = pathlib.Path(sys.base_prefix).resolve()
  blocked = next((p for p in reversed(base.parents) if not os.stat(p).st_mode & 0o001), None)
  view = tempfile.mkdtemp(prefix="pyview_")  # the installation's mount point while it is hidden
  steps = []
  if blocked is not None:  # e.g. /root: a tmpfs there holding only the interpreter's installation
    target = shlex.quote(str(blocked / base.relative_to(blocked)))
    steps = [f"mount --bind {shlex.quote(str(base))} {view}",
             f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(blocked))}",
             f"mkdir -p {target}", f"mount --bind {view} {target}"]
  command = " && ".join(steps + [
      f"exec setpriv --reuid={USER} --regid={USER} --clear-groups --inh-caps=-all "
      f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} "
      + " ".join(shlex.quote(str(a)) for a in args)])
  try:
    completed = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                command], capture_output=True, text=True, timeout=timeout,
                               env=env, check=False)
  finally:
    os.rmdir(view)
  if completed.returncode and ("unshare: " in completed.stderr or "mount: " in completed.stderr):
    pytest.skip(f"no private mount namespace for the unprivileged run: {completed.stderr[:300]}")
  return completed
