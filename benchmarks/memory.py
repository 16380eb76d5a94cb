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
import functools
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _force_host_devices(argv: list[str]) -> None:
  """``--num_devices=N`` must reach XLA before jax is imported: fake N CPU devices."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--num_devices=") else (
        argv[i + 1] if arg == "--num_devices" and i + 1 < len(argv) else None)
    if value and int(value) > 1:
      flags = os.environ.get("XLA_FLAGS", "")
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(value)}"
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _force_host_devices(sys.argv[1:])
  # Compiling for a TPU topology only needs libtpu's compiler: let it load next to another
  # process that holds libtpu's lock file (no TPU is touched).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax import sharding  # noqa: E402
from dmpo_jax.diffusion import sampler as sampler_lib  # noqa: E402
from dmpo_jax.models import attention, lora  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.transformer import create_model  # noqa: E402
from dmpo_jax.rl import registry, scoring, train_state as ts, train_step  # noqa: E402

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


# ------------------------------------------------------------------------------------------------
# Memory plan of a published config on a device mesh (--config): the full RL update, the no-grad
# prepare and the rollout sampler, compiled ahead of time for N fake CPU devices
# (--num_devices) or a real TPU topology (--topology, needs libtpu).
# ------------------------------------------------------------------------------------------------

GIB = 1024 ** 3
# Per-chip memory of the TPU generations (Cloud TPU docs) for the "fits" verdict.
TPU_CHIP_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v5litepod": 16, "v6e": 32}


def load_config(path: str, overrides: list[str]) -> "ml_collections.ConfigDict":
  """``get_config()`` of a configs/*.py file with dotted ``key=value`` overrides (JSON values)."""
  spec = importlib.util.spec_from_file_location("plan_config", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--config: cannot load {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in _parse_overrides(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"--override {key}: unknown key {leaf!r} in {'.'.join(parents) or 'config'}")
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and not isinstance(
        node[leaf], bool) else value
  return config


def plan_devices(topology: str | None) -> tuple[list[Any], str]:
  """The devices to compile for: a TPU topology (``v5p:2x2x1``, needs libtpu) or jax.devices()."""
  if not topology:
    return jax.devices(), jax.devices()[0].device_kind
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  dims = [int(d) for d in topology.split(":")[-1].split("x")]
  # Fewer chips than one host's default 2x2x1 block (a single chip) need explicit host bounds.
  kwargs = {"chips_per_host_bounds": tuple(dims + [1] * (3 - len(dims)))} if math.prod(dims) < 4 else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # libtpu missing or unknown topology
    raise RuntimeError(f"--topology={topology}: cannot build the TPU topology ({e}); install "
                       "libtpu with `pip install \"jax[tpu]==<jax version>\"`") from e
  return list(desc.devices), desc.devices[0].device_kind


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _compiled_memory(lowered, inspect=None) -> dict[str, Any]:
  """The compiled program's memory (and XLA cost) analysis; ``inspect(compiled)`` (optional)
  adds its own fields (`benchmarks/step_time.py` reads the HLO there)."""
  start = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler itself refuses programs whose temporaries exceed the chip's HBM.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"error": str(e).splitlines()[0], "compile_s": round(time.time() - start, 1)}
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  out = {name: int(getattr(memory, f"{name}_size_in_bytes"))
         for name in ("argument", "output", "alias", "temp")}
  # Live bytes of the program: inputs + outputs (donated outputs reuse their inputs) + scratch.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["flops"] = float(cost.get("flops", float("nan"))) if cost else None
  out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan"))) if cost else None
  out["compile_s"] = round(time.time() - start, 1)
  if inspect is not None:
    out.update(inspect(compiled))
  return out


def memory_plan(config: "ml_collections.ConfigDict", devices: list[Any],
                mesh_shape: dict[str, int], programs: tuple[str, ...] = ("update", "sampler"),
                model_overrides: dict[str, Any] | None = None,
                inspect: Any = None) -> dict[str, Any]:
  """Per-device memory of the RL programs of ``config`` on a mesh of ``devices``, compiled
  ahead of time from abstract inputs (nothing is allocated).

  Programs: ``update`` (`train_step.rl_update`: gradients accumulated over MC samples and
  micro-batches + AdamW, state donated), ``prepare`` (no-grad old / reference scoring) and
  ``sampler`` (the rollout sampler, weights as the trainer holds them). For each: the compiler's
  argument / output / alias / temp bytes and ``total`` = argument + output − alias + temp, plus
  ``peak`` = total + the resident state the program does not take as arguments (the frozen
  reference copy of full fine-tuning; the optimizer state during sampling and scoring).
  ``inspect(name, compiled) -> dict`` (optional) adds fields to each program's entry.
  """
  look = (lambda name: None) if inspect is None else (
      lambda name: lambda compiled: inspect(name, compiled))
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  loop.validate_config(config, len(devices))
  mesh = sharding.create_mesh(mesh_shape, devices=devices)
  overrides = {"remat": bool(config.model.remat),
               "use_key_padding_mask": bool(config.model.use_key_padding_mask)}
  for key in ("dtype", "param_dtype"):
    if config.model[key]:
      overrides[key] = config.model[key]
  model_config = get_preset(config.model.preset, **overrides, **(model_overrides or {}))
  attention_impl = (model_overrides or {}).get("attention_impl",
                                              config.model.get("attention_impl", "auto"))
  model_config = model_config.replace(attention_impl=attention_impl)

  def build():
    model = create_model(model_config, config.seed)
    if config.model.lora_rank:
      model = lora.add_adapters(model, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                                targets=tuple(config.model.lora_targets), seed=config.seed)
    return model

  graphdef, params = nnx.split(nnx.eval_shape(build))
  params = _abstract(params, sharding.state_shardings(params, mesh))
  objective = registry.get_objective(config.objective)
  ocfg = objective.make_config(config.get(config.objective, {}))
  optimizer = loop.rl_optimizer(config)
  init = functools.partial(ts.init_train_state, optimizer=optimizer, seed=config.seed,
                           master_weights=config.optimizer.master_weights)
  abstract_state, state_shardings = train_step.state_shardings(init, params, mesh)
  state = _abstract(abstract_state, state_shardings)
  ref_params = None if config.model.lora_rank else params  # LoRA: base with adapters disabled
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  minibatches = config.minibatches_per_rollout
  full_batch = loop.abstract_rollout_batch(config, mesh)
  batch = loop.abstract_rollout_batch(config, mesh, minibatches)
  prepare = jax.jit(lambda p, r, b, k, s: train_step.prepare_rollout(graphdef, objective, ocfg, p, r,
                                                                     b, k, s))
  prepared = jax.eval_shape(prepare, params, ref_params, full_batch, key, scalar)
  per_example = {k: jax.ShapeDtypeStruct((v.shape[0] // minibatches,) + v.shape[1:], v.dtype,
                                         sharding=sharding.batch_sharding(mesh, v.ndim))
                 for k, v in prepared.per_example.items()}

  param_bytes = per_device_bytes(params)
  ref_bytes = per_device_bytes(ref_params) if ref_params is not None else 0
  opt_bytes = per_device_bytes(state.opt_state)
  result = {
      "config": config.get("_name", None), "objective": config.objective,
      "preset": config.model.preset, "lora_rank": int(config.model.lora_rank),
      "device_kind": devices[0].device_kind, "num_devices": len(devices),
      "mesh": dict(mesh.shape), "batch": int(full_batch["sequences"].shape[0]),
      "update_batch": int(batch["sequences"].shape[0]),
      "seq_len": int(full_batch["sequences"].shape[1]),
      "micro_batch_size": getattr(ocfg, "micro_batch_size", None),
      "n_mc": getattr(ocfg, MC_FIELD.get(config.objective) or "", None),
      "remat": bool(config.model.remat), "attention_impl": attention_impl,
      # What `attention_impl` runs on these devices inside a mesh context (`attention.choose`;
      # "auto" outside one, e.g. a program jitted without the mesh, takes XLA instead of splash).
      "attention_resolved": attention.resolve_impl(attention_impl, model_config.compute_dtype,
                                                   devices[0].platform),
      "jax": jax.__version__,
      "resident_bytes": {"params": param_bytes, "reference": ref_bytes, "opt_state": opt_bytes},
      "programs": {}}
  if "update" in programs:
    jitted = train_step.jit_rl_update(graphdef, objective, ocfg, optimizer, state_shardings)
    result["programs"]["update"] = _with_peak(
        _compiled_memory(jitted.lower(state, batch, per_example, scalar, scalar), look("update")),
        ref_bytes)
  if "prepare" in programs:
    result["programs"]["prepare"] = _with_peak(
        _compiled_memory(prepare.lower(params, ref_params, full_batch, key, scalar),
                         look("prepare")), opt_bytes)
  if "sampler" in programs:
    scfg = loop.rollout_sampler_config(config)
    b, p = full_batch["sequences"].shape[0], config.task.prompt_length
    ids = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    mask = jax.ShapeDtypeStruct((b, p), jnp.bool_, sharding=sharding.batch_sharding(mesh, 2))
    result["programs"]["sampler"] = _with_peak(
        _compiled_memory(sampler_lib.generate.lower(graphdef, params, ids, mask, key, scfg),
                         look("sampler")), opt_bytes + ref_bytes)
  failed = [name for name, p in result["programs"].items() if "error" in p]
  if failed:  # the compiler ran out of device memory: no peak, does not fit
    result.update(peak_bytes=None, peak_gib=None, out_of_memory=failed)
  else:
    result["peak_bytes"] = max(p["peak"] for p in result["programs"].values())
    result["peak_gib"] = round(result["peak_bytes"] / GIB, 2)
  return result


def _with_peak(info: dict[str, Any], resident: int) -> dict[str, Any]:
  if "error" not in info:
    info["peak"] = info["total"] + resident
  return info


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
  plan = parser.add_argument_group("memory plan of a published config (--config)")
  plan.add_argument("--config", default=None, help="configs/*.py file: plan its RL programs")
  plan.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. model.lora_rank=128 (JSON value)")
  plan.add_argument("--num_devices", type=int, default=1,
                    help="fake CPU devices (set before jax starts); ignored with --topology")
  plan.add_argument("--topology", default=None,
                    help="compile for a TPU topology instead, e.g. v5p:2x2x1 (needs libtpu)")
  plan.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
  plan.add_argument("--programs", default="update,sampler", help="update,prepare,sampler")
  plan.add_argument("--output", default=None, help="also append the JSON line to this file")
  args = parser.parse_args(argv)
  if args.config:
    config = load_config(args.config, args.override)
    devices, _ = plan_devices(args.topology)
    mesh_shape = dict(zip(sharding.MESH_AXES, (int(x) for x in args.mesh.split(","))))
    result = memory_plan(config, devices, mesh_shape, tuple(args.programs.split(",")),
                         _parse_overrides(args.model))
    result.update(config=os.path.basename(args.config), overrides=args.override + args.model,
                  topology=args.topology)
    generation = (args.topology or "").split(":")[0]
    if generation in TPU_CHIP_GIB:
      # v4 topologies list each chip's two TensorCores as two devices sharing its HBM.
      chips = len({tuple(d.coords) for d in devices})
      result.update(chips=chips, chip_gib=TPU_CHIP_GIB[generation],
                    device_gib=TPU_CHIP_GIB[generation] * chips / len(devices))
      result["fits"] = (result["peak_bytes"] is not None
                        and result["peak_bytes"] <= result["device_gib"] * GIB)
    line = json.dumps(result)
    print(line, flush=True)
    if args.output:
      with open(args.output, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return 0
  args.objective_overrides = _parse_overrides(args.set)
  model_overrides = _parse_overrides(args.model)
  for preset in args.preset.split(","):
    for objective in args.objective.split(","):
      for n_mc in [int(x) for x in args.n_mc.split(",")]:
        print(json.dumps(measure(objective, preset, n_mc, args, model_overrides)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
