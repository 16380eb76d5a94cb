"""Evaluate a checkpoint on a task with the published protocol (`docs/tasks.md` §1, §7).

Greedy (temperature 0), low-confidence remasking, block length 32, generation lengths 128/256/512,
steps = generation length (DMPO ``--full_steps``; ``--steps=half`` gives d1's gen_length/2).
Evaluation prompts: ``system + "\\n\\n" + question`` in one user turn, chat template, then the
``<reasoning>`` prefill (tasks without a chat template, e.g. the demo, encode the text directly);
completions are the ids up to the first EOS/EOT, decoded with special tokens skipped
(`dmpo_jax.rl.rollout.decode_completions`, shared with the trainer's held-out evaluation).
Batch-invariant: every batch is left-padded to the evaluation's longest prompt (rounded up to 32)
and decoded with ``batch_invariant``, so a row's completion does not depend on ``--batch_size`` or
on the other rows (`docs/tasks.md` §7.2).

  python launch/eval.py --checkpoint=PATH --task=gsm8k [--tokenizer=PATH|byte]
      [--gen_lengths=128,256,512] [--block_length=32] [--steps=full|half|N] [--batch_size=8]
      [--output_dir=DIR] [--limit=N] [--eval_source=FILE] [--eval_style=fixed|d1]

``--checkpoint``: an HF folder (``config.json`` + safetensors) or a model checkpoint written by
`dmpo_jax.checkpointing.save_model_checkpoint` (``model_config.json`` + ``params/``).
Writes ``DIR/{task}_L{len}.jsonl`` (one row per sample: prompt, completion, reference fields,
score) and ``DIR/{task}_L{len}_summary.json`` (accuracy; cell accuracy and solve rate for sudoku)
plus ``DIR/{task}_summary.json`` for all lengths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402  pylint: disable=wrong-import-position

from dmpo_jax import cli, extras, metrics as metrics_lib  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax import workdir as workdir_lib  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import base, get_task, task_names  # noqa: E402  pylint: disable=wrong-import-position

PROMPT_LENGTH_MULTIPLE = 32  # left-pad prompts to a multiple of this to reuse compiled programs


def load_model(checkpoint: str, dtype: Optional[str] = None):
  """(model, model_config) from an HF folder or a trained model checkpoint."""
  path = pathlib.Path(checkpoint)
  if (path / "model_config.json").is_file():
    from dmpo_jax import checkpointing  # pylint: disable=import-outside-toplevel
    model = checkpointing.load_model_checkpoint(path, dtype=dtype)
    return model, model.config
  if (path / "config.json").is_file():
    from dmpo_jax.models import hf_io  # pylint: disable=import-outside-toplevel
    model, _ = hf_io.load_pretrained(path, param_dtype=dtype)
    return model, model.config
  raise cli.UserError(f"model checkpoint {cli.model_folder_problem(checkpoint)}")


def resolve_steps(steps: str, gen_length: int) -> int:
  if steps == "full":
    return gen_length
  if steps == "half":
    return gen_length // 2
  value = int(steps)
  if value <= 0:
    raise ValueError(f"--steps must be full, half or a positive integer, got {steps!r}")
  return value


def make_sampler_config(sampler_module, gen_length: int, block_length: int, steps: int,
                        mask_token_id: int):
  """The sampler's config for greedy low-confidence decoding (unknown fields keep defaults),
  batch-invariant: a row's tokens do not depend on the batch size or on its batch-mates."""
  wanted = {"gen_length": gen_length, "block_length": block_length, "steps": steps,
            "temperature": 0.0, "remasking": "low_confidence", "mask_token_id": mask_token_id,
            "batch_invariant": True}
  names = {f.name for f in dataclasses.fields(sampler_module.SamplerConfig)}
  missing = {"gen_length", "block_length", "steps"} - names
  if missing:
    raise TypeError(f"dmpo_jax.diffusion.sampler.SamplerConfig lacks field(s) {sorted(missing)}")
  return sampler_module.SamplerConfig(**{k: v for k, v in wanted.items() if k in names})


def prompt_bucket(prompt_ids: Sequence[Sequence[int]], multiple: int = PROMPT_LENGTH_MULTIPLE) -> int:
  """The padded prompt length of a whole evaluation: the longest prompt rounded up to
  ``multiple``. Every batch is padded to it, so the padding a row gets never depends on the
  other rows of its batch (`docs/tasks.md` §7.2)."""
  length = max(len(ids) for ids in prompt_ids)
  return -(-length // multiple) * multiple


def left_pad(batch_ids: Sequence[Sequence[int]], pad_id: int, multiple: int = PROMPT_LENGTH_MULTIPLE,
             length: Optional[int] = None):
  """(ids, mask) left-padded to ``length`` (default: the batch's longest, rounded up)."""
  length = prompt_bucket(batch_ids, multiple) if length is None else length
  ids = np.full((len(batch_ids), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(batch_ids), length), dtype=bool)
  for row, seq in enumerate(batch_ids):
    ids[row, length - len(seq):] = seq
    mask[row, length - len(seq):] = True
  return ids, mask


def evaluate(model, tokenizer, task: base.Task, examples: Sequence[base.Example], gen_length: int,
             block_length: int = 32, steps: str = "full", batch_size: int = 8, seed: int = 0,
             score_options: Optional[Dict[str, Any]] = None, progress: bool = True
             ) -> tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Generates for every example and scores; returns (rows, summary)."""
  from dmpo_jax import sampling_layout  # pylint: disable=import-outside-toplevel
  from dmpo_jax.diffusion import sampler  # pylint: disable=import-outside-toplevel
  from dmpo_jax.rl import rollout  # pylint: disable=import-outside-toplevel
  num_steps = resolve_steps(steps, gen_length)
  config = make_sampler_config(sampler, gen_length, block_length, num_steps,
                               tokenizer.mask_token_id)
  graphdef, params = nnx.split(model)
  # Every device samples its rows of a batch on its own copy of the weights (or a tensor group's).
  layout = sampling_layout.inference_layout(model.config, params)
  params = sampling_layout.reshard(params, layout)
  prompt_ids = [rollout.prompt_token_ids(tokenizer, task, e, evaluation=True) for e in examples]
  prompt_texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
  bucket = prompt_bucket(prompt_ids)
  completions: List[str] = []
  key = jax.random.key(seed)
  bar = metrics_lib.ProgressBar(len(examples), desc=f"{task.name} L={gen_length}", unit="example",
                                disable=None if progress else True,
                                log_every_steps=max(1, len(examples) // 10))
  for start in range(0, len(examples), batch_size):
    chunk = prompt_ids[start:start + batch_size]
    real = len(chunk)
    chunk = list(chunk) + [chunk[-1]] * (batch_size - real)  # fixed batch shape
    ids, mask = left_pad(chunk, tokenizer.pad_token_id, length=bucket)
    key, subkey = jax.random.split(key)
    output = sampling_layout.generate(layout, graphdef, params, ids, mask, subkey, config,
                                      sampler.generate)
    sequences = np.asarray(output.sequences)[:real]
    completions.extend(rollout.decode_completions(tokenizer, sequences, ids.shape[1]))
    bar.update(start + real)
  bar.close()
  scores = task.score_many(completions, examples, **(score_options or {}))
  rows = []
  for index, (example, text, completion, score) in enumerate(
      zip(examples, prompt_texts, completions, scores)):
    reference = {k: example[k] for k in task.reference_fields if k in example}
    rows.append({"index": index, **reference, "prompt": text, "completion": completion, **score})
  summary = task.summarize(scores)
  summary.update({"gen_length": gen_length, "block_length": block_length, "steps": num_steps,
                  "temperature": 0.0,
                  "eval_style": (score_options or {}).get("eval_style", base.DEFAULT_EVAL_STYLE)})
  return rows, summary


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
  from dmpo_jax.models.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
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
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint, family=model_config.family)
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
                             progress=not args.no_progress)
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
