"""The built-in demo, N seeds per objective: held-out accuracy and wall time, as JSON.

  python benchmarks/demo.py --objectives=bgpo,dmpo --seeds=0,1,2 [--config.num_steps=...]

Each run is exactly the README's demo command, in a fresh process and a fresh work folder:
``launch/train.py --config=configs/demo.py --workdir=W --config.objective=O --config.seed=S``
(extra ``--config.*`` arguments are passed through). Held-out accuracy comes from W/metrics.jsonl:
"after warm-up" is ``eval/accuracy`` at step 0 (right after the SFT warm-up, before RL), "end of RL"
is the last logged ``eval/accuracy``. Wall time is the whole process, compiles included. The JSON
has every run and, per objective, mean / min / max of the three numbers, plus the machine.
Runs are sequential; on a loaded machine the times say more about the load than about the code.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


def accuracy_curve(metrics_file: pathlib.Path) -> List[tuple]:
  """[(step, eval/accuracy)] of a run's metrics.jsonl, in step order (last write of a step wins)."""
  by_step: Dict[int, float] = {}
  for line in metrics_file.read_text().splitlines():
    row = json.loads(line)
    if "eval/accuracy" in row:
      by_step[int(row["step"])] = float(row["eval/accuracy"])
  if 0 not in by_step:
    raise ValueError(f"{metrics_file}: no eval/accuracy at step 0 (after the warm-up)")
  return sorted(by_step.items())


def run_demo(objective: str, seed: int, workdir: pathlib.Path, overrides: Sequence[str]
             ) -> Dict[str, Any]:
  command = [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/demo.py",
             f"--workdir={workdir}", f"--config.objective={objective}", f"--config.seed={seed}",
             "--noplot", *overrides]
  env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n"
                       f"{result.stderr[-3000:]}")
  curve = accuracy_curve(workdir / "metrics.jsonl")
  return {"objective": objective, "seed": seed, "accuracy_after_warmup": curve[0][1],
          "accuracy_end_of_rl": curve[-1][1], "final_step": curve[-1][0],
          "accuracy_curve": {str(step): acc for step, acc in curve}, "wall_s": round(wall, 1)}


def spread(values: Sequence[float]) -> Dict[str, float]:
  return {"mean": round(statistics.fmean(values), 2), "min": round(min(values), 2),
          "max": round(max(values), 2)}


def summarize(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  summary = {}
  for objective in dict.fromkeys(r["objective"] for r in runs):
    rows = [r for r in runs if r["objective"] == objective]
    summary[objective] = {"num_runs": len(rows), **{
        key: spread([r[key] for r in rows])
        for key in ("accuracy_after_warmup", "accuracy_end_of_rl", "wall_s")}}
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--objectives", default="bgpo,dmpo")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated config.seed values")
  parser.add_argument("--workdir_root", default=None,
                      help="keep the runs here (default: a temporary folder, deleted)")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (only --config.* overrides are passed through)")
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
  load_at_start = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="demo_bench_") as scratch:
    root = pathlib.Path(args.workdir_root or scratch)
    runs = []
    for objective in objectives:
      for seed in seeds:
        workdir = root / f"{objective}_seed{seed}"
        if workdir.exists():
          raise SystemExit(f"error: {workdir} exists; a demo benchmark needs fresh work folders")
        runs.append(run_demo(objective, seed, workdir, overrides))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
  print(json.dumps({
      "command": "python benchmarks/demo.py " + " ".join(
          [f"--objectives={args.objectives}", f"--seeds={args.seeds}", *overrides]),
      "machine": {"platform": platform.platform(), "processor": platform.machine(),
                  "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start,
                  "load_average_at_end": os.getloadavg()},
      "summary": summarize(runs), "runs": runs}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
