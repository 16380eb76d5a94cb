"""A non-root trainer attacked through `RewardPool` (run by tests/test_reward_pool.py as uid 65534).

Usage: ``python tests/helpers/untrusted_trainer.py REPO DATA_DIR`` prints one JSON object, per sandbox
mode: the rewards of the attacks, whether the trainer's memory canary and its (editable)
installed project code changed, and the pool's failures. The trainer copies the project into a
folder of its own, owned by its uid (an editable install), and imports it from there.
"""

import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile


def main():
  repo, data_dir = sys.argv[1], sys.argv[2]
  home = tempfile.mkdtemp(prefix="untrusted_trainer_")
  shutil.copytree(os.path.join(repo, "dmpo_jax"), os.path.join(home, "dmpo_jax"),
                  ignore=shutil.ignore_patterns("__pycache__"))
  sys.path[:0] = [home, repo]  # this copy of dmpo_jax first, then tests.helpers
  os.environ["DMPO_JAX_DATA_DIR"] = data_dir
  from tests.helpers import sandbox_attacks  # pylint: disable=import-outside-toplevel
  from dmpo_jax import sandbox  # pylint: disable=import-outside-toplevel
  from dmpo_jax.tasks import get_task, reward_pool  # pylint: disable=import-outside-toplevel
  assert sandbox.__file__.startswith(home), sandbox.__file__
  example = get_task("mbpp").load_eval(data_dir=data_dir)[0]
  target = os.path.join(home, "dmpo_jax", "tasks", "code_tasks.py")
  digest = lambda: hashlib.sha256(open(target, "rb").read()).hexdigest()
  before = digest()
  canary = ctypes.create_string_buffer(b"CANARY-UNTOUCHED", 16)
  memory = sandbox_attacks.PROC_MEM_WRITER.format(address=ctypes.addressof(canary),
                                                  payload=b"PWNED")
  # Append a reward that always passes, then outlive the call's limit so the worker is replaced.
  overwrite = (sandbox_attacks.PROJECT_OVERWRITER.format(path=target, folders=12000)
               + "import time\ntime.sleep(60)\n")
  attacks = [sandbox_attacks.program_completion("mbpp", example, prelude)
             for prelude in (memory, overwrite)]
  wrong = sandbox_attacks.program_completion("mbpp", example, "")
  correct = sandbox_attacks.correct_completion("mbpp", example)
  modes = {"namespaces": {"require_namespaces": True}, "landlock": {"use_namespaces": False},
           "unisolated": {"use_namespaces": False, "use_landlock": False,
                          "allow_unisolated": True}}
  out = {}
  for mode, overrides in modes.items():
    config = sandbox.SandboxConfig(cpu_time_s=2, wall_time_s=5.0, **overrides)  # audit hook on
    pool = reward_pool.RewardPool("mbpp", "fixed", 1, timeout_s=4.0, sandbox=config)
    try:
      first = pool(attacks, [example] * 2).tolist()
      failures, replaced = list(pool.last_failures), pool.replaced_workers
      after = pool([wrong, correct], [example] * 2).tolist()  # served by the replaced worker
    finally:
      pool.close()
    out[mode] = {"first": first, "after": after, "failures": failures, "replaced": replaced,
                 "canary": canary.raw.decode(errors="replace"), "code_changed": digest() != before}
  shutil.rmtree(home, ignore_errors=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
