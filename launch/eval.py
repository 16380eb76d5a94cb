"""Evaluate a checkpoint on a task with the published protocol (`docs/tasks.md` §1, §7).

Greedy (temperature 0), low-confidence remasking, block length 32, generation lengths 128/256/512,
steps = generation length (DMPO ``--full_steps``; ``--steps=half`` gives d1's gen_length/2).
Evaluation prompts: ``system + "\\n\\n" + question`` in one user turn, chat template, then the
``<reasoning>`` prefill (tasks without a chat template, e.g. the demo, encode the text directly);
completions are the ids up to the first EOS/EOT, decoded with special tokens skipped.
The evaluation is the trainer's (`dmpo_jax.inference.evaluation.evaluate`), sharded over every
device: the weights resharded once to the sampling layout, each batch's rows split over the
devices. Batch-invariant: every batch is left-padded to one length and decoded with
``batch_invariant``, so a row's completion does not depend on ``--batch_size``, on the other rows
or on the number of devices (`docs/tasks.md` §7.2). The length is the evaluation's longest prompt
rounded up to 32, or ``--prompt_length=P`` (longer prompts keep their last P tokens): with the
training config's ``task.prompt_length`` the completions and scores are those of the trainer's
held-out evaluation.

  python launch/eval.py --checkpoint=PATH --task=gsm8k [--tokenizer=PATH|byte]
      [--gen_lengths=128,256,512] [--block_length=32] [--steps=full|half|N] [--batch_size=8]
      [--prompt_length=P] [--output_dir=DIR] [--limit=N] [--eval_source=FILE]
      [--eval_style=fixed|d1]

``--checkpoint``: an HF folder (``config.json`` + safetensors) or a model checkpoint written by
`dmpo_jax.checkpointing.save_model_checkpoint` (``model_config.json`` + ``params/``).
Writes ``DIR/{task}_L{len}.jsonl`` (one row per sample: prompt, completion, reference fields,
score) and ``DIR/{task}_L{len}_summary.json`` (accuracy; cell accuracy and solve rate for sudoku)
plus ``DIR/{task}_summary.json`` for all lengths.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax import cli, extras, sampling_layout  # noqa: E402
from dmpo_jax import workdir as workdir_lib  # noqa: E402
from dmpo_jax.inference import evaluation, model_loading  # noqa: E402
# left_pad / prompt_bucket: where benchmarks and tests find the evaluation's padding.
from dmpo_jax.inference.prompts import (  # noqa: E402,F401  pylint: disable=unused-import
    PROMPT_LENGTH_MULTIPLE, left_pad, prompt_bucket)
from dmpo_jax.inference.sampler_configs import greedy_eval, resolve_steps  # noqa: E402
from dmpo_jax.tasks import base, get_task, task_names  # noqa: E402
# pylint: enable=wrong-import-position


def load_model(checkpoint: str, dtype: Optional[str] = None):
  """(model, model_config) from an HF folder or a trained model checkpoint; ``dtype``: the
  parameter dtype (`model_loading.load_model`)."""
  model = model_loading.load_model(checkpoint, param_dtype=dtype).model
  return model, model.config


def evaluate(model, tokenizer, task: base.Task, examples: Sequence[base.Example], gen_length: int,
             block_length: int = 32, steps: str = "full", batch_size: int = 8, seed: int = 0,
             score_options: Optional[Dict[str, Any]] = None, progress: bool = True,
             prompt_length: Optional[int] = None) -> tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Generates for every example on all devices and scores; returns (rows, summary)."""
  options = dict(score_options or {})
  style = options.pop("eval_style", base.DEFAULT_EVAL_STYLE)
  spec = evaluation.EvalSpec(sampler=greedy_eval(gen_length, block_length, steps),
                             batch_size=batch_size, prompt_length=prompt_length or None,
                             eval_style=style, score_options=options, seed=seed)
  graphdef, params = nnx.split(model)
  # Every device samples its rows of a batch on its own copy of the weights (or a tensor group's).
  layout = sampling_layout.inference_layout(model.config, params)
  result = evaluation.evaluate(graphdef, params, tokenizer, task, examples, spec, layout=layout,
                               progress=progress)
  return result.rows, result.summary


FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "HF folder or dmpo_jax model checkpoint", flag_values=FLAGS)
flags.DEFINE_enum("task", None, list(task_names()), "task to evaluate", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "'byte' or a folder (default: the checkpoint)",
                    flag_values=FLAGS)
flags.DEFINE_list("gen_lengths", ["128", "256", "512"], "comma-separated generation lengths",
                  flag_values=FLAGS)
flags.DEFINE_integer("block_length", 32, "semi-autoregressive block length", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("steps", "full", "full (= length), half, or an integer", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "prompts per sampler call", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("prompt_length", 0, "left-pad (and cut) every prompt to this many tokens, as "
                     "the trainer does with task.prompt_length; 0: the longest prompt rounded up "
                     f"to {PROMPT_LENGTH_MULTIPLE}", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_string("eval_source", None, "evaluation file (default: the task's file in the data "
                    "folder)", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data folder (default $DMPO_JAX_DATA_DIR)", flag_values=FLAGS)
flags.DEFINE_integer("subset_size", -1, "-1: the protocol's (256 for countdown/sudoku, seed 42); "
                     "0: all", lower_bound=-1, flag_values=FLAGS)
flags.DEFINE_integer("limit", 0, "evaluate only the first N examples (0: all)", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_string("output_dir", "eval_output", "where the rows and summaries go",
                    flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "parameter dtype override (e.g. bfloat16)", flag_values=FLAGS)
flags.DEFINE_bool("use_math_verify", False, "math: also accept math-verify equivalence",
                  flag_values=FLAGS)
flags.DEFINE_enum("eval_style", base.DEFAULT_EVAL_STYLE, list(base.EVAL_STYLES),
                  "fixed (default) or d1: d1's eval/parse_and_get_acc.py, quirks included",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "task"], flag_values=FLAGS)


def check_flags(args) -> list[int]:
  """The generation lengths; raises `cli.UserError` for flags that cannot run."""
  cli.require_model_folder("checkpoint", args.checkpoint)
  output_dir = pathlib.Path(args.output_dir)
  cli.check(not output_dir.exists() or output_dir.is_dir(),
            f"--output_dir {output_dir} is a file, not a folder")
  try:
    lengths = [int(x) for x in args.gen_lengths]
    for length in lengths:
      resolve_steps(args.steps, length)
  except ValueError as e:
    raise cli.UserError(f"--gen_lengths={','.join(args.gen_lengths)} --steps={args.steps}: {e}") from e
  for length in lengths:
    cli.check(length > 0 and length % args.block_length == 0,
              f"--gen_lengths: {length} is not a positive multiple of --block_length={args.block_length}")
  return lengths


def _run() -> int:
  args = FLAGS
  lengths = check_flags(args)
  if args.use_math_verify:
    extras.require("math_verify", "--use_math_verify")
  task = get_task(args.task)
  with cli.user_input(f"--eval_style={args.eval_style}"):
    base.check_eval_style(args.eval_style, task.name)
  with cli.user_input(f"{args.task} evaluation data"):
    examples = task.load_eval(source=args.eval_source, data_dir=args.data_dir)
  size = task.default_eval_size if args.subset_size < 0 else (args.subset_size or None)
  examples = base.select_subset(examples, size, seed=42)
  if args.limit:
    examples = examples[:args.limit]
  cli.check(len(examples) > 0, f"no {args.task} evaluation examples to evaluate")
  with cli.user_input(f"--checkpoint={args.checkpoint}"):
    model, model_config = load_model(args.checkpoint, dtype=args.dtype)
    tokenizer = model_loading.load_tokenizer(args.tokenizer or args.checkpoint, model_config)
  output_dir = pathlib.Path(args.output_dir)
  with cli.file_operation("create the output folder", output_dir):
    output_dir.mkdir(parents=True, exist_ok=True)
  score_options = {"use_math_verify": True} if args.use_math_verify else {}
  if args.eval_style != "fixed":
    score_options["eval_style"] = args.eval_style
  summaries = []
  for gen_length in lengths:
    start = time.time()
    rows, summary = evaluate(model, tokenizer, task, examples, gen_length, args.block_length,
                             args.steps, args.batch_size, args.seed, score_options,
                             progress=not args.no_progress, prompt_length=args.prompt_length)
    summary.update({"checkpoint": str(args.checkpoint), "seconds": round(time.time() - start, 2)})
    # Each file is written whole or not at all (a temporary file, then a rename).
    workdir_lib.write_text_atomic(output_dir / f"{task.name}_L{gen_length}.jsonl",
                                  "".join(json.dumps(row, default=str) + "\n" for row in rows),
                                  operation="write the generations")
    workdir_lib.write_text_atomic(output_dir / f"{task.name}_L{gen_length}_summary.json",
                                  json.dumps(summary, indent=2), operation="write the summary")
    summaries.append(summary)
    print(json.dumps(summary))
  workdir_lib.write_text_atomic(output_dir / f"{task.name}_summary.json",
                                json.dumps(summaries, indent=2), operation="write the summary")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
