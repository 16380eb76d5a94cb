"""Step-time model of a published config on a named topology: FLOPs, HBM bytes and collective
bytes of each RL program, read from its optimized HLO, and the roofline lower bound on its time.

  python benchmarks/step_time.py --config=configs/bgpo_math.py --topology=v5p:2x2x1 \
      [--mesh=1,-1,1] [--override model.attention_impl=xla] [--output=step_time.jsonl]

The programs are compiled ahead of time exactly as `benchmarks/memory.py --config` compiles them
(abstract inputs, the TPU compiler for ``--topology``; ``--num_devices=N`` compiles for N fake
CPU devices instead, with ``--chip`` naming the chip whose constants to use). For each of
``sampler`` (one rollout call: every denoising step of every block), ``prepare`` (no-grad
scoring) and ``update`` (one optimizer update) it prints, per device:

* ``hlo``: `benchmarks/hlo_cost.py` on the optimized HLO, with the trip counts of the loops XLA
  cannot see given here: the gradient loop runs (MC samples) x (micro-batches) times, the
  sampler's block loop once per block, a parallel-decoding loop ``--steps_per_block`` times;
* ``time_s``: compute = max(HLO matmul FLOPs, analytic model FLOPs / devices) / peak, memory =
  HBM bytes / HBM bandwidth, collectives = ICI bytes / ICI bandwidth; ``bound_s`` is their
  maximum (perfect overlap: no schedule can be faster), ``serial_s`` their sum;
* per RL step: rollout (one sampler call) + prepare + ``updates_per_rollout`` updates, the
  bound's share of each, and ``mfu_bound`` = model FLOPs of the step / (chips · peak · bound),
  the best MFU the step can reach; per denoising step: the sampler's bound and ICI bytes / NFE.

Chip constants (`CHIPS`) are per chip, from the vendors' public pages; the TPU topologies that
list each chip's TensorCores as separate devices share a chip's numbers among them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory  # noqa: E402

if __name__ == "__main__":
  # Before the first backend starts (importing jax starts none): N fake CPU devices; libtpu's
  # compiler next to another process holding its lock (no TPU is touched).
  memory._force_host_devices(sys.argv[1:])  # pylint: disable=protected-access
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

import hlo_cost  # noqa: E402
import plan_config  # noqa: E402
from dmpo_jax import sharding  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.rl import registry  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float   # dense, per chip
  hbm_bytes_per_s: float
  ici_bytes_per_s: float   # bidirectional, all links of one chip
  source: str


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1200e9, 6 * 90e9,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, HBM2 1200 GB/s); ICI: 6 links x "
               "90 GB/s bidirectional, jax-ml.github.io/scaling-book/tpus"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 400e9,
                "cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 819 GB/s HBM, 400 GB/s "
                "bidirectional ICI per chip)"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 1200e9,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 2765 GB/s HBM, 1200 GB/s "
                "bidirectional ICI per chip)"),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3.35e12, 900e9,
                 "nvidia.com/en-us/data-center/h100 datasheet (989 TFLOP/s dense bf16, 3.35 TB/s "
                 "HBM3, 900 GB/s NVLink)"),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 4.8e12, 900e9,
                 "nvidia.com/en-us/data-center/h200 datasheet (989 TFLOP/s dense bf16, 4.8 TB/s "
                 "HBM3e, 900 GB/s NVLink)"),
}


def unknown_trip_counts(config, ocfg, steps_per_block: int | None) -> dict[str, list[int]]:
  """Per program, the trip counts of the loops XLA cannot count, outermost first: the gradient
  loop ((MC samples) x (micro-batches), `grad.accumulate_gradients`), the sampler's block loop
  (`sampler._generate`; unrolled with the prefix cache) and its parallel-decoding loop."""
  _, with_grad = memory.gradient_step_passes(config.objective, ocfg)
  batch = config.prompts_per_step * config.group_size // config.minibatches_per_rollout
  micro = getattr(ocfg, "micro_batch_size", None)
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  scfg = loop.rollout_sampler_config(config)
  sampler_loops = [] if scfg.cache == "prefix" else [scfg.num_blocks]
  if scfg.parallel:
    sampler_loops.append(steps_per_block or scfg.block_length)
  return {"update": [with_grad * (batch // micro if micro else 1)], "prepare": [],
          "sampler": sampler_loops}


def denoising_steps(scfg, steps_per_block: int | None) -> int:
  """Forward passes of one rollout call (no early stop)."""
  if scfg.parallel:
    return scfg.num_blocks * (steps_per_block or scfg.block_length)
  return scfg.steps


def model_flops(config, model_config, ocfg, scfg, steps_per_block) -> dict[str, float | None]:
  """Analytic FLOPs of each program over all devices (`ModelConfig.flops_per_token`): the
  update's forward + backward passes, the sampler's denoising forwards; prepare: None (its HLO
  FLOPs are used: forward passes only, nothing recomputed)."""
  batch = config.prompts_per_step * config.group_size
  seq = config.task.prompt_length + config.rollout.gen_length
  update = memory.step_model_flops(model_config, config.objective, ocfg,
                                   batch // config.minibatches_per_rollout, seq)
  sampler = sampler_model_flops(model_config, scfg, batch, config.task.prompt_length,
                                steps_per_block)
  return {"update": update, "sampler": sampler, "prepare": None}


def sampler_model_flops(model_config, scfg, batch: int, prompt_length: int,
                        steps_per_block: int | None) -> float:
  """FLOPs of one rollout call: per forward pass, every query token costs the blocks' matmuls
  and attention over the canvas (`ModelConfig.flops_per_token` without the output head), and
  the head runs on the block's positions only (`sampler._generate`). Query tokens per pass: the
  canvas (no cache, and every block's first pass), the block and what follows it (prefix
  cache), the block (dual cache). CFG doubles the rows."""
  total = prompt_length + scfg.gen_length
  head = 2.0 * model_config.d_model * model_config.vocab_size
  body = model_config.flops_per_token(total) - head
  rows = batch * (2 if scfg.cfg_scale > 0 else 1)
  k = scfg.block_length
  per_block = (steps_per_block or k) if scfg.parallel else scfg.steps_per_block
  query = 0
  for b in range(scfg.num_blocks):
    later = {"prefix": total - (prompt_length + b * k), "dual": k}.get(scfg.cache, total)
    query += total + (per_block - 1) * later
  return float(rows * (query * body + scfg.num_blocks * per_block * k * head))


def roofline(hlo: dict, flops_all_devices: float | None, devices: int, chip: Chip,
             devices_per_chip: float) -> dict[str, float]:
  """Per-device time terms (seconds) and their max / sum (module docstring)."""
  peak = chip.peak_bf16_flops / devices_per_chip
  flops = max(hlo["flops"], (flops_all_devices or 0.0) / devices)
  terms = {"compute": flops / peak,
           "hbm": hlo["hbm_bytes"] / (chip.hbm_bytes_per_s / devices_per_chip),
           "ici": hlo["ici_bytes"] / (chip.ici_bytes_per_s / devices_per_chip)}
  return {**{f"{k}_s": v for k, v in terms.items()}, "bound_s": max(terms.values()),
          "serial_s": sum(terms.values()), "limited_by": max(terms, key=terms.get)}


def step_time(config, devices, mesh_shape, chip: Chip, programs, steps_per_block=None,
              model_overrides=None, hlo_dir=None, hlo_prefix="program") -> dict[str, Any]:
  objective = registry.get_objective(config.objective)
  trips = unknown_trip_counts(config, objective.make_config(config.get(config.objective, {})),
                              steps_per_block)

  def inspect(name, compiled):
    text = compiled.as_text()
    if hlo_dir:  # kept, so the analysis can be rerun without compiling (`hlo_cost.py FILE N TRIPS`)
      os.makedirs(hlo_dir, exist_ok=True)
      with gzip.open(os.path.join(hlo_dir, f"{hlo_prefix}_{name}.hlo.gz"), "wt") as f:
        f.write(text)
    try:
      return {"hlo": hlo_cost.module_cost(text, len(devices), trips[name])}
    except hlo_cost.UnknownTripCount as e:
      return {"hlo_error": str(e)}

  plan = memory.memory_plan(config, devices, mesh_shape, tuple(programs), model_overrides,
                            inspect=inspect)
  chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
  return summarize(plan, config, chip, chips, steps_per_block)


def summarize(plan: dict, config, chip: Chip, chips: int, steps_per_block=None) -> dict:
  """Adds the roofline times of every program with an ``hlo`` cost, and the per-step totals."""
  objective = registry.get_objective(config.objective)
  ocfg = objective.make_config(config.get(config.objective, {}))
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  scfg = loop.rollout_sampler_config(config)
  devices = plan["num_devices"]
  dtype_overrides = {k: config.model[k] for k in ("dtype", "param_dtype") if config.model[k]}
  model_config = get_preset(config.model.preset, **dtype_overrides)
  analytic = model_flops(config, model_config, ocfg, scfg, steps_per_block)
  repeats = {"sampler": 1, "prepare": 1, "update": config.updates_per_rollout}
  step = {"bound_s": 0.0, "serial_s": 0.0, "model_flops": 0.0}
  for name, info in plan["programs"].items():
    if "hlo" not in info:
      continue  # the compiler refused it (out of memory), or a loop had no trip count
    flops = analytic[name]
    info["model_flops"] = flops if flops is not None else info["hlo"]["flops"] * devices
    info["time"] = roofline(info["hlo"], flops, devices, chip, devices / chips)
    step[f"{name}_s"] = repeats[name] * info["time"]["bound_s"]
    step["bound_s"] += repeats[name] * info["time"]["bound_s"]
    step["serial_s"] += repeats[name] * info["time"]["serial_s"]
    step["model_flops"] += repeats[name] * info["model_flops"]
  if step["bound_s"]:
    step["mfu_bound"] = step["model_flops"] / (step["bound_s"] * chips * chip.peak_bf16_flops)
    step["mfu_serial"] = step["model_flops"] / (step["serial_s"] * chips * chip.peak_bf16_flops)
  if "sampler" in plan["programs"] and "time" in plan["programs"]["sampler"]:
    nfe = denoising_steps(scfg, steps_per_block)
    sampler = plan["programs"]["sampler"]
    step["denoising_steps"] = nfe
    step["per_denoising_step"] = {"bound_s": sampler["time"]["bound_s"] / nfe,
                                  "ici_bytes": sampler["hlo"]["ici_bytes"] / nfe}
  plan.update(chip=dataclasses.asdict(chip), chips=chips, updates_per_rollout=repeats["update"],
              unknown_trip_counts=unknown_trip_counts(config, ocfg, steps_per_block), step=step)
  return plan


def reanalyze(path: str, hlo_dir: str) -> list[dict]:
  """The runs of a JSONL file recomputed from their HLO files in ``hlo_dir`` (no compile)."""
  out = []
  with open(path, encoding="utf-8") as f:
    runs = [json.loads(line) for line in f if line.strip()]
  for run in runs:
    if "error" in run:
      out.append(run)
      continue
    config = memory.load_config(os.path.join("configs", run["config"]), run["overrides"])
    objective = registry.get_objective(config.objective)
    trips = unknown_trip_counts(config, objective.make_config(config.get(config.objective, {})),
                                run.get("steps_per_block"))
    prefix = f"{run['config'].removesuffix('.py')}_{run['topology']}".replace(":", "_")
    for name, info in run["programs"].items():
      file = os.path.join(hlo_dir, f"{prefix}_{name}.hlo.gz")
      if os.path.exists(file):
        with gzip.open(file, "rt", encoding="utf-8") as g:
          info["hlo"] = hlo_cost.module_cost(g.read(), run["num_devices"], trips[name])
    chip = Chip(**run["chip"])
    out.append(summarize(run, config, chip, run["chips"], run.get("steps_per_block")))
  return out


# The `docs/performance.md` §2 table: published configs x topologies (`--sweep`), a process per run.
SWEEP_CONFIGS = ("configs/bgpo_math.py", "configs/dmpo_gsm8k.py")
SWEEP_TOPOLOGIES = {"v5p:2x2x1": "v5p-8", "v5p:2x2x4": "v5p-32", "v4:2x2x4": "v4-32"}


def sweep(output: str, overrides: list[str], hlo_dir: str | None = None) -> None:
  """Runs every (config, topology) of the `docs/performance.md` §2 table; appends to ``output``."""
  import subprocess  # pylint: disable=import-outside-toplevel
  for topology in SWEEP_TOPOLOGIES:
    for config in SWEEP_CONFIGS:
      command = [sys.executable, os.path.abspath(__file__), f"--config={config}",
                 f"--topology={topology}", f"--output={output}",
                 *[f"--override={o}" for o in overrides],
                 *([f"--hlo_dir={hlo_dir}"] if hlo_dir else [])]
      print(" ".join(command[1:]), file=sys.stderr, flush=True)
      result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, check=False,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      if result.returncode:  # e.g. a compiler crash: recorded, the sweep goes on
        reason = next((line for line in reversed(result.stderr.splitlines())
                       if "Check failed" in line or "Error" in line), result.stderr[-300:])
        with open(output, "a", encoding="utf-8") as f:
          f.write(json.dumps({"config": os.path.basename(config), "topology": topology,
                              "overrides": overrides, "exit_code": result.returncode,
                              "error": reason.strip()[:500]}) + "\n")


def table(path: str) -> str:
  """Markdown rows (config, topology, rollout / prepare / update / step seconds, MFU bound,
  limiting term per program) from a JSONL file of runs."""
  rows = ["| config | topology (chips) | attention | rollout s | denoising step s (ICI GB / device) "
          "| prepare s | update s (x per step) | RL step s: bound | no overlap | MFU bound "
          "| MFU no overlap | limited by (rollout / prepare / update) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  with open(path, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      name = SWEEP_TOPOLOGIES.get(r["topology"], r["topology"])
      if "error" in r:
        rows.append(f"| {r['config'].removesuffix('.py')} | {name} `{r['topology']}` | "
                    f"compile failed: {r['error'][:120]} ||||||||||")
        continue
      step, programs = r["step"], r["programs"]
      limits = " / ".join(programs[p]["time"]["limited_by"] if "time" in programs.get(p, {})
                          else "-" for p in ("sampler", "prepare", "update"))
      attention = r.get("attention_impl", "-")
      if r.get("attention_resolved", attention) != attention:
        attention += f" ({r['attention_resolved']} in the update)"
      per_step = step.get("per_denoising_step")
      denoise = (f"{per_step['bound_s']:.3f} ({per_step['ici_bytes'] / 1e9:.1f})" if per_step
                 else "-")
      fmt = lambda key: f"{step[key]:.1f}" if key in step else "-"  # noqa: E731
      rows.append(
          f"| {r['config'].removesuffix('.py')} | {name} `{r['topology']}` ({r['chips']}) | "
          f"{attention} | {fmt('sampler_s')} | {denoise} | {fmt('prepare_s')} | "
          f"{fmt('update_s')} "
          f"(x{r['updates_per_rollout']}) | {step['bound_s']:.1f} | {step['serial_s']:.1f} | "
          f"{100 * step.get('mfu_bound', 0):.1f} % | {100 * step.get('mfu_serial', 0):.1f} % | "
          f"{limits} |")
  return "\n".join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=None, help="configs/*.py file")
  parser.add_argument("--sweep", action="store_true",
                      help=f"run {SWEEP_CONFIGS} on {tuple(SWEEP_TOPOLOGIES)} into --output")
  parser.add_argument("--table", default=None, help="print the markdown table of a JSONL file")
  parser.add_argument("--reanalyze", default=None,
                      help="recompute the runs of a JSONL file from --hlo_dir (no compile); "
                           "writes them to --output")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="dotted config override (JSON value), repeatable")
  parser.add_argument("--topology", default=None, help="TPU topology, e.g. v5p:2x2x1 (libtpu)")
  parser.add_argument("--num_devices", type=int, default=1, help="fake CPU devices instead")
  parser.add_argument("--chip", default=None, choices=sorted(CHIPS),
                      help="chip constants (default: the topology's generation)")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1 = the rest)")
  parser.add_argument("--programs", default="sampler,prepare,update")
  parser.add_argument("--steps_per_block", type=int, default=None,
                      help="parallel decoding: forward passes per block (default block_length)")
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  parser.add_argument("--hlo_dir", default=None, help="also write each program's HLO (.hlo.gz)")
  args = parser.parse_args(argv)
  if args.table:
    print(table(args.table))
    return 0
  if args.reanalyze:
    if not (args.hlo_dir and args.output):
      parser.error("--reanalyze needs --hlo_dir (the HLO files) and --output (a new JSONL file)")
    with open(args.output, "w", encoding="utf-8") as f:
      for run in reanalyze(args.reanalyze, args.hlo_dir):
        f.write(json.dumps(run) + "\n")
    print(table(args.output))
    return 0
  if args.sweep:
    if not args.output:
      parser.error("--sweep needs --output (the JSONL file the runs append to)")
    sweep(args.output, args.override, args.hlo_dir)
    print(table(args.output))
    return 0
  if not args.config:
    parser.error("give --config (or --sweep / --table)")
  chip_name = args.chip or (args.topology or "").split(":")[0]
  if chip_name not in CHIPS:
    parser.error(f"--chip: give one of {sorted(CHIPS)} (no TPU generation in --topology)")
  config = memory.load_config(args.config, args.override)
  if not config.model.checkpoint:
    config.model.init = "random"  # only compiled: no weights are loaded or allocated
  devices, _ = memory.plan_devices(args.topology)
  mesh_shape = dict(zip(sharding.MESH_AXES, (int(x) for x in args.mesh.split(","))))
  prefix = f"{os.path.basename(args.config).removesuffix('.py')}_{args.topology or args.num_devices}"
  result = step_time(config, devices, mesh_shape, CHIPS[chip_name], args.programs.split(","),
                     args.steps_per_block, hlo_dir=args.hlo_dir,
                     hlo_prefix=prefix.replace(":", "_"))
  result.update(config=os.path.basename(args.config), topology=args.topology,
                overrides=args.override, steps_per_block=args.steps_per_block, command="python benchmarks/step_time.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]))
  plan_config.emit(result, args.output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
