"""Attention implementations against each other: error vs the first, time and compiled temp
memory of forward + backward. Prints one JSON object per implementation.

  python benchmarks/attention.py --impls=xla,cudnn --batch=4 --seq=1024 --pad=100   # GPU
  python benchmarks/attention.py --impls=xla,splash --batch=2 --seq=256 --heads=4 --head_dim=16  # CPU

Inputs: q, k, v [batch, seq, heads, head_dim] ~ N(0, 1) in ``--dtype``, row i of the batch with
its first ``i * pad`` keys masked (left padding, as prompts are padded); the loss is
Σ out · c for a fixed random c, so the gradient checks the backward pass. ``rel_err`` is
max |x − x_ref| / max |x_ref| of the output and of dq, dk, dv against the first implementation;
``ok`` holds when all are within the dtype's tolerance (fp32 2e-5, bf16 6e-2: the kernels round
the probabilities to bf16 before the value matmul). Time: median of ``--repeats`` calls after one
warm-up call; temp: the compiled program's scratch bytes (`memory_analysis`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmpo_jax.models import attention  # noqa: E402

TOLERANCE = {"float32": 2e-5, "bfloat16": 6e-2, "float16": 1e-2}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--impls", default="xla,cudnn", help=f"comma-separated subset of {attention.IMPLS}")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv_heads", type=int, default=None, help="default: --heads (MHA)")
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--pad", type=int, default=100, help="row i has i * pad masked keys")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  impls = [i for i in args.impls.split(",") if i]
  unknown = set(impls) - set(attention.IMPLS)
  if unknown:
    parser.error(f"unknown --impls {sorted(unknown)}; known {attention.IMPLS}")
  kv_heads = args.kv_heads or args.heads
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (args.batch, args.seq, args.heads, args.head_dim), args.dtype)
  k = jax.random.normal(keys[1], (args.batch, args.seq, kv_heads, args.head_dim), args.dtype)
  v = jax.random.normal(keys[2], (args.batch, args.seq, kv_heads, args.head_dim), args.dtype)
  cot = jax.random.normal(keys[3], q.shape, jnp.float32)
  key_mask = jnp.arange(args.seq)[None] >= (jnp.arange(args.batch) * args.pad)[:, None]

  reference = None
  for impl in impls:
    def loss(q, k, v, impl=impl):
      out = attention.attention(q, k, v, key_mask, impl=impl)
      return jnp.sum(out.astype(jnp.float32) * cot), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    row = {"impl": impl, "resolved": attention.resolve_impl(impl, q.dtype),
           "device": jax.devices()[0].device_kind, "dtype": args.dtype, "batch": args.batch,
           "seq": args.seq, "heads": args.heads, "kv_heads": kv_heads, "head_dim": args.head_dim}
    try:
      start = time.perf_counter()
      compiled = fn.lower(q, k, v).compile()
      row["compile_s"] = round(time.perf_counter() - start, 2)
      memory = compiled.memory_analysis()
      row["temp_bytes"] = int(memory.temp_size_in_bytes) if memory is not None else None
      result = jax.block_until_ready(compiled(q, k, v))  # warm-up
      times = []
      for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
      row["seconds_fwd_bwd"] = round(statistics.median(times), 6)
    except Exception as e:  # pylint: disable=broad-except  (reported, the next one still runs)
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      print(json.dumps(row), flush=True)
      continue
    (_, out), grads = result
    if reference is None:
      reference = (out, grads)
    else:
      pairs = zip(("out", "dq", "dk", "dv"), (out, *grads), (reference[0], *reference[1]))
      row["rel_err"] = {name: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                                    / jnp.max(jnp.abs(b.astype(jnp.float32))))
                        for name, a, b in pairs}
      row["ok"] = max(row["rel_err"].values()) < TOLERANCE[args.dtype]
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
