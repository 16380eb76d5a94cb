"""Rescore existing generations (ours or another system's) with a task's evaluation scorer.

Usage:
  python launch/score.py --task=gsm8k --input=generations.jsonl [--rewards] [--reward_style=d1]
      [--eval_style=d1]

Each input row holds ``completion`` plus the task's reference fields:
  gsm8k, math: ``answer``;  countdown: ``numbers`` (list or "a,b,c") and ``target``;
  sudoku: ``puzzle`` and ``solution`` (16-character strings);  humaneval, mbpp: ``task_id``
  (looked up in the dataset). Optional: ``use_math_verify`` is a flag, not a row field.
Prints one JSON line per row (with ``score``; with ``--rewards`` also the training rewards and
their sum) and a final summary line (JSON, with ``accuracy``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from dmpo_jax import cli  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import base  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import get_task, read_records, task_names  # noqa: E402  pylint: disable=wrong-import-position


def reference_example(task: base.Task, row: Dict[str, Any], row_index: int,
                      data_dir: Optional[str]) -> base.Example:
  missing = [f for f in ("completion",) + tuple(task.reference_fields) if f not in row]
  if missing:
    raise KeyError(f"row {row_index} lacks field(s) {missing} needed by task {task.name}; "
                   f"has {sorted(row)}")
  if task.name in ("humaneval", "mbpp"):
    return task.lookup(row["task_id"], data_dir=data_dir)
  return task.normalize(row)


def score_rows(task_name: str, rows: Sequence[Dict[str, Any]], rewards: bool = False,
               reward_style: str = base.DEFAULT_REWARD_STYLE, use_math_verify: bool = False,
               data_dir: Optional[str] = None, eval_style: str = base.DEFAULT_EVAL_STYLE) -> tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """(per-row results, summary); results keep ``task_id``/``index`` for reference."""
  task = get_task(task_name)
  base.check_eval_style(eval_style, task_name)
  examples = [reference_example(task, row, i, data_dir) for i, row in enumerate(rows)]
  completions = [str(row["completion"]) for row in rows]
  options = {"use_math_verify": use_math_verify} if use_math_verify else {}
  scores = task.score_many(completions, examples, **options,
                           **({"eval_style": eval_style} if eval_style != "fixed" else {}))
  results = []
  reward_fns = task.reward_functions(reward_style, **options) if rewards else []
  for index, (row, example, score) in enumerate(zip(rows, examples, scores)):
    result = {"index": index, **{k: v for k, v in score.items()}}
    if "task_id" in row:
      result["task_id"] = row["task_id"]
    if reward_fns:
      values = {name: float(fn(completions[index], example)) for name, fn in reward_fns}
      result["rewards"] = values
      result["reward"] = float(sum(values.values()))
    results.append(result)
  summary = task.summarize(scores)
  summary["input_rows"] = len(rows)
  summary["eval_style"] = eval_style
  if reward_fns:
    summary["reward_style"] = reward_style
    summary["mean_reward"] = sum(r["reward"] for r in results) / len(results) if results else 0.0
  return results, summary


FLAGS = flags.FlagValues()
flags.DEFINE_enum("task", None, list(task_names()), "task whose scorer is used", flag_values=FLAGS)
flags.DEFINE_string("input", None, "JSONL file with a `completion` per row", flag_values=FLAGS)
flags.DEFINE_bool("rewards", False, "also compute the training rewards", flag_values=FLAGS)
flags.DEFINE_enum("reward_style", base.DEFAULT_REWARD_STYLE, list(base.REWARD_STYLES),
                  "reward style of --rewards", flag_values=FLAGS)
flags.DEFINE_enum("eval_style", base.DEFAULT_EVAL_STYLE, list(base.EVAL_STYLES),
                  "fixed (default) or d1: d1's eval/parse_and_get_acc.py, quirks included",
                  flag_values=FLAGS)
flags.DEFINE_bool("use_math_verify", False, "math: also accept math-verify equivalence",
                  flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data folder (default $DMPO_JAX_DATA_DIR)", flag_values=FLAGS)
flags.mark_flags_as_required(["task", "input"], flag_values=FLAGS)


def _run() -> int:
  args = FLAGS
  cli.require_path("input", args.input, "generations file")
  with cli.user_input(f"--input={args.input}"):
    rows = read_records(args.input)
    results, summary = score_rows(args.task, rows, rewards=args.rewards,
                                  reward_style=args.reward_style,
                                  use_math_verify=args.use_math_verify, data_dir=args.data_dir,
                                  eval_style=args.eval_style)
  for result in results:
    print(json.dumps(result, default=str))
  print(json.dumps(summary))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
