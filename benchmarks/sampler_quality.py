"""Sampler quality on a model this repo trains on CPU: held-out accuracy, wall time and the
policy's sequence ELBO of the samples, for every sampler mode. Prints one JSON object per mode.

  python benchmarks/sampler_quality.py --workdir=runs/sampler_quality [--train_steps=600]

Task (``copy``): the prompt is ``--num_digits`` = 100 random digits and ``=``, the answer the same
digits, then EOS padding to ``--gen_length`` = 128 (100 digits span 4 blocks of 32). The ``tiny`` preset (2 layers, so the KV caches are approximate) is trained from scratch by
masked-diffusion SFT (`dmpo_jax.rl.sft`, the LLaDA SFT loss), or loaded from
``WORKDIR/model`` when a previous run saved it there. The held-out prompts are written to
``WORKDIR/prompts.jsonl`` (for ``benchmarks/sampler.py --checkpoint --prompt_ids_file``).

Per mode (greedy, low-confidence, block 32; ``--steps`` for the quota modes):
  * accuracy: % of held-out prompts whose whole completion (answer and EOS padding) is exact;
    digit_accuracy: % of answer digits right;
  * seconds: wall time of one compiled call on all ``--num_eval`` prompts (median of
    ``--repeats``), compile excluded; forward_passes;
  * elbo: the policy's mean sequence ELBO of the samples (`dmpo_jax.diffusion.elbo`,
    ``--elbo_mc`` t-iid masks per sequence, the same masks for every mode), in nats; compare it
    with the ``standard`` row's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax import checkpointing  # noqa: E402
from dmpo_jax.diffusion import elbo, masking  # noqa: E402
from dmpo_jax.diffusion import sampler as sampler_lib  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.transformer import create_model  # noqa: E402
from dmpo_jax.rl import sft, train_state as ts  # noqa: E402

DEFAULT_MODES = "standard,prefix_cache,dual_cache,threshold,dual_cache+threshold"


def make_examples(rng: np.random.Generator, n: int, args, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompts int32 [n, num_digits + 1] = digits + '=', answers int32 [n, gen_length]): the
  answer is the digits, then EOS padding."""
  digits = rng.integers(0, 10, (n, args.num_digits)) + ord("0")
  prompts = np.concatenate([digits, np.full((n, 1), ord("="))], 1).astype(np.int32)
  answers = np.full((n, args.gen_length), eos, np.int32)
  answers[:, :args.num_digits] = digits
  return prompts, answers


def train(args, model_config, eos: int):
  """Masked-diffusion SFT from scratch; returns (graphdef, params)."""
  model = create_model(model_config, seed=args.seed)
  graphdef, params = nnx.split(model)
  optimizer = ts.make_optimizer(args.learning_rate, max_grad_norm=1.0,
                                warmup_steps=min(50, args.train_steps // 10),
                                total_steps=args.train_steps, schedule="cosine")
  state = ts.init_train_state(params, optimizer, args.seed)
  step_fn = jax.jit(functools.partial(sft.sft_step, graphdef, optimizer), donate_argnums=0)
  rng = np.random.default_rng([args.seed, 0])
  p = args.num_digits + 1
  start = time.perf_counter()
  for step in range(args.train_steps):
    prompts, answers = make_examples(rng, args.batch_size, args, eos)
    seqs = np.concatenate([prompts, answers], 1)
    completion = np.zeros(seqs.shape, bool)
    completion[:, p:] = True
    batch = {"sequences": jnp.asarray(seqs), "attention_mask": jnp.ones(seqs.shape, bool),
             "completion_mask": jnp.asarray(completion)}
    state, metrics = step_fn(state, batch)
    if step % 100 == 0 or step == args.train_steps - 1:
      print(json.dumps({"train_step": step, "sft_loss": round(float(metrics["sft/loss"]), 4),
                        "seconds": round(time.perf_counter() - start, 1)}), file=sys.stderr,
            flush=True)
  return graphdef, state.params, time.perf_counter() - start


def sequence_elbo(graphdef, params, sequences: jax.Array, prompt_len: int, num_mc: int,
                  seed: int) -> jax.Array:
  """Mean over rows of the t-iid ELBO of the completion given the prompt (nats), estimated
  with ``num_mc`` masks per row from fixed keys (the same masks for every mode)."""
  model = nnx.merge(graphdef, params)
  b, t = sequences.shape
  eligible = jnp.broadcast_to(jnp.arange(t) >= prompt_len, (b, t))
  attention = jnp.ones((b, t), bool)

  keys = masking.mask_keys(jax.random.key(seed), 0, jnp.arange(b), "sampler_quality")

  def one(j):
    sample = masking.t_iid_mask(keys, eligible, j)
    return elbo.elbo_term(model, sequences, sample, attention)

  return jnp.mean(jax.lax.map(one, jnp.arange(num_mc)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/sampler_quality")
  p.add_argument("--num_digits", type=int, default=100, help="> 96 spans 4 blocks of 32")
  p.add_argument("--gen_length", type=int, default=128)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--steps", type=int, default=128, help="quota modes: 1 token per step")
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--factor", type=float, default=1.0)
  p.add_argument("--mode", default=DEFAULT_MODES,
                 help=f"comma-separated subset of {sampler_lib.MODES}, '+stop' appends stop_at_eos")
  p.add_argument("--train_steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--learning_rate", type=float, default=3e-3)
  p.add_argument("--num_eval", type=int, default=32)
  p.add_argument("--elbo_mc", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not 0 < args.num_digits < args.gen_length:
    p.error(f"--num_digits={args.num_digits} must be in (0, --gen_length={args.gen_length})")
  modes = [m for m in args.mode.split(",") if m]
  for m in modes:
    sampler_lib.mode_options(m.removesuffix("+stop"))  # fail fast on unknown modes

  model_config = get_preset("tiny", max_seq_len=max(512, args.num_digits + 1 + args.gen_length))
  eos = model_config.eos_token_id
  workdir = pathlib.Path(args.workdir)
  model_dir = workdir / "model"
  train_seconds = None
  if (model_dir / "model_config.json").is_file():
    model = checkpointing.load_model_checkpoint(model_dir)
    graphdef, params = nnx.split(model)
  else:
    graphdef, params, train_seconds = train(args, model_config, eos)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointing.save_model_checkpoint(model_dir, params, model_config, overwrite=True)

  prompts, answers = make_examples(np.random.default_rng([args.seed, 1]), args.num_eval, args, eos)
  prompt_len = prompts.shape[1]
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts.tolist()))
  prompt_ids, prompt_mask = jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32)
  elbo_fn = jax.jit(functools.partial(sequence_elbo, graphdef, prompt_len=prompt_len,
                                      num_mc=args.elbo_mc, seed=args.seed))
  load = os.getloadavg()[0]
  rows = []
  for mode in modes:
    options = sampler_lib.mode_options(mode.removesuffix("+stop"), args.threshold, args.factor)
    config = sampler_lib.SamplerConfig(gen_length=args.gen_length, steps=args.steps,
                                       block_length=args.block_length, temperature=0.0,
                                       stop_at_eos=mode.endswith("+stop"), **options)
    start = time.perf_counter()
    compiled = sampler_lib.generate.lower(graphdef, params, prompt_ids, prompt_mask,
                                          jax.random.key(0), config).compile()
    compile_s = time.perf_counter() - start
    times = []
    for r in range(max(1, args.repeats)):
      start = time.perf_counter()
      out = jax.block_until_ready(compiled(params, prompt_ids, prompt_mask, jax.random.key(r)))
      times.append(time.perf_counter() - start)
    completion = np.asarray(out.sequences)[:, prompt_len:]
    digits_ok = completion[:, :args.num_digits] == answers[:, :args.num_digits]
    exact = (completion == answers).all(1)
    row = {"mode": mode, "accuracy": round(100 * float(exact.mean()), 2),
           "digit_accuracy": round(100 * float(digits_ok.mean()), 2),
           "seconds": round(statistics.median(times), 3), "compile_seconds": round(compile_s, 1),
           "forward_passes": int(out.num_forward_passes),
           "elbo": round(float(elbo_fn(params, out.sequences)), 3),
           "num_eval": args.num_eval, "load_avg_1min": round(load, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  standard = next((r for r in rows if r["mode"] == "standard"), None)
  if standard:
    print(json.dumps({"summary": {r["mode"]: {"speedup": round(standard["seconds"] / r["seconds"], 2),
                                              "accuracy_delta": round(r["accuracy"] - standard["accuracy"], 2),
                                              "elbo_delta": round(r["elbo"] - standard["elbo"], 3)}
                                  for r in rows},
                      "train_seconds": train_seconds and round(train_seconds, 1)}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
