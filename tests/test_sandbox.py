"""Code sandbox (`docs/tasks.md` §6.3, `dmpo_jax/tasks/sandbox.py`): the verdict cannot be forged from
the program, nothing the program makes can hang or escape the trainer's cleanup, and the
isolation layers hold. Attacks run with the audit hook on and off (the OS layers and the judge
must hold on their own), as root and — when the tests run as root — again as an unprivileged
user. Every attack scores 0 with a reason, in bounded time."""

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import sandbox_attacks, sandbox_users
from dmpo_jax import sandbox
from dmpo_jax.sandbox import codec
from dmpo_jax.tasks import code_tasks, get_task

CONFIG = sandbox.SandboxConfig(cpu_time_s=2, wall_time_s=6.0, memory_bytes=512 << 20,
                               file_size_bytes=256 << 10)
NO_HOOK = dataclasses.replace(CONFIG, audit_hook=False)
REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
WORKERS = 4


@pytest.fixture(scope="module")
def layers():
  report = sandbox.protection_report(CONFIG)
  assert report["protected"], report
  return report


@pytest.fixture()
def temp_root():
  """A fresh folder for the sandbox's host folders, on tmpfs where there is one (deep trees are
  slow to make and remove on a loaded disk)."""
  base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
  root = pathlib.Path(tempfile.mkdtemp(prefix="sandbox_test_", dir=base))
  os.chmod(root, 0o755)
  yield root
  left = list(root.iterdir())
  sandbox.remove_tree(str(root))
  assert left == [], "the sandbox left folders behind"


@pytest.fixture()
def public_dir():
  """A world-writable folder that an unprivileged uid can reach (pytest's own tmp_path is
  private to root, which would stop the attacks for the wrong reason)."""
  folder = pathlib.Path(tempfile.mkdtemp(prefix=".sandbox_test_", dir=REPO))
  os.chmod(folder, 0o777)
  yield folder
  sandbox.remove_tree(str(folder))


def suite(code, *calls):
  return sandbox.TestSuite(code=code, calls=calls)


def run_bounded(source, config=CONFIG, tests=None, bound=15.0):
  start = time.monotonic()
  result = sandbox.run_program(source, config, tests)
  assert time.monotonic() - start < bound, result
  return result


def run_many(sources, config=CONFIG, tests=None, bound=20.0):
  start = time.monotonic()
  results = sandbox.run_programs(sources, config, max_workers=WORKERS, tests=tests)
  assert time.monotonic() - start < bound, results
  return results


def assert_zero(result, *statuses):
  assert not result.passed, result
  assert result.reason, result
  if statuses:
    assert result.status in statuses, result


# ---------------------------------------------------------------- the verdict


def test_judge_passes_correct_and_fails_wrong_with_the_failing_line(layers):
  tests = suite("assert double(2) == 4\nassert double([1]) == [1, 1]\n", "double")
  good, wrong, missing = run_many(["def double(x):\n  return x * 2\nprint('loaded')\n",
                                   "def double(x):\n  return x * 3\n", "x = 1\n"],
                                  tests=[tests] * 3)
  assert good.passed and good.status == "passed" and good.output == "loaded\n", good
  assert_zero(wrong, "failed")
  assert "tests line 1: assert double(2) == 4" in wrong.reason
  assert_zero(missing, "failed")
  assert "NameError" in missing.reason
  if ROOT:
    assert layers["dropped_privileges"]
  assert layers["rlimits"]


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_forged_verdicts_score_zero_end_to_end(config):
  """Real-looking HumanEval/MBPP-style tasks: correct solutions score 1, every attack on the
  harness (cycled over the tasks, so each task meets several) scores 0 with a reason."""
  tasks = sandbox_attacks.tasks()
  jobs = [(kind, example, sandbox_attacks.correct_completion(kind, example), True)
          for kind, example in tasks]
  for i, attack in enumerate(sandbox_attacks.all_attacks()):
    kind, example = tasks[i % len(tasks)]
    jobs.append((kind, example, sandbox_attacks.forged_completion(kind, example, attack), False))
  start = time.monotonic()
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    results = list(pool.map(lambda j: code_tasks.run_completion(j[2], j[1], j[0], config), jobs))
  assert time.monotonic() - start < 40
  for (kind, example, completion, expected), result in zip(jobs, results):
    assert result.passed == expected, (example["task_id"], completion, result)
    assert expected or result.reason, result
  # The reward functions give the same numbers.
  kind, example = tasks[0]
  (_, reward), = get_task(kind).reward_functions("fixed")
  assert reward(sandbox_attacks.correct_completion(kind, example), example) == 1.0
  assert reward("no code here", example) == 0.0


def test_every_forgery_fails_on_a_humaneval_and_an_mbpp_task():
  """All attacks against one task of each kind, to cover every attack/kind pair."""
  jobs = []
  for kind, example in (sandbox_attacks.tasks()[0], sandbox_attacks.tasks()[5]):
    jobs += [(kind, example, sandbox_attacks.forged_completion(kind, example, attack))
             for attack in sandbox_attacks.all_attacks()]
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    results = list(pool.map(lambda j: code_tasks.run_completion(j[2], j[1], j[0], NO_HOOK), jobs))
  for job, result in zip(jobs, results):
    assert_zero(result)


def test_codec_rebuilds_plain_data_only():
  values = [None, True, False, 0, -7, 3 ** 500, 1.5, float("inf"), -0.0, 2 + 3j, "tö\ud800",
            b"\x00\xff", bytearray(b"ab"), [1, [2, (3,)]], (), {"a": [1], 2: (3, 4)},
            {1, "x"}, frozenset({(1, 2)}), range(1, 9, 2)]
  for value in values:
    rebuilt = codec.decode(json.loads(json.dumps(codec.encode(value))))
    assert type(rebuilt) is type(value) and rebuilt == value, (value, rebuilt)
  nan = codec.decode(codec.encode(float("nan")))
  assert nan != nan
  assert list(codec.decode(codec.encode(map(abs, [-1, 2])))) == [1, 2]

  class Sneaky(int):
    def __eq__(self, other):
      return True
    __hash__ = int.__hash__

  with pytest.raises(TypeError):
    codec.encode(Sneaky(1))  # the judge side never sends objects
  handles = []
  tree = codec.encode([Sneaky(1)], 0, handles)
  opaque = codec.decode(tree)[0]
  assert handles[0] == 1 and opaque != 1 and opaque != opaque.__class__(0, "int", True)
  assert opaque == opaque and bool(opaque)
  deep = ["N"]
  for _ in range(5000):
    deep = ["L", [deep]]
  for bad in (["I", "1" * (1 << 17)], ["L", [["N"]] * 3 + [["?"]]], ["D", [[["L", []], ["N"]]]],
              ["B", 2], ["F", "x"], ["S", 5], ["H", 0], 7, [], ["E", [["L", []]]],
              ["X", 0, "t", 1, 2], deep):
    with pytest.raises(codec.BadReply):
      codec.decode(bad)


# ---------------------------------------------------------------- OS limits


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_loops_forks_memory_and_exits(config):
  memory = dataclasses.replace(config, cpu_time_s=5, wall_time_s=8.0)
  config = dataclasses.replace(config, cpu_time_s=1, wall_time_s=3.0)
  sources = ["while True:\n  pass\n", "import time\ntime.sleep(60)\n",
             "import os\nwhile True:\n  os.fork()\n",
             "import threading\nthreading.Thread(target=print).start()\n",
             "import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
             "import os\nos.closerange(0, 4096)\n"]
  results = run_many(sources, config)
  for result in results[:2]:
    assert_zero(result, "timeout")
  assert_zero(results[2], "forbidden" if config.audit_hook else "failed")
  for result in results[3:6]:
    assert_zero(result)
  assert_zero(results[6], "no_result", "bad_reply")
  for result in run_many(["x = bytearray(2 << 30)\n",
                          "x = []\nwhile True:\n  x.append(bytearray(10**8))\n"], memory):
    assert_zero(result, "memory_limit")


@pytest.mark.parametrize("config", [CONFIG, NO_HOOK], ids=["hook", "os_only"])
def test_shell_files_and_network(config, public_dir):
  tmp_path = public_dir
  canary = tmp_path / "canary"
  canary.mkdir()
  (canary / "keep.txt").write_text("keep")
  os.chmod(tmp_path, 0o755)
  os.chmod(canary, 0o777)  # world-writable on purpose: only the sandbox may stop the attack
  os.chmod(canary / "keep.txt", 0o666)
  target = canary / "pwned"
  sources = [f"import os\nassert os.system('touch {target}') == 0\n",
             f"import subprocess\nsubprocess.run(['touch', '{target}'])\n",
             f"import os\nos.remove('{canary / 'keep.txt'}')\n",
             f"open('{canary / 'new.txt'}', 'w').write('x')\n",
             f"import shutil\nshutil.rmtree('{REPO / 'tests'}')\n",
             f"open('{REPO / 'pwned.txt'}', 'w').write('x')\n",
             "import socket\nsocket.create_connection(('1.1.1.1', 80), 2)\n",
             "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"]
  results = run_many(sources, config)
  for result in results[:-1]:
    assert_zero(result)
  assert results[-1].passed, results[-1]  # its own folder is writable
  assert not target.exists() and (canary / "keep.txt").read_text() == "keep"
  assert sorted(p.name for p in canary.iterdir()) == ["keep.txt"]
  assert (REPO / "tests" / "conftest.py").exists() and not (REPO / "pwned.txt").exists()


def test_endless_output_is_cut_from_the_pipe():
  result = run_bounded("while True:\n  print('x' * 1000)\n")
  assert_zero(result, "output_limit")
  assert 0 < len(result.output) <= 4000


# ---------------------------------------------------------------- hangs and leftovers

LEFTOVERS = r"""
import os, stat
os.mkfifo('output.txt')
os.mknod('sock', stat.S_IFSOCK | 0o600)
os.symlink('/etc/passwd', 'link')
os.symlink('/', 'root_link')
os.mkdir('locked')
open('locked/f', 'w').write('x')
os.chmod('locked', 0o500)
fd = os.open('.', os.O_RDONLY)
for _ in range(5000):
  os.mkdir('d', dir_fd=fd)
  child = os.open('d', os.O_RDONLY, dir_fd=fd)
  os.close(fd)
  fd = child
os.mkfifo('fifo', dir_fd=fd)
os.chmod(fd, 0o500)
def ready():
  return 1
"""


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "host_folder"])
@pytest.mark.slow
def test_fifo_deep_tree_and_locked_folders_neither_hang_nor_stay(namespaces, temp_root):
  config = dataclasses.replace(NO_HOOK, use_namespaces=namespaces, temp_root=str(temp_root),
                               max_inodes=20000, max_open_files=64, cpu_time_s=5,
                               wall_time_s=10.0)
  result = run_bounded(LEFTOVERS, config, suite("assert ready() == 1\n", "ready"), bound=30.0)
  assert result.passed, result
  # temp_root's teardown asserts that nothing is left


def test_remove_tree_any_tree(temp_root):
  tmp_path = temp_root
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep.txt").write_text("keep")
  tree = tmp_path / "tree"
  tree.mkdir()
  fd = os.open(tree, os.O_RDONLY)
  for depth in range(5000):
    os.mkdir("d", dir_fd=fd)
    if depth % 1000 == 0:
      os.mkfifo("fifo", dir_fd=fd)
      os.symlink(str(outside), "link_dir", dir_fd=fd)
      os.symlink(str(outside / "keep.txt"), "link_file", dir_fd=fd)
      with socket.socket(socket.AF_UNIX) as server:
        server.bind(f"/proc/self/fd/{fd}/sock")
    child = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.chmod("d", 0o500 if depth % 2 else 0o000, dir_fd=fd)
    os.close(fd)
    fd = child
  os.close(fd)
  start = time.monotonic()
  assert sandbox.remove_tree(str(tree))
  assert time.monotonic() - start < 20
  assert not tree.exists() and (outside / "keep.txt").read_text() == "keep"
  assert sandbox.remove_tree(str(tmp_path / "missing"))  # never raises
  shutil.rmtree(outside)


def test_output_is_never_read_from_a_file(public_dir):
  tmp_path = public_dir
  secret = tmp_path / "secret.txt"
  secret.write_text("TOP-SECRET-CANARY")
  os.chmod(secret, 0o600)
  os.chmod(tmp_path, 0o755)
  source = (f"import os\nos.symlink('{secret}', 'output.txt')\n"
            f"os.symlink('{secret}', 'stdout')\n")
  if ROOT:  # root-only file: the dropped uid cannot read it at all
    source += f"try:\n  print(open('{secret}').read())\nexcept OSError as e:\n  print('denied')\n"
  result = run_bounded(source, NO_HOOK)
  assert "TOP-SECRET-CANARY" not in result.output
  if ROOT:
    assert "denied" in result.output, result


# ---------------------------------------------------------------- isolation

SYSV_SHM = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ids = [libc.shmget(0x5EED0000 + i, 1 << 20, 0o1666) for i in range(4)]
print('shm', ids, ctypes.get_errno())
"""


def _sysv_keys():
  try:
    with open("/proc/sysvipc/shm") as f:
      return {int(line.split()[0]) for line in f.readlines()[1:]}
  except OSError:
    return set()


def test_sysv_shared_memory_does_not_outlive_the_run(layers):
  result = run_bounded(SYSV_SHM, NO_HOOK)
  assert result.passed, result
  assert "shm [-1, -1, -1, -1]" in result.output or layers.get("ipc_namespace"), result
  assert not {0x5EED0000 + i for i in range(4)} & _sysv_keys()


KILLER = r"""
import os, time
killed = 0
for pid in list(range(1, 5000)):
  try:
    os.kill(pid, 9)
    killed += 1
  except OSError:
    pass
print('killed', killed)
def harm():
  return 0
"""


def test_a_sandbox_cannot_kill_a_concurrent_one():
  victim = "import time\ndef slow(x):\n  time.sleep(1.5)\n  return x + 1\n"
  results = run_many([victim, KILLER, victim], NO_HOOK,
                     tests=[suite("assert slow(1) == 2\n", "slow"),
                            suite("assert harm() == 0\n", "harm"),
                            suite("assert slow(2) == 3\n", "slow")])
  assert results[0].passed and results[2].passed, results
  assert "killed 0" in results[1].output, results[1]


ARGV_READER = r"""
import os
found = []
try:
  pids = list(filter(str.isdigit, os.listdir('/proc')))
except OSError:
  pids = []
for pid in pids:
  try:
    found.append(open('/proc/%s/cmdline' % pid, 'rb').read().decode(errors='replace'))
  except (OSError, ValueError):
    pass
print('pids', len(found), 'secret' if any('SECRET-API-KEY' in c for c in found) else 'clean')
"""


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "landlock"])
def test_trainer_argv_and_other_processes_are_invisible(namespaces):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "--api_key=SECRET-API-KEY"])
  try:
    result = run_bounded(ARGV_READER, dataclasses.replace(NO_HOOK, use_namespaces=namespaces))
  finally:
    holder.kill()
    holder.wait()
  assert result.passed and result.output == "pids 0 clean\n", result


def test_no_unix_socket_outside_the_folder():
  folder = pathlib.Path(tempfile.mkdtemp(prefix=".sock_test_", dir=REPO))
  path = folder / "s.sock"
  name = f"\0dmpo_sandbox_test_{os.getpid()}"
  server = socket.socket(socket.AF_UNIX)
  abstract = socket.socket(socket.AF_UNIX)
  try:
    os.chmod(folder, 0o777)
    server.bind(str(path))
    os.chmod(path, 0o777)
    abstract.bind(name)
    for listener in (server, abstract):
      listener.listen(4)
      listener.setblocking(False)
    source = (f"import socket\nfor address in ({str(path)!r}, {name!r}):\n"
              "  try:\n    s = socket.socket(socket.AF_UNIX)\n    s.connect(address)\n"
              "    print('connected')\n  except OSError as e:\n    print('refused', e)\n")
    result = run_bounded(source, NO_HOOK)
    assert "connected" not in result.output and result.output.count("refused") == 2, result
    for listener in (server, abstract):  # a connection would wait in the backlog
      with pytest.raises(BlockingIOError):
        listener.accept()
  finally:
    server.close()
    abstract.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_total_disk_quota(layers):
  if not layers.get("disk_quota"):
    pytest.skip("no mount namespace on this machine (documented: no total disk quota there)")
  config = dataclasses.replace(NO_HOOK, file_size_bytes=4 << 20, disk_bytes=32 << 20)
  source = ("import os\nwritten = 0\ntry:\n  for i in range(100):\n"
            "    with open('f%d' % i, 'wb') as f:\n      f.write(b'x' * (3 << 20))\n"
            "    written += 3\nexcept OSError as e:\n  print('stopped', written, e.errno)\n")
  result = run_bounded(source, config)
  assert result.passed and "stopped" in result.output, result
  assert int(result.output.split()[1]) <= 32 and result.output.split()[2] == "28", result


# ---------------------------------------------------------------- the same as an unprivileged user

_DRIVER = r"""
config = sbx.SandboxConfig(**PAYLOAD["config"])
results = sbx.run_programs([j["source"] for j in PAYLOAD["runs"]], config, max_workers=4,
                           tests=[sbx.TestSuite(j["tests"]["code"], tuple(j["tests"]["calls"]),
                                                j["tests"]["setup"]) for j in PAYLOAD["runs"]])
print(json.dumps([{"passed": r.passed, "status": r.status, "reason": r.reason,
                   "output": r.output, "protections": r.protections} for r in results]))
"""


def run_unprivileged(runs, config):
  """Runs (source, TestSuite) pairs through the sandbox started by an unprivileged user (uid
  65534 when the tests run as root, `sandbox_users`), else this user."""
  payload = {"config": config,
             "runs": [{"source": s, "tests": dataclasses.asdict(t)} for s, t in runs]}
  return sandbox_users.run_package_as_user(_DRIVER, payload)


@pytest.mark.parametrize("namespaces", [True, False], ids=["user_namespace", "no_namespaces"])
def test_attacks_as_an_unprivileged_user(namespaces):
  config = {"cpu_time_s": 2, "wall_time_s": 6.0, "memory_bytes": 512 << 20,
            "file_size_bytes": 256 << 10, "audit_hook": False, "use_namespaces": namespaces}
  runs = []
  for kind, example in sandbox_attacks.tasks()[::3]:
    make = code_tasks.humaneval_job if kind == "humaneval" else code_tasks.mbpp_job
    runs.append(make(code_tasks.extract_code(sandbox_attacks.correct_completion(kind, example)),
                     example))
    for attack in ("runner_send_passed", "nonce_written_to_every_fd", "always_equal",
                   "proc_fds_written", "judge_killed", "system_exit_in_call"):
      runs.append(make(code_tasks.extract_code(
          sandbox_attacks.forged_completion(kind, example, attack)), example))
  checks = [(SYSV_SHM + "def ok():\n  return 1\n", suite("assert ok() == 1\n", "ok")),
            (KILLER, suite("assert harm() == 0\n", "harm")),
            ("import time\ndef slow(x):\n  time.sleep(1.5)\n  return x + 1\n",
             suite("assert slow(1) == 2\n", "slow")),
            ("import socket\ns = socket.socket(socket.AF_UNIX)\n", suite("")),
            (LEFTOVERS.replace("5000", "500"), suite("assert ready() == 1\n", "ready")),
            (f"open({str(REPO / 'pwned_unprivileged.txt')!r}, 'w').write('x')\n", suite(""))]
  results = run_unprivileged(runs + checks, config)
  per_task = 7
  for i, result in enumerate(results[:len(runs)]):
    assert result["passed"] == (i % per_task == 0), (i, result)
    assert result["passed"] or result["reason"]
  shm, killer, victim, sock, leftovers, write = results[len(runs):]
  assert "shm [-1, -1, -1, -1]" in shm["output"] or shm["protections"].get("ipc_namespace"), shm
  assert "killed 0" in killer["output"] and victim["passed"], (killer, victim)
  assert not sock["passed"] and "PermissionError" in sock["reason"], sock
  assert leftovers["passed"], leftovers
  assert not {0x5EED0000 + i for i in range(4)} & _sysv_keys()
  pwned = (REPO / "pwned_unprivileged.txt").exists()
  (REPO / "pwned_unprivileged.txt").unlink(missing_ok=True)
  assert not write["passed"] and not pwned, write
  layers = results[0]["protections"]
  if namespaces:  # a user namespace really holds (it failed silently before)
    assert layers.get("namespaces") and layers.get("pid_namespace") and layers.get("minimal_root"), layers
    assert layers.get("user_namespace"), layers  # the driver runs as a non-root user
  else:
    assert layers.get("landlock") and not layers.get("namespaces"), layers
