"""RL train-step throughput: prints one JSON object (tokens/s, MFU, step-time split).

  python benchmarks/train_step.py --preset=tiny --objective=bgpo --batch=8 --prompt_length=64 \
      --gen_length=128 [--dtype=bfloat16] [--peak_tflops=989] [--rollout]

Measures, with random weights and a synthetic rollout batch, compile time excluded (median of
--repeats): ``prepare`` (no-grad old/reference scoring, advantages or weights), ``update`` (the
jitted, donated `rl_update`: objective gradients + AdamW), and with --rollout the sampler call
that produces the batch (generation length, block 32, steps = gen_length / 2). tokens/s counts
prompt + completion tokens of the batch per update; MFU = analytic model FLOPs of the update
(`benchmarks/memory.py: step_model_flops`) / time / (--peak_tflops · 1e12).

With --lora_rank the frozen base gets no weight gradient, so the update's real work per token
and forward+backward pass is 2·N (base forward) + 2·N (base activation gradients) + 3·A
(attention: forward and its two-matmul backward) + 6·N_lora (adapters, forward and both
gradients), N = matmul parameters, A = attention FLOPs (`lora_update_flops`); no-grad passes
cost 2·N + A + 2·N_lora. ``mfu_update`` uses this count; ``mfu_update_full_backward`` keeps the
full fine-tuning count (6·N + 3·A per token and pass), which overstates LoRA's work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmpo_jax import sharding  # noqa: E402
from dmpo_jax.diffusion.sampler import SamplerConfig, generate  # noqa: E402
from dmpo_jax.models import attention  # noqa: E402
from dmpo_jax.models.config import LORA_TARGETS, get_preset  # noqa: E402
from dmpo_jax.rl import registry, rollout, train_state as ts, train_step  # noqa: E402
from memory import MC_FIELD, gradient_step_passes, step_model_flops  # noqa: E402
from sampler import init_params  # noqa: E402


def _timed(fn, repeats):
  times = []
  out = None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def lora_update_flops(config, objective: str, ocfg, batch: int, seq_len: int) -> float:
  """FLOPs of one LoRA gradient step (module docstring): no weight gradient for the frozen base."""
  tokens = batch * seq_len
  forward = config.flops_per_token(seq_len)  # 2·N + A per token
  attention = 4 * config.n_layers * config.n_heads * config.head_dim * seq_len
  matmul = forward - attention
  adapters = 2.0 * config.num_lora_params()
  no_grad, with_grad = gradient_step_passes(objective, ocfg)
  per_grad_pass = 2 * matmul + 3 * attention + 3 * adapters
  per_no_grad_pass = matmul + attention + adapters
  return float(tokens * (no_grad * per_no_grad_pass + with_grad * per_grad_pass))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--objective", default="bgpo")
  parser.add_argument("--n_mc", type=int, default=None, help="MC samples of the objective")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--group_size", type=int, default=4)
  parser.add_argument("--prompt_length", type=int, default=64)
  parser.add_argument("--gen_length", type=int, default=128)
  parser.add_argument("--dtype", default=None, help="compute and parameter dtype override")
  parser.add_argument("--state_dtype", default="float32", help="AdamW moment dtype")
  parser.add_argument("--master_weights", action="store_true", help="fp32 master weights")
  parser.add_argument("--micro_batch_size", type=int, default=None)
  parser.add_argument("--remat", type=int, default=None, help="1/0 overrides the preset")
  parser.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
  parser.add_argument("--lora_alpha", type=float, default=16.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak_tflops", type=float, default=None)
  parser.add_argument("--rollout", action="store_true", help="also time the sampler")
  parser.add_argument("--attention_impl", default=None, help="auto | xla | cudnn | splash")
  args = parser.parse_args(argv)

  overrides = {}
  if args.attention_impl:
    overrides["attention_impl"] = args.attention_impl
  if args.dtype:
    overrides.update(dtype=args.dtype, param_dtype=args.dtype)
  if args.remat is not None:
    overrides["remat"] = bool(args.remat)
  if args.lora_rank:
    overrides.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                     lora_targets=tuple(LORA_TARGETS))
  config = get_preset(args.preset, **overrides)
  mesh = sharding.create_mesh((-1, 1, 1))
  graphdef, params = init_params(config)
  params = jax.device_put(params, sharding.state_shardings(params, mesh))

  objective = registry.get_objective(args.objective)
  ocfg_values = {}
  if args.n_mc is not None and MC_FIELD.get(args.objective):
    ocfg_values[MC_FIELD[args.objective]] = args.n_mc
  if args.micro_batch_size:
    ocfg_values["micro_batch_size"] = args.micro_batch_size
  ocfg = objective.make_config(ocfg_values)
  optimizer = ts.make_optimizer(1e-6, state_dtype=args.state_dtype)
  state = jax.jit(lambda p: ts.init_train_state(p, optimizer, 0,
                                                master_weights=args.master_weights))(params)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  rng = np.random.default_rng(0)
  b, p, l = args.batch, args.prompt_length, args.gen_length
  low = min(1000, config.vocab_size - 8)
  prompts = rng.integers(0, low, (b, p)).astype(np.int32)
  prompt_mask = np.ones((b, p), bool)
  result = {"preset": args.preset, "objective": args.objective, "batch": b, "prompt_length": p,
            "gen_length": l, "dtype": config.dtype, "state_dtype": args.state_dtype,
            "master_weights": args.master_weights, "device": jax.devices()[0].device_kind,
            "attention_impl": attention.resolve_impl(config.attention_impl, config.compute_dtype),
            "num_devices": jax.device_count()}
  if args.rollout:
    scfg = SamplerConfig(gen_length=l, steps=max(1, l // 2), block_length=min(32, l))
    run = lambda: generate(graphdef, state.params, jnp.asarray(prompts), jnp.asarray(prompt_mask),
                           jax.random.key(0), scfg).sequences
    jax.block_until_ready(run())
    result["time_rollout_s"], sequences = _timed(run, args.repeats)
    sequences = np.asarray(sequences)
  else:
    sequences = np.concatenate([prompts, rng.integers(0, low, (b, l)).astype(np.int32)], 1)
  groups = np.repeat(np.arange(b // args.group_size + 1), args.group_size)[:b]
  batch_np = rollout.rl_batch(sequences, prompt_mask, rng.random(b).astype(np.float32), groups,
                              np.arange(b))
  put = lambda v: jax.device_put(jnp.asarray(v), sharding.batch_sharding(mesh, np.ndim(v)))
  batch = {k: put(v) for k, v in batch_np.items()}

  ref = (lambda prm: None) if args.lora_rank else (lambda prm: prm)  # LoRA: base, adapters off
  prepare = jax.jit(lambda prm, bt: train_step.prepare_rollout(graphdef, objective, ocfg, prm,
                                                               ref(prm), bt, state.key, jnp.int32(0)))
  jax.block_until_ready(prepare(state.params, batch))
  result["time_prepare_s"], prepared = _timed(lambda: prepare(state.params, batch), args.repeats)
  per_example = {k: put(v) for k, v in prepared.per_example.items()}

  jitted = train_step.jit_rl_update(graphdef, objective, ocfg, optimizer, state_shardings)
  start = time.perf_counter()
  compiled, memory = train_step.compile_ahead_of_time(
      jitted, train_step.abstract(state), batch, per_example, train_step.SCALAR_INT32,
      train_step.SCALAR_INT32)
  result["compile_s"] = time.perf_counter() - start
  result.update(memory)
  times = []
  for i in range(args.repeats + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, per_example, jnp.int32(0), jnp.int32(i))
    jax.block_until_ready(metrics)
    if i:  # the first call pays one-off transfers
      times.append(time.perf_counter() - start)
  update_time = statistics.median(times)
  full_flops = step_model_flops(config, args.objective, ocfg, b, p + l)
  flops = lora_update_flops(config, args.objective, ocfg, b, p + l) if args.lora_rank else full_flops
  result.update({
      "lora_rank": args.lora_rank,
      "time_update_s": update_time,
      "tokens_per_s_update": b * (p + l) / update_time,
      "update_model_tflops": flops / 1e12,
      "loss": float(metrics["train/loss"]),
  })
  if args.lora_rank:
    result["update_model_tflops_full_backward"] = full_flops / 1e12
  if args.peak_tflops:
    peak = args.peak_tflops * 1e12 * jax.device_count()
    result["mfu_update"] = flops / update_time / peak
    if args.lora_rank:
      result["mfu_update_full_backward"] = full_flops / update_time / peak
  step_time = update_time + result["time_prepare_s"] + result.get("time_rollout_s", 0.0)
  result["time_step_s"] = step_time
  result["split"] = {k: round(result[f"time_{k}_s"] / step_time, 4)
                     for k in ("rollout", "prepare", "update") if f"time_{k}_s" in result}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
