"""Compiled memory of each objective's gradient step vs the number of MC samples (AOT, no run).

For every n_t in ``--n_mc`` the gradient step ``objective.grads`` is lowered and compiled ahead
of time against abstract inputs (`jax.ShapeDtypeStruct`; parameters from `nnx.eval_shape`), so
nothing is executed or allocated, and one JSON object per line is printed with the compiled
temp memory (`memory_analysis().temp_size_in_bytes`) and FLOPs (`cost_analysis()`).

  python benchmarks/memory.py --preset=tiny --objective=bgpo,dmpo,vrpo_ol_two_pass,vrpo_ol \
      --n_mc=1,4,16,64 --batch=8 --prompt_len=64 --gen_len=128

The MC field varied per objective: bgpo / vrpo_ol / vrpo_ol_two_pass / spg ``num_mc``, dmpo
``loss_num_mc`` (R), wddo ``weight_num_mc`` (K). diffu_grpo and wd1 have no MC loop in their
gradient step (n_mc must be 1). XLA's cost analysis counts a while-loop body once, so ``flops``
does not scale with n_t; ``model_flops`` is the analytic count (forward = 1, backward = 2
forward-equivalents per token per forward pass, `ModelConfig.flops_per_token`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import registry, scoring

MC_FIELD = {"bgpo": "num_mc", "vrpo_ol": "num_mc", "vrpo_ol_two_pass": "num_mc", "spg": "num_mc",
            "dmpo": "loss_num_mc", "wddo": "weight_num_mc", "diffu_grpo": None, "wd1": None}


def abstract_model(preset: str, overrides: dict[str, Any]):
  """(graphdef, abstract params) without allocating the weights."""
  config = get_preset(preset, **overrides)
  abstract = nnx.eval_shape(lambda: create_model(config, 0))
  graphdef, state = nnx.split(abstract)
  return config, graphdef, state


def abstract_batch(config, batch: int, prompt_len: int, gen_len: int, group_size: int):
  t = prompt_len + gen_len
  s = jax.ShapeDtypeStruct
  return {"sequences": s((batch, t), jnp.int32), "attention_mask": s((batch, t), jnp.bool_),
          "prompt_mask": s((batch, t), jnp.bool_), "completion_mask": s((batch, t), jnp.bool_),
          "rewards": s((batch,), jnp.float32), "group_ids": s((batch,), jnp.int32),
          "example_ids": s((batch,), jnp.int32)}


def abstract_keys():
  return jax.eval_shape(lambda: scoring.make_keys(jax.random.key(0), 0, 0, 0))


def step_model_flops(config, objective: str, ocfg, batch: int, seq_len: int) -> float:
  """Analytic FLOPs of one gradient step: (no-grad forwards + 3 × grad forwards) · tokens."""
  per_forward = config.flops_per_token(seq_len) * batch * seq_len
  no_grad, with_grad = gradient_step_passes(objective, ocfg)
  return float(per_forward * (no_grad + 3 * with_grad))


def gradient_step_passes(objective: str, ocfg) -> tuple[int, int]:
  """(no-grad forward passes, forward+backward passes) over the batch in one gradient step."""
  mc = getattr(ocfg, MC_FIELD[objective]) if MC_FIELD[objective] else 1
  if objective in ("bgpo",) or objective == "dmpo" and ocfg.baseline != "model":
    no_grad, with_grad = 0, mc
  elif objective in ("vrpo_ol", "vrpo_ol_two_pass"):
    two_pass = ocfg.form == "two_pass"
    no_grad = mc if (two_pass and ocfg.mode == "off_policy") else 0
    with_grad = mc
  elif objective == "dmpo":
    no_grad = ocfg.weight_num_mc if ocfg.model_baseline_masks == "weights" else mc
    with_grad = mc
  elif objective == "wddo":
    no_grad, with_grad = 2 * mc, 2 * mc
  elif objective == "spg":
    no_grad = mc if ocfg.negative_estimator in ("eubo", "mix") else 0
    with_grad = mc
  else:
    no_grad, with_grad = 0, 1
  return no_grad, with_grad


def measure(objective_name: str, preset: str, n_mc: int, args, model_overrides) -> dict[str, Any]:
  config, graphdef, params = abstract_model(preset, model_overrides)
  objective = registry.get_objective(objective_name)
  field = MC_FIELD[objective_name]
  overrides = dict(args.objective_overrides)
  if field is not None:
    overrides[field] = n_mc
  elif n_mc != 1:
    raise ValueError(f"objective {objective_name!r} has no MC samples in its gradient step; "
                     f"use --n_mc=1")
  if args.micro_batch_size:
    overrides["micro_batch_size"] = args.micro_batch_size
  ocfg = objective.make_config(overrides)
  batch = abstract_batch(config, args.batch, args.prompt_len, args.gen_len, args.group_size)
  keys = abstract_keys()
  aux = jax.eval_shape(lambda p, b, k: objective.prepare(graphdef, p, p, b, k, ocfg),
                       params, batch, keys)
  start = time.time()
  lowered = jax.jit(objective.grads, static_argnums=(0, 5)).lower(graphdef, params, batch, aux,
                                                                  keys, ocfg)
  compiled = lowered.compile()
  compile_s = time.time() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  seq_len = args.prompt_len + args.gen_len
  return {
      "objective": objective_name, "preset": preset, "n_mc": n_mc, "batch": args.batch,
      "prompt_len": args.prompt_len, "gen_len": args.gen_len,
      "micro_batch_size": args.micro_batch_size, "form": getattr(ocfg, "form", None),
      "mode": getattr(ocfg, "mode", None),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "flops": float(cost.get("flops", float("nan"))) if cost else None,
      "model_flops": step_model_flops(config, objective_name, ocfg, args.batch, seq_len),
      "num_params": config.num_params(), "backend": jax.default_backend(),
      "compile_s": round(compile_s, 2)}


def _parse_overrides(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value  # a bare string such as mode=on_policy
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny", help="model preset(s), comma separated")
  parser.add_argument("--objective", default="bgpo", help="objective(s), comma separated")
  parser.add_argument("--n_mc", default="1,4,16,64", help="MC sample counts, comma separated")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--gen_len", type=int, default=128)
  parser.add_argument("--micro_batch_size", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="objective config override (JSON value), repeatable")
  parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                      help="ModelConfig override (JSON value), repeatable")
  args = parser.parse_args(argv)
  args.objective_overrides = _parse_overrides(args.set)
  model_overrides = _parse_overrides(args.model)
  for preset in args.preset.split(","):
    for objective in args.objective.split(","):
      for n_mc in [int(x) for x in args.n_mc.split(",")]:
        print(json.dumps(measure(objective, preset, n_mc, args, model_overrides)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
