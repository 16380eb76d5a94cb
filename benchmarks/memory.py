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

``--config=configs/<name>.py`` plans a published config instead (`memory_plan`): its update,
prepare, sampler (on the sampling layout), reshard and SFT programs on N fake CPU devices or a TPU
topology, each with the compiler's bytes and the collectives of its optimized HLO
(`dmpo_jax.hlo_collectives`, `docs/scaling.md` §5).
"""

from __future__ import annotations

import argparse
import functools
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

from dmpo_jax import hlo_collectives, sampling_layout, sharding  # noqa: E402
from dmpo_jax.diffusion import sampler as sampler_lib  # noqa: E402
from dmpo_jax.models import attention, lora  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.transformer import create_model  # noqa: E402
from dmpo_jax.rl import registry, scoring, train_state as ts, train_step  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plan_config  # noqa: E402  pylint: disable=wrong-import-position

load_config = plan_config.load_config  # benchmarks/step_time.py and the tests use this name

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


def plan_devices(topology: str | None) -> tuple[list[Any], str]:
  """The devices to compile for: a TPU topology (``v5p:2x2x1``, needs libtpu) or jax.devices()."""
  if not topology:
    return jax.devices(), jax.devices()[0].device_kind
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  dims = [int(d) for d in topology.split(":")[-1].split("x")]
  # Fewer chips than one host's default 2x2x1 block (a single chip) need explicit host bounds.
  kwargs = {"chips_per_host_bounds": tuple(dims + [1] * (3 - len(dims)))} if math.prod(dims) < 4 else {}
  if topology.startswith("v4:"):
    # JAX runs a v4 chip's two TensorCores as one device (megacore, 32 GiB).
    kwargs["chip_config_name"] = "megacore"
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # libtpu missing or unknown topology
    raise RuntimeError(f"--topology={topology}: cannot build the TPU topology ({e}); install "
                       "libtpu with `pip install \"jax[tpu]==<jax version>\"`") from e
  return list(desc.devices), desc.devices[0].device_kind


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


per_device_bytes = sampling_layout.per_device_bytes


def _compiled_memory(lowered, rows: int | None = None, tokens: int | None = None,
                     unknown_trip_count: int = 1, weight_shapes=(), inspect=None) -> dict[str, Any]:
  """The compiler's per-device bytes of a lowered program, and its collectives read from the
  optimized HLO (`hlo_collectives`): ``collective_bytes`` (Σ payload × executions, loops of
  unknown trip count counted ``unknown_trip_count`` times) and ``full_batch_collectives`` (those
  carrying an array of all ``rows`` rows). ``inspect(compiled)`` (optional) adds its own
  fields (`benchmarks/step_time.py` reads the HLO there)."""
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
  items = hlo_collectives.collectives(compiled.as_text(), unknown_trip_count)
  out["collectives"] = len(items)
  out["collective_bytes"] = hlo_collectives.total_bytes(items)
  if rows:
    hits = hlo_collectives.full_batch_arrays(items, rows, tokens, weight_shapes)
    out["full_batch_collectives"] = [f"{c.opcode} {dtype}{list(dims)}" for c, (dtype, dims) in hits]
  out["compile_s"] = round(time.time() - start, 1)
  if inspect is not None:
    out.update(inspect(compiled))
  return out


def memory_plan(config: "ml_collections.ConfigDict", devices: list[Any],
                mesh_shape: dict[str, int], programs: tuple[str, ...] = ("update", "sampler"),
                model_overrides: dict[str, Any] | None = None,
                device_bytes: int | None = None, inspect: Any = None) -> dict[str, Any]:
  """Per-device memory of the RL programs of ``config`` on a mesh of ``devices``, compiled
  ahead of time from abstract inputs (nothing is allocated).

  Programs: ``update`` (`train_step.rl_update`: gradients accumulated over MC samples and
  micro-batches + AdamW, state donated), ``prepare`` (no-grad old / reference scoring),
  ``sampler`` (the rollout sampler on the sampling layout, `dmpo_jax.sampling_layout`; its
  arguments include the sampling copy of the weights), ``reshard`` (training layout -> sampling
  layout, once per RL step) and ``sft`` (one SFT warm-up step of ``config.sft.batch_size``
  rows). For each: the compiler's argument / output / alias / temp bytes and ``total`` =
  argument + output − alias + temp, plus ``peak`` = total + the resident state the program does
  not take as arguments (the frozen reference copy of full fine-tuning; the training state
  during sampling and scoring), and the collectives of its optimized HLO. The sampler also gets
  ``collective_bytes_per_step`` (per denoising step). ``device_bytes`` (per device) picks the
  sampling layout's tensor size when ``config.mesh.sampling_tensor`` is 0 (auto).
  ``inspect(name, compiled) -> dict`` (optional) adds fields to each program's entry.
  """
  look = (lambda name: None) if inspect is None else (
      lambda name: lambda compiled: inspect(name, compiled))
  from dmpo_jax.rl import loop, sft  # pylint: disable=import-outside-toplevel
  plan_config.validate_for_plan(config, len(devices))
  mesh = sharding.create_mesh(mesh_shape, devices=devices)
  overrides = {"remat": bool(config.model.remat),
               "use_key_padding_mask": bool(config.model.use_key_padding_mask),
               "grad_reduce_dtype": config.model.get("grad_reduce_dtype", "")}
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
  rows, tokens = full_batch["sequences"].shape
  # Weights, their per-layer slices and shards: not activations even when a dimension equals
  # the rows (a [4096, 32, 128] q_proj slice split 32 ways is [128, 32, 128]).
  weight_shapes = {tuple(s) for x in jax.tree.leaves(params)
                   for full in (x.shape, x.sharding.shard_shape(x.shape)) for s in (full, full[1:])}
  compiled_memory = functools.partial(_compiled_memory, weight_shapes=weight_shapes)
  prepare = train_step.jit_prepare(graphdef, objective, ocfg, mesh)
  prepared = jax.eval_shape(prepare, params, ref_params, full_batch, key, scalar)
  per_example = {k: jax.ShapeDtypeStruct((v.shape[0] // minibatches,) + v.shape[1:], v.dtype,
                                         sharding=sharding.batch_sharding(mesh, v.ndim))
                 for k, v in prepared.per_example.items()}

  param_bytes = per_device_bytes(params)
  ref_bytes = per_device_bytes(ref_params) if ref_params is not None else 0
  opt_bytes = per_device_bytes(state.opt_state)
  master_bytes = per_device_bytes(state.master) if state.master is not None else 0
  layout = sampling_layout.layout_for(
      mesh, model_config, int(config.mesh.get("sampling_tensor", 0)),
      sampling_layout.param_bytes(params), param_bytes + ref_bytes + opt_bytes + master_bytes,
      device_bytes=device_bytes)
  sampling_params = _abstract(params, layout.param_shardings(params))
  sampling_bytes = per_device_bytes(sampling_params)
  result = {
      "config": config.get("_name", None), "objective": config.objective,
      "preset": config.model.preset, "lora_rank": int(config.model.lora_rank),
      "device_kind": devices[0].device_kind, "num_devices": len(devices),
      "mesh": dict(mesh.shape), "sampling_mesh": dict(layout.mesh.shape), "batch": rows,
      "update_batch": int(batch["sequences"].shape[0]), "seq_len": tokens,
      "micro_batch_size": getattr(ocfg, "micro_batch_size", None),
      "n_mc": getattr(ocfg, MC_FIELD.get(config.objective) or "", None),
      "remat": bool(config.model.remat), "attention_impl": attention_impl,
      # What `attention_impl` runs on these devices inside a mesh context (`attention.choose`;
      # "auto" outside one, e.g. a program jitted without the mesh, takes XLA instead of splash).
      "attention_resolved": attention.resolve_impl(attention_impl, model_config.compute_dtype,
                                                   devices[0].platform),
      "jax": jax.__version__,
      "weight_bytes": sampling_layout.param_bytes(params),
      "resident_bytes": {"params": param_bytes, "reference": ref_bytes, "opt_state": opt_bytes,
                         "master": master_bytes, "sampling_copy": sampling_bytes},
      "programs": {}}
  resident = param_bytes + ref_bytes + opt_bytes + master_bytes
  if "update" in programs:
    jitted = train_step.jit_rl_update(graphdef, objective, ocfg, optimizer, state_shardings)
    result["programs"]["update"] = _with_peak(compiled_memory(
        jitted.lower(state, batch, per_example, scalar, scalar), rows // minibatches, tokens,
        inspect=look("update")),
        ref_bytes)
  if "prepare" in programs:
    result["programs"]["prepare"] = _with_peak(compiled_memory(
        prepare.lower(params, ref_params, full_batch, key, scalar), rows, tokens,
        inspect=look("prepare")),
        opt_bytes + master_bytes)
  if "reshard" in programs:
    result["programs"]["reshard"] = _with_peak(
        _reshard_memory(params, sampling_params,
                       functools.partial(compiled_memory, inspect=look("reshard"))), resident)
  if "sampler" in programs:
    scfg = loop.rollout_sampler_config(config)
    p = config.task.prompt_length
    ids = jax.ShapeDtypeStruct((rows, p), jnp.int32, sharding=layout.batch_sharding(2))
    mask = jax.ShapeDtypeStruct((rows, p), jnp.bool_, sharding=layout.batch_sharding(2))
    sampling_key = jax.ShapeDtypeStruct(key.shape, key.dtype,
                                        sharding=sharding.replicated(layout.mesh))
    with jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh):
      lowered = sampler_lib.generate.lower(graphdef, sampling_params, ids, mask, sampling_key, scfg)
    # The block loop's trip count is unknown to XLA (it can stop early): count every block.
    info = _with_peak(compiled_memory(lowered, rows, tokens, scfg.num_blocks,
                                            inspect=look("sampler")), resident)
    if "collective_bytes" in info:
      info["collective_bytes_per_step"] = info["collective_bytes"] // scfg.steps
    result["programs"]["sampler"] = info
  if "sft" in programs:
    sft_optimizer = ts.make_optimizer(config.sft.learning_rate,
                                      state_dtype=config.optimizer.state_dtype)
    sft_init = functools.partial(ts.init_train_state, optimizer=sft_optimizer, seed=config.seed,
                                 master_weights=config.optimizer.master_weights)
    sft_abstract, sft_shardings = train_step.state_shardings(sft_init, params, mesh)
    b = int(config.sft.batch_size)
    sft_batch = {k: jax.ShapeDtypeStruct((b, tokens), jnp.int32 if k == "sequences" else jnp.bool_,
                                         sharding=sharding.batch_sharding(mesh, 2))
                 for k in ("sequences", "attention_mask", "completion_mask")}
    jitted = sft.jit_sft_step(graphdef, sft_optimizer, sft_shardings)
    result["programs"]["sft"] = _with_peak(compiled_memory(
        jitted.lower(_abstract(sft_abstract, sft_shardings), sft_batch), b, tokens,
        inspect=look("sft")),
        opt_bytes + master_bytes)
  failed = [name for name, p in result["programs"].items() if "error" in p]
  if failed:  # the compiler ran out of device memory: no peak, does not fit
    result.update(peak_bytes=None, peak_gib=None, out_of_memory=failed)
  else:
    result["peak_bytes"] = max(p["peak"] for p in result["programs"].values())
    result["peak_gib"] = round(result["peak_bytes"] / GIB, 2)
  return result


def _reshard_memory(params, sampling_params, compiled_memory) -> dict[str, Any]:
  """The training -> sampling reshard as `jax.device_put` runs it: one program per leaf (each
  unique leaf compiled once). ``temp`` is the largest leaf's, ``output`` the copy (it stays;
  leaves whose layout does not change are not copied), ``collective_bytes`` the sum over
  leaves; ``total`` = the copy + the largest temp."""
  seen: dict[Any, dict[str, Any]] = {}
  counts: dict[Any, int] = {}
  for src, dst in zip(jax.tree.leaves(params), jax.tree.leaves(sampling_params)):
    key = (src.shape, str(src.dtype), src.sharding, dst.sharding)
    counts[key] = counts.get(key, 0) + 1
    if key not in seen and src.sharding != dst.sharding:
      program = jax.jit(lambda x: x, out_shardings=dst.sharding)
      seen[key] = compiled_memory(program.lower(src))
  output = sum(per_device_bytes(dst) for src, dst in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(sampling_params))
               if src.sharding != dst.sharding)  # an unchanged leaf is not copied
  temp = max((info["temp"] for info in seen.values()), default=0)
  return {"output": output, "temp": temp, "total": output + temp,
          "collective_bytes": sum(info["collective_bytes"] * counts[key]
                                  for key, info in seen.items()),
          "programs": len(seen)}


def _with_peak(info: dict[str, Any], resident: int) -> dict[str, Any]:
  if "error" not in info:
    info["peak"] = info["total"] + resident
  return info


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
  plan.add_argument("--programs", default="update,sampler",
                    help="comma-separated: update,prepare,sampler,reshard,sft")
  plan.add_argument("--output", default=None, help="also append the JSON line to this file")
  args = parser.parse_args(argv)
  if args.config:
    config = plan_config.load_config(args.config, args.override)
    devices, _ = plan_devices(args.topology)
    mesh_shape = dict(zip(sharding.MESH_AXES, (int(x) for x in args.mesh.split(","))))
    generation = (args.topology or "").split(":")[0]
    device_gib = None
    if generation in TPU_CHIP_GIB:
      chips = len({tuple(d.coords) for d in devices})
      device_gib = TPU_CHIP_GIB[generation] * chips / len(devices)
    result = memory_plan(config, devices, mesh_shape, tuple(args.programs.split(",")),
                         plan_config.parse_overrides(args.model),
                         device_bytes=int(device_gib * GIB) if device_gib else None)
    result.update(config=os.path.basename(args.config), overrides=args.override + args.model,
                  topology=args.topology)
    if device_gib:
      result.update(chips=chips, chip_gib=TPU_CHIP_GIB[generation], device_gib=device_gib)
      result["fits"] = (result["peak_bytes"] is not None
                        and result["peak_bytes"] <= result["device_gib"] * GIB)
    plan_config.emit(result, args.output)
    return 0
  args.objective_overrides = plan_config.parse_overrides(args.set)
  model_overrides = plan_config.parse_overrides(args.model)
  for preset in args.preset.split(","):
    for objective in args.objective.split(","):
      for n_mc in [int(x) for x in args.n_mc.split(",")]:
        print(json.dumps(measure(objective, preset, n_mc, args, model_overrides)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
