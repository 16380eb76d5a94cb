"""Reward-time benchmark: the slowest reward or evaluation scorer per task over a corpus of
adversarial completions (`dmpo_jax.tasks.reward_timing.adversarial_completions`), as JSON.

  python benchmarks/reward_time.py [--repeats=3] [--tasks=gsm8k,math,countdown,sudoku,humaneval,mbpp]
      [--math_verify]

For each task every text reward (all reward styles) and both evaluation scorers run on every
completion (up to 64 KiB each); code tasks time the code extraction (execution has the sandbox's
own limits). Time = CPU seconds of the calling thread, the worst of ``--repeats`` runs of the whole
corpus. ``--math_verify`` also times the math-verify equality of answers that never finish in
math-verify itself (``9^{9^{9}}``, ``1000000!``): wall seconds until the hard timeout answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmpo_jax.tasks import reward_timing  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tasks", default=",".join(reward_timing.TEXT_TASKS))
  parser.add_argument("--math_verify", action="store_true")
  args = parser.parse_args(argv)
  tasks = [t for t in args.tasks.split(",") if t]
  unknown = sorted(set(tasks) - set(reward_timing.TEXT_TASKS))
  if unknown:
    parser.error(f"--tasks: unknown {unknown}; known {list(reward_timing.TEXT_TASKS)}")
  cases = reward_timing.adversarial_completions()
  worst = {}
  for _ in range(max(1, args.repeats)):
    for task, result in reward_timing.slowest_times(cases, tasks).items():
      if task not in worst or result["seconds"] > worst[task]["seconds"]:
        worst[task] = result
  report = {
      "bound_seconds": reward_timing.TIME_BOUND_S,
      "num_completions": len(cases),
      "max_chars": max(len(c) for _, c in cases),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
      "slowest_per_task": {t: {"ms": round(1000 * r["seconds"], 2), "call": r["call"],
                               "completion": r["completion"],
                               "within_bound": r["seconds"] <= reward_timing.TIME_BOUND_S}
                           for t, r in worst.items()},
  }
  if args.math_verify:
    from dmpo_jax.tasks import math_utils  # pylint: disable=import-outside-toplevel
    math_utils.math_verify_equal("1", "1")  # start the worker (imports sympy)
    timings = {}
    for answer in ("9^{9^{9}}", "1000000!"):
      start = time.monotonic()
      equal = math_utils.math_verify_equal("1", answer)
      timings[answer] = {"wall_s": round(time.monotonic() - start, 2), "equal": equal}
      math_utils.math_verify_equal("1", "1")  # restart the worker outside the timed call
    report["math_verify_hard_timeout"] = timings
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
