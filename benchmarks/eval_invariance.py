"""How much greedy evaluation depends on the batch, as JSON (`docs/tasks.md` §7.2).

  python benchmarks/eval_invariance.py --checkpoint=runs/demo/final_model --task=digit_sort \
      [--num_examples=256] [--batch_sizes=1,8,32,128] [--gen_length=5 --block_length=5 --steps=5]
  python benchmarks/eval_invariance.py --checkpoint=random_tiny --num_examples=32 \
      --batch_sizes=1,8,32 --gen_length=16 --block_length=8 --steps=16

``--checkpoint=random_tiny``: the `tiny` preset with random weights (seed 3) on digit-sort
prompts of 2 to 44 digits, so batches need different paddings.

The held-out prompts are decoded greedily (τ = 0, low-confidence remasking, the exact sampler) in
batches of each size, every batch left-padded to the same bucket (the longest prompt rounded up to
32, as launch/eval.py pads), in float32 and in bfloat16 (weights and compute cast from the
checkpoint), once with the sampler's batch-shaped decoding and once with ``batch_invariant``.
For each (dtype, mode): the accuracy per batch size, the number of completions that differ from
batch size 1, and the CPU time of a second (compiled) pass at the largest batch size; per mode,
the completions that differ between float32 and bfloat16. Run on one device;
`tests/test_eval_invariance.py` covers 1 vs 8 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "launch"))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402  pylint: disable=wrong-import-position

import eval as eval_script  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.diffusion import sampler  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.models.tokenizer import load_tokenizer  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.models.transformer import create_model  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.rl import rollout  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.tasks import get_task  # noqa: E402  pylint: disable=wrong-import-position


def cast_model(model, dtype: str):
  """(graphdef, params) of ``model`` with weights and compute in ``dtype``."""
  config = model.config.replace(dtype=dtype, param_dtype=dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(config, 0)))
  params = jax.tree.map(lambda x: x.astype(dtype), nnx.state(model))
  return graphdef, params


def completions(graphdef, params, tokenizer, prompt_ids, batch_size, config):
  bucket = eval_script.prompt_bucket(prompt_ids)
  out = []
  for start in range(0, len(prompt_ids), batch_size):
    chunk = prompt_ids[start:start + batch_size]
    real = len(chunk)
    chunk = list(chunk) + [chunk[-1]] * (batch_size - real)
    ids, mask = eval_script.left_pad(chunk, tokenizer.pad_token_id, length=bucket)
    seqs = sampler.generate(graphdef, params, jnp.asarray(ids), jnp.asarray(mask),
                            jax.random.key(0), config).sequences
    out += rollout.decode_completions(tokenizer, np.asarray(seqs)[:real], bucket)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--task", default="digit_sort")
  parser.add_argument("--tokenizer", default="byte")
  parser.add_argument("--num_examples", type=int, default=256)
  parser.add_argument("--batch_sizes", default="1,8,32,128")
  parser.add_argument("--gen_length", type=int, default=5)
  parser.add_argument("--block_length", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  sizes = [int(x) for x in args.batch_sizes.split(",")]
  task = get_task(args.task)
  if args.checkpoint == "random_tiny":
    from dmpo_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
    from dmpo_jax.tasks import digit_sort  # pylint: disable=import-outside-toplevel
    task = digit_sort.DigitSortTask()
    lengths = np.random.default_rng(1).integers(2, 45, args.num_examples)
    examples = [digit_sort.generate_examples(1, num_digits=int(n), split="test", seed=int(n))[0]
                for n in lengths]
    model = create_model(get_preset("tiny"), seed=3)
  else:
    examples = task.load_eval()[:args.num_examples]
    model, _ = eval_script.load_model(args.checkpoint)
  tokenizer = load_tokenizer(args.tokenizer)
  prompt_ids = [rollout.prompt_token_ids(tokenizer, task, e, evaluation=True) for e in examples]
  result = {"checkpoint": args.checkpoint, "task": task.name, "num_examples": len(examples),
            "prompt_bucket": eval_script.prompt_bucket(prompt_ids), "batch_sizes": sizes,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
            "jax": jax.__version__, "runs": {}}
  texts = {}
  start = time.perf_counter()
  for mode in ("batch_shaped", "batch_invariant"):
    for dtype in ("float32", "bfloat16"):
      graphdef, params = cast_model(model, dtype)
      config = sampler.SamplerConfig(gen_length=args.gen_length, steps=args.steps,
                                     block_length=args.block_length, temperature=0.0,
                                     batch_invariant=mode == "batch_invariant")
      run = {"accuracy": {}, "differ_from_batch_1": {}}
      for size in sizes:
        texts[mode, dtype, size] = completions(graphdef, params, tokenizer, prompt_ids, size, config)
        scores = task.score_many(texts[mode, dtype, size], examples)
        run["accuracy"][size] = task.summarize(scores)["accuracy"]
        run["differ_from_batch_1"][size] = sum(
            a != b for a, b in zip(texts[mode, dtype, size], texts[mode, dtype, sizes[0]]))
      cpu = time.process_time()
      completions(graphdef, params, tokenizer, prompt_ids, sizes[-1], config)
      run[f"decode_cpu_s_batch_{sizes[-1]}"] = round(time.process_time() - cpu, 2)
      result["runs"][f"{mode}/{dtype}"] = run
    result["runs"][f"{mode}/float32_vs_bfloat16_differ"] = {
        size: sum(a != b for a, b in zip(texts[mode, "float32", size], texts[mode, "bfloat16", size]))
        for size in sizes}
  result["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
