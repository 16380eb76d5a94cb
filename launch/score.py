"""Rescore existing generations (ours or another system's) with a task's evaluation scorer.

Usage:
  python launch/score.py --task=gsm8k --input=generations.jsonl [--rewards] [--reward_style=d1]
      [--eval_style=d1]

Each input row holds ``completion`` plus the task's reference fields:
  gsm8k, math: ``answer``;  countdown: ``numbers`` (list or "a,b,c") and ``target``;
  sudoku: ``puzzle`` and ``solution`` (16-character strings);  humaneval, mbpp: ``task_id``
  (looked up in the dataset). Optional: ``use_math_verify`` is a flag, not a row field.
Prints one JSON line per row (with ``score``; with ``--rewards`` also the training rewards and
their sum) and a final summary line (JSON, with ``accuracy``). A row that cannot be scored
(binary data, broken JSON, missing fields, ...) gets a line ``{"index", "skipped": reason}``,
is named on stderr (``warning: skipped ...``) and is counted in the summary's
``skipped_rows``; accuracy is over the scored rows. JSONL, JSON and CSV files may start with a
UTF-8 byte-order mark and use CRLF line ends. The exit status is 0 when at least one row was
scored; 2 with one line when none was (an empty file, or every row unusable); 1 with
``--strict`` when a row was skipped.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from dmpo_jax import cli, extras  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import base  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import BadRow, get_task, map_rows, read_rows, task_names  # noqa: E402  pylint: disable=wrong-import-position


def reference_example(task: base.Task, row: Dict[str, Any], row_index: int,
                      data_dir: Optional[str]) -> base.Example:
  missing = [f for f in ("completion",) + tuple(task.reference_fields) if f not in row]
  if missing:
    raise KeyError(f"row {row_index} lacks field(s) {missing} needed by task {task.name}; "
                   f"has {sorted(row)}")
  if not isinstance(row["completion"], str):
    raise TypeError(f"completion must be a string, got {type(row['completion']).__name__}")
  if task.name in ("humaneval", "mbpp"):
    return task.lookup(row["task_id"], data_dir=data_dir)
  return task.normalize(row)


def score_rows(task_name: str, rows: Sequence[Dict[str, Any]], rewards: bool = False,
               reward_style: str = base.DEFAULT_REWARD_STYLE, use_math_verify: bool = False,
               data_dir: Optional[str] = None, eval_style: str = base.DEFAULT_EVAL_STYLE,
               indices: Optional[Sequence[int]] = None,
               bad_rows: Sequence[BadRow] = ()) -> tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """(per-row results, summary); results keep ``task_id``/``index`` for reference. Rows that
  cannot be scored (and ``bad_rows`` from `read_rows`) become ``{"index", "skipped"}`` results."""
  task = get_task(task_name)
  base.check_eval_style(eval_style, task_name)
  indices = range(len(rows)) if indices is None else indices
  kept, skipped = map_rows(list(zip(indices, rows)),
                           lambda index, row: (row, reference_example(task, row, index, data_dir)))
  skipped = sorted(list(bad_rows) + skipped, key=lambda b: b.index)
  indices, rows, examples = [i for i, _ in kept], [r for _, (r, _) in kept], [e for _, (_, e) in kept]
  completions = [row["completion"] for row in rows]
  options = {"use_math_verify": use_math_verify} if use_math_verify else {}
  scores = task.score_many(completions, examples, **options,
                           **({"eval_style": eval_style} if eval_style != "fixed" else {}))
  results = []
  reward_fns = task.reward_functions(reward_style, **options) if rewards else []
  for position, (index, row, example, score) in enumerate(zip(indices, rows, examples, scores)):
    result = {"index": index, **{k: v for k, v in score.items()}}
    if "task_id" in row:
      result["task_id"] = row["task_id"]
    if reward_fns:
      values = {name: float(fn(completions[position], example)) for name, fn in reward_fns}
      result["rewards"] = values
      result["reward"] = float(sum(values.values()))
    results.append(result)
  results = sorted(results + [b.to_json() for b in skipped], key=lambda r: r["index"])
  summary = task.summarize(scores)
  summary["input_rows"] = len(rows) + len(skipped)
  summary["skipped_rows"] = len(skipped)
  summary["eval_style"] = eval_style
  if reward_fns:
    summary["reward_style"] = reward_style
    rewarded = [r["reward"] for r in results if "reward" in r]
    summary["mean_reward"] = sum(rewarded) / len(rewarded) if rewarded else 0.0
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
flags.DEFINE_bool("strict", False, "exit 1 when any row was skipped", flag_values=FLAGS)
flags.mark_flags_as_required(["task", "input"], flag_values=FLAGS)


def _run() -> int:
  args = FLAGS
  cli.require_path("input", args.input, "generations file")
  if args.use_math_verify:
    extras.require("math_verify", "--use_math_verify")
  with cli.user_input(f"--input={args.input}"):
    table = read_rows(args.input)
    cli.check(table.num_rows > 0, f"--input={args.input} has no rows: nothing to score")
    results, summary = score_rows(args.task, [row for _, row in table.rows], rewards=args.rewards,
                                  reward_style=args.reward_style,
                                  use_math_verify=args.use_math_verify, data_dir=args.data_dir,
                                  eval_style=args.eval_style,
                                  indices=[index for index, _ in table.rows], bad_rows=table.bad)
  skipped = [r for r in results if "skipped" in r]
  cli.check(len(skipped) < len(results),
            f"--input={args.input}: none of its {len(results)} row(s) could be scored; "
            f"{_describe_skipped(skipped)}")
  for result in results:
    print(json.dumps(result, default=str))
  print(json.dumps(summary))
  if skipped:
    print(f"warning: skipped {len(skipped)} of {len(results)} row(s) of {args.input}: "
          f"{_describe_skipped(skipped)}", file=sys.stderr)
  return 1 if args.strict and summary["skipped_rows"] else 0


def _describe_skipped(skipped: Sequence[Dict[str, Any]], limit: int = 5) -> str:
  described = [f"row {r['index']}" + (f" (line {r['line']})" if "line" in r else "") +
               f": {r['skipped']}" for r in skipped[:limit]]
  return "; ".join(described) + (f"; ... ({len(skipped) - limit} more)" if len(skipped) > limit else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
