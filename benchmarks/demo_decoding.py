"""Rollout speed vs quality on the demo's trained model: held-out accuracy and network
evaluations (NFE) of each sampler mode. Prints one JSON object per mode, then a summary.

  python benchmarks/demo_decoding.py --workdir=runs/demo_decoding [--checkpoint=runs/demo/final_model]

``--num_examples=N`` scores the first N held-out rows only (the tests use 16; the numbers in the
docs use all 256).

Without ``--checkpoint`` the demo is trained first, exactly as the README's command does it
(``launch/train.py --config=configs/demo.py --workdir=WORKDIR/train_seedS --config.seed=S``, a
fresh process; about a minute on 2 idle cores) and its ``final_model`` is used; a finished run
there is reused.

The held-out set and protocol are the demo's evaluation (`configs/demo.py`): the 256 held-out
digit strings of `digit_sort` (``--seed``, the run's seed), prompts ``3142=`` (5 tokens), greedy decoding of 5 tokens
in one block, accuracy = exact ascending digits (`digit_sort.sort_reward`), scored by the task.
Modes (`dmpo_jax.diffusion.sampler.MODES`): ``standard`` (5 steps, one token each), the prefix
and dual caches, confidence thresholds (``--thresholds``) with and without the dual cache, and
Fast-dLLM's factor rule (``--factors``).

NFE is counted, not assumed: ``nfe_batched`` is the sampler's own count of forward calls for the
whole batch (`SampleOutput.num_forward_passes`; a parallel-decoding block runs until its slowest
row is done), ``nfe_per_sequence`` the mean over rows of the forward calls that row needs when
decoded alone (`sampler.forward_passes_per_row`, from the commit trace; checked against batch-1
decoding in `tests/test_sampler.py`). ``relative_flops`` is the forward FLOPs of the call over
the standard sampler's (`benchmarks/sampler.py: forward_flops`; the caches shorten the forward
passes after the first of a block, not their number).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import sampler as sampler_bench  # noqa: E402
from dmpo_jax import checkpointing  # noqa: E402
from dmpo_jax.diffusion import sampler as sampler_lib  # noqa: E402
from dmpo_jax.models.tokenizer import load_tokenizer  # noqa: E402
from dmpo_jax.rl import rollout  # noqa: E402
from dmpo_jax.tasks import digit_sort  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The demo's evaluation (configs/demo.py): prompt bucket, generation, held-out set size.
PROMPT_LENGTH, GEN_LENGTH, NUM_HELD_OUT = 5, 5, 256


def train_demo(workdir: pathlib.Path, seed: int) -> pathlib.Path:
  """The README's demo command in a fresh process; returns its final model folder."""
  final = workdir / "final_model"
  if not (final / "model_config.json").is_file():
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/demo.py",
               f"--workdir={workdir}", f"--config.seed={seed}", "--noplot"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
  return final


def mode_configs(thresholds, factors) -> list[tuple[str, sampler_lib.SamplerConfig]]:
  base = dict(gen_length=GEN_LENGTH, steps=GEN_LENGTH, block_length=GEN_LENGTH, temperature=0.0,
              remasking="low_confidence", return_trace=True)
  out = [(mode, sampler_lib.SamplerConfig(**base, **sampler_lib.mode_options(mode)))
         for mode in ("standard", "prefix_cache", "dual_cache")]
  for tau in thresholds:
    for mode in ("threshold", "dual_cache+threshold"):
      out.append((f"{mode} {tau}", sampler_lib.SamplerConfig(
          **base, **sampler_lib.mode_options(mode, threshold=tau))))
  for f in factors:
    for mode in ("factor", "dual_cache+factor"):
      out.append((f"{mode} {f}", sampler_lib.SamplerConfig(
          **base, **sampler_lib.mode_options(mode, factor=f))))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/demo_decoding")
  parser.add_argument("--checkpoint", default=None, help="a trained demo model (model format)")
  parser.add_argument("--thresholds", default="0.9,0.95,0.99,0.999")
  parser.add_argument("--factors", default="0.5,1.0")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0,
                      help="the demo's config.seed: training run and its held-out set")
  parser.add_argument("--num_examples", type=int, default=NUM_HELD_OUT,
                      help="the first N held-out rows (the demo's evaluation uses all 256)")
  args = parser.parse_args(argv)
  if not 1 <= args.num_examples <= NUM_HELD_OUT:
    parser.error(f"--num_examples={args.num_examples}: expected 1 to {NUM_HELD_OUT}")
  workdir = pathlib.Path(args.workdir)
  start = time.perf_counter()
  checkpoint = (pathlib.Path(args.checkpoint) if args.checkpoint
                else train_demo(workdir / f"train_seed{args.seed}", args.seed))
  train_s = None if args.checkpoint else round(time.perf_counter() - start, 1)
  model = checkpointing.load_model_checkpoint(checkpoint)
  graphdef, params = nnx.split(model)
  tokenizer = load_tokenizer("byte", family=model.config.family)
  task = digit_sort.TASK
  examples = task.load_eval(None, num_examples=NUM_HELD_OUT, seed=args.seed)[:args.num_examples]
  ids, mask, _ = rollout.encode_prompts(tokenizer, task, examples, prompt_length=PROMPT_LENGTH,
                                        evaluation=True)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  thresholds = [float(x) for x in args.thresholds.split(",") if x]
  factors = [float(x) for x in args.factors.split(",") if x]
  rows = []
  for name, config in mode_configs(thresholds, factors):
    compiled = sampler_lib.generate.lower(graphdef, params, ids, mask, jax.random.key(0),
                                          config).compile()
    times = []
    for _ in range(max(1, args.repeats)):
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(params, ids, mask, jax.random.key(0)))
      times.append(time.perf_counter() - t0)
    sequences = np.asarray(out.sequences)
    completions = rollout.decode_completions(tokenizer, sequences, PROMPT_LENGTH)
    summary = task.summarize(task.score_many(completions, examples))
    per_row = sampler_lib.forward_passes_per_row(out.commit_step, config)
    flops = sampler_bench.forward_flops(model.config, config, out, len(examples), PROMPT_LENGTH)
    rows.append({"mode": name, "accuracy": round(summary["accuracy"], 2),
                 "num_correct": summary["num_correct"], "num_examples": summary["num_examples"],
                 "nfe_batched": int(out.num_forward_passes),
                 "nfe_per_sequence": round(float(per_row.mean()), 3),
                 "nfe_per_sequence_max": int(per_row.max()), "forward_flops": flops,
                 "seconds": round(min(times), 5)})
  standard, standard_flops = rows[0], rows[0]["forward_flops"]
  for row in rows:
    row["relative_flops"] = round(row.pop("forward_flops") / standard_flops, 3)
    row["accuracy_delta"] = round(row["accuracy"] - standard["accuracy"], 2)
    row["nfe_reduction"] = round(standard["nfe_per_sequence"] / row["nfe_per_sequence"], 2)
    print(json.dumps(row), flush=True)
  print(json.dumps({
      "checkpoint": str(checkpoint), "seed": args.seed, "train_seconds": train_s,
      "command": "python benchmarks/demo_decoding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "load_average": [round(x, 1) for x in os.getloadavg()]},
      "jax": jax.__version__}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
