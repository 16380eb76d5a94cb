"""Sampler throughput benchmark: prints one JSON object per mode (compile time excluded).

  python benchmarks/sampler.py --preset=tiny --batch=4 --prompt_length=64 --gen_length=128 \
      --block_length=32 --steps=128 --mode=all [--dtype=bfloat16] [--peak_tflops=989]
  python benchmarks/sampler.py --checkpoint=runs/sampler_quality/model \
      --prompt_ids_file=runs/sampler_quality/prompts.jsonl --gen_length=160 --steps=160 --mode=all

Modes (`dmpo_jax.diffusion.sampler.MODES`; ``all`` = every one): ``standard`` (LLaDA sampler, no
cache), ``prefix_cache`` / ``dual_cache`` (Fast-dLLM prefix / dual KV cache, quota schedule),
``threshold`` / ``factor`` (confidence-aware parallel decoding, no cache) and the combinations
``prefix_cache+threshold``, ``dual_cache+threshold``, ``dual_cache+factor``.

Weights: a random preset (``--preset``; throughput does not depend on the weight values, but with
random weights no confidence reaches a threshold, so parallel decoding commits about one token
per step and its step count is pessimistic), or a trained ``--checkpoint`` (HF folder or model
checkpoint) so that threshold / factor decoding sees real confidences. Prompts: random tokens of
``--prompt_length``, or ``--prompt_ids_file`` (JSONL, one list of token ids per line, equal
lengths; the first ``--batch`` lines are used).

Reported: tokens/s = batch·gen_length / wall time of one compiled call (median of --repeats),
forward passes, and the FLOPs of the denoising forward passes
Σ_passes rows × query_tokens × ModelConfig.flops_per_token(canvas length) (the output head is
counted for every query position), with MFU = FLOPs / time / (--peak_tflops·1e12) when given.
"""

from __future__ import annotations

import argparse
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

from dmpo_jax.diffusion import sampler as sampler_lib  # noqa: E402
from dmpo_jax.diffusion.sampler import SamplerConfig, generate  # noqa: E402
from dmpo_jax.models import attention  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.transformer import create_model  # noqa: E402

MODES = sampler_lib.MODES


def init_params(config, seed: int = 0):
  """(graphdef, params) with the initialisation jitted (eager init is slow for large presets)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model(config, seed)))
  params = jax.jit(lambda: nnx.split(create_model(config, seed))[1])()
  return graphdef, params


def forward_flops(model_config, sampler_config: SamplerConfig, out, batch: int,
                  prompt_length: int) -> float:
  """FLOPs of the denoising forward passes of one `generate` call (see module docstring)."""
  total = prompt_length + sampler_config.gen_length
  per_token = model_config.flops_per_token(total)
  rows = batch * (2 if sampler_config.cfg_scale > 0 else 1)
  k = sampler_config.block_length
  if not sampler_config.parallel:
    steps_per_block = [sampler_config.steps_per_block] * sampler_config.num_blocks
  else:
    commit_step = np.asarray(out.commit_step)
    steps_per_block = [int(commit_step[:, b * k:(b + 1) * k].max() - commit_step[:, b * k:(b + 1) * k].min() + 1)
                       for b in range(sampler_config.num_blocks)]
  query_tokens = 0
  for b, n_steps in enumerate(steps_per_block):
    if sampler_config.cache == "prefix":
      suffix = total - (prompt_length + b * k)
      query_tokens += total + (n_steps - 1) * suffix
    elif sampler_config.cache == "dual":
      query_tokens += total + (n_steps - 1) * k
    else:
      query_tokens += n_steps * total
  return float(rows * query_tokens * per_token)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--checkpoint", default=None,
                 help="trained weights (HF folder or model checkpoint) instead of a random preset")
  p.add_argument("--prompt_ids_file", default=None, help="JSONL token-id lists (see docstring)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_length", type=int, default=64)
  p.add_argument("--gen_length", type=int, default=128)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--steps", type=int, default=128)
  p.add_argument("--mode", default="standard,dual_cache,dual_cache+threshold",
                 help=f"comma-separated subset of {MODES}, or 'all'")
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--factor", type=float, default=1.0)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--cfg_scale", type=float, default=0.0)
  p.add_argument("--dtype", default=None, help="param and compute dtype (default: the preset's)")
  p.add_argument("--peak_tflops", type=float, default=None, help="device peak TFLOP/s for MFU")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=0, help="untimed calls before the timed ones")
  p.add_argument("--attention_impl", default=None,
                 help="auto | xla | cudnn | splash (default: the preset's / checkpoint's, auto)")
  args = p.parse_args(argv)
  modes = list(MODES) if args.mode == "all" else [m for m in args.mode.split(",") if m]
  unknown = set(modes) - set(MODES)
  if unknown:
    p.error(f"unknown mode(s) {sorted(unknown)}; expected a subset of {MODES}")
  if args.checkpoint:
    from launch.eval import load_model  # pylint: disable=import-outside-toplevel
    model, model_config = load_model(args.checkpoint, dtype=args.dtype)
    if args.attention_impl:
      model_config = model_config.replace(attention_impl=args.attention_impl)
      model = nnx.merge(nnx.split(nnx.eval_shape(lambda: create_model(model_config)))[0],
                        nnx.split(model)[1])
    graphdef, params = nnx.split(model)
    name = args.checkpoint
  else:
    overrides = {"remat": False}
    if args.attention_impl:
      overrides["attention_impl"] = args.attention_impl
    if args.dtype:
      overrides.update(param_dtype=args.dtype, dtype=args.dtype)
    model_config = get_preset(args.preset, **overrides)
    graphdef, params = init_params(model_config)
    name = args.preset
  if args.prompt_ids_file:
    lines = pathlib.Path(args.prompt_ids_file).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()][:args.batch]
    if len(rows) < args.batch or len({len(r) for r in rows}) != 1:
      p.error(f"--prompt_ids_file {args.prompt_ids_file}: need {args.batch} lists of equal length, "
              f"got lengths {sorted({len(r) for r in rows})} in {len(rows)} lines")
    prompt = jnp.asarray(rows, jnp.int32)
  else:
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, min(model_config.vocab_size, 256),
                                      (args.batch, args.prompt_length)), jnp.int32)
  prompt_length = prompt.shape[1]
  prompt_mask = jnp.ones_like(prompt)
  for mode in modes:
    config = SamplerConfig(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, cfg_scale=args.cfg_scale, return_trace=True,
        **sampler_lib.mode_options(mode, args.threshold, args.factor))
    start = time.perf_counter()
    compiled = generate.lower(graphdef, params, prompt, prompt_mask, jax.random.key(0), config).compile()
    compile_s = time.perf_counter() - start
    for r in range(args.warmup):
      jax.block_until_ready(compiled(params, prompt, prompt_mask, jax.random.key(1000 + r)))
    times = []
    for r in range(max(1, args.repeats)):
      start = time.perf_counter()
      out = compiled(params, prompt, prompt_mask, jax.random.key(r))
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = forward_flops(model_config, config, out, args.batch, prompt_length)
    result = {
        "model": name, "mode": mode, "device": jax.devices()[0].device_kind,
        "dtype": model_config.dtype, "attention_impl": attention.resolve_impl(
            model_config.attention_impl, model_config.compute_dtype),
        "batch": args.batch, "prompt_length": prompt_length,
        "gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
        "threshold": config.threshold, "factor": config.factor, "forward_passes": int(out.num_forward_passes),
        "seconds": round(seconds, 4), "compile_seconds": round(compile_s, 2),
        "warmup_calls": args.warmup, "timed_calls": max(1, args.repeats),
        "tokens_per_s": round(args.batch * args.gen_length / seconds, 1),
        "forward_passes_per_s": round(int(out.num_forward_passes) / seconds, 2),
        "denoise_tflops": round(flops / 1e12, 4),
        "achieved_tflops_per_s": round(flops / seconds / 1e12, 4),
    }
    if args.peak_tflops:
      result["mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
    print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
