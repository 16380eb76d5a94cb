"""The RL training loop (`docs/architecture.md` §2, §3, §8; `docs/checkpoints.md` §2).

One RL step:
  prompts (grain, G per prompt) → rollout on the policy resharded once for sampling
  (`sampling_layout`) → decode → rewards in worker processes → ``objective.prepare``
  (advantages / weights, old and reference ELBO terms on shared masks; no grad) →
  ``updates_per_rollout`` jitted train steps (``objective.grads`` + AdamW) → metrics →
  checkpoint.

Everything jitted is a pure function of explicit pytrees: `TrainState` (params, optimizer
state, step, RNG), the batch and the prepared per-example arrays. The train step is compiled
ahead of time at start-up and its `memory_analysis` is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import signal
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dmpo_jax import (checkpointing, cli, interrupts, metrics as metrics_lib, profiling,
                      sampling_layout, sharding)
from dmpo_jax import workdir as workdir_lib
from dmpo_jax.diffusion import sampler as sampler_lib
from dmpo_jax.models import attention, config as model_config_lib, hf_io, lora
from dmpo_jax.models import tokenizer as tokenizer_lib
from dmpo_jax.models.transformer import create_model
from dmpo_jax.rl import config_checks, data_checks, final_model, registry, rollout, run_start, sft
from dmpo_jax.rl import step_io, train_state as ts, train_step
from dmpo_jax.tasks import base as task_base, pipeline, reward_pool as reward_pool_lib
from dmpo_jax.tasks import digit_sort

_log = logging.getLogger("dmpo_jax.train")


class ConfigError(cli.UserError, ValueError):
  """A training config that cannot run (the message names the key and the problem)."""


# The workdir holds a run this config cannot continue (`run_start.plan`).
WorkdirError = run_start.WorkdirError


# ------------------------------------------------------------------------------------------------
# Config validation and model loading
# ------------------------------------------------------------------------------------------------

MODEL_INIT = ("auto", "random")
RANDOM_INIT_PRESETS = ("tiny",)  # presets `model.init=auto` may randomly initialise
INF = float("inf")

# Every numeric field of `configs/base.py` outside the objective blocks (which their own config
# classes validate): (type, lowest, highest); -1 in a mesh axis means "the remaining devices".
NUMERIC_FIELDS: dict[str, tuple[type, float, float]] = {
    "seed": (int, 0, INF),
    "num_steps": (int, 1, INF),
    "updates_per_rollout": (int, 1, INF),
    "minibatches_per_rollout": (int, 1, INF),
    "prompts_per_step": (int, 1, INF),
    "group_size": (int, 1, INF),
    "model.lora_rank": (int, 0, INF),
    "model.lora_alpha": (float, 0, INF),
    "task.prompt_length": (int, 1, INF),
    "task.reward_workers": (int, 0, INF),
    "task.reward_timeout_s": (float, 0, INF),    # 0: the task's default wall limit
    "task.max_truncated_fraction": (float, 0, 1),
    "sandbox.cpu_time_s": (int, 1, INF),
    "sandbox.wall_time_s": (float, 0, INF),      # > 0, checked by SandboxConfig
    "sandbox.memory_bytes": (int, 64 << 20, INF),
    "rollout.gen_length": (int, 1, INF),
    "rollout.block_length": (int, 1, INF),
    "rollout.steps": (int, 1, INF),
    "rollout.temperature": (float, 0, INF),
    "rollout.cfg_scale": (float, 0, INF),
    "rollout.threshold": (float, -INF, 1),       # <= 0: off
    "rollout.factor": (float, -INF, INF),         # <= 0: off
    "rollout.max_tokens_per_step": (int, -INF, INF),  # <= 0: no cap
    "optimizer.learning_rate": (float, 0, INF),  # > 0, checked below
    "optimizer.weight_decay": (float, 0, INF),
    "optimizer.b1": (float, 0, 1),
    "optimizer.b2": (float, 0, 1),
    "optimizer.max_grad_norm": (float, 0, INF),  # 0: no clipping
    "optimizer.warmup_steps": (int, 0, INF),
    "sft.num_steps": (int, 0, INF),
    "sft.batch_size": (int, 1, INF),
    "sft.learning_rate": (float, 0, INF),        # > 0, checked below
    "sft.ascending_fraction": (float, 0, 1),
    "mesh.data": (int, -1, INF),
    "mesh.fsdp": (int, -1, INF),
    "mesh.tensor": (int, -1, INF),
    "mesh.sampling_tensor": (int, 0, INF),       # 0: auto (`sampling_layout.choose_tensor`)
    "eval.every_steps": (int, 0, INF),           # 0: no evaluation during RL
    "eval.num_examples": (int, 1, INF),
    "eval.gen_length": (int, 1, INF),
    "eval.block_length": (int, 1, INF),
    "eval.steps": (int, 1, INF),
    "eval.batch_size": (int, 1, INF),
    "checkpoint.every_steps": (int, 1, INF),
    "checkpoint.max_to_keep": (int, 1, INF),
    "log_every_steps": (int, 1, INF),
    "log_every_seconds": (float, 0, INF),
}


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def numeric_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Type, finiteness and range of every field in `NUMERIC_FIELDS` (a missing field is skipped:
  configs written before the field existed keep working)."""
  errors = []
  for key, (kind, low, high) in NUMERIC_FIELDS.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      continue
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
      ok_type = ok_type and float(value).is_integer()
    if not ok_type:
      errors.append(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}")
    elif not math.isfinite(value):
      errors.append(f"{key}={value} must be finite")
    elif not low <= value <= high:
      bound = f">= {low}" if high == INF else f"in [{low}, {high}]"
      errors.append(f"{key}={value} must be {bound}")
  for key in ("optimizer.learning_rate", "sft.learning_rate"):
    value = _get(config, key)
    if isinstance(value, (int, float)) and value == 0:
      errors.append(f"{key}=0 must be > 0")
  for axis in sharding.MESH_AXES:
    if config.mesh[axis] == 0:
      errors.append(f"mesh.{axis}=0 must be >= 1 or -1 (the remaining devices)")
  return errors


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Checks everything that can be checked before any work; raises `ConfigError` (one line
  naming every bad key)."""
  errors = numeric_errors(config)
  if errors:  # the checks below assume sane numbers
    raise ConfigError("invalid config: " + "; ".join(errors))
  if config.objective not in registry.objective_names():
    errors.append(f"objective={config.objective!r} is unknown; known {list(registry.objective_names())}")
  else:
    objective = registry.get_objective(config.objective)
    try:
      ocfg = objective.make_config(config.get(config.objective, {}))
      limit = objective.max_updates_per_rollout(ocfg)
      if limit is not None and config.updates_per_rollout > limit:
        errors.append(f"updates_per_rollout={config.updates_per_rollout} exceeds {limit}, the most "
                      f"{config.objective!r} supports with this config")
    except ValueError as e:
      errors.append(f"{config.objective}: {e}")
    if objective.uses_group_statistics and config.group_size < 2:
      errors.append(f"group_size={config.group_size} must be >= 2: {config.objective!r} normalises "
                    "rewards over the completions of a prompt")
  if config.task.name not in task_base.task_names():
    errors.append(f"task.name={config.task.name!r} is unknown; known {task_base.task_names()}")
  else:
    try:
      task_base.check_eval_style(config.eval.get("style", "fixed"), config.task.name)
    except ValueError as e:
      errors.append(f"eval.style: {e}")
    errors += reward_pool_lib.config_errors(config)
  for block, prefix in ((config.rollout, "rollout"), (config.eval, "eval")):
    gen, blk, steps = block.gen_length, block.block_length, block.steps
    if gen % blk:
      errors.append(f"{prefix}.gen_length={gen} is not a multiple of {prefix}.block_length={blk}")
    elif steps % (gen // blk):
      errors.append(f"{prefix}.steps={steps} is not a multiple of the number of blocks {gen // blk}")
    elif prefix == "rollout":
      try:
        rollout.sampler_config(block)
      except ValueError as e:
        errors.append(f"rollout: {e}")
  if config.prompts_per_step % config.minibatches_per_rollout:
    errors.append(f"prompts_per_step={config.prompts_per_step} is not divisible by "
                  f"minibatches_per_rollout={config.minibatches_per_rollout} (mini-batches hold "
                  "whole groups)")
  reference_micro = config[config.objective].get("reference_micro_batch_size") if (
      config.objective in config) else None
  update_batch = (config.prompts_per_step * config.group_size
                  // max(config.minibatches_per_rollout, 1))
  if reference_micro and update_batch % reference_micro:
    errors.append(f"{config.objective}.reference_micro_batch_size={reference_micro} does not divide "
                  f"the update batch prompts_per_step*group_size/minibatches_per_rollout="
                  f"{update_batch}")
  errors += _model_errors(config.model)
  errors += config_checks.errors(config)
  for name in ("dtype", "param_dtype"):
    if config.model[name] not in ("",) + model_config_lib.DTYPES:
      errors.append(f"model.{name}: must be '' (the preset's / checkpoint's) or one of "
                    f"{model_config_lib.DTYPES}, got {config.model[name]!r}")
  if config.model.get("attention_impl", "auto") not in model_config_lib.ATTENTION_IMPLS:
    errors.append(f"model.attention_impl: must be one of {model_config_lib.ATTENTION_IMPLS}, got "
                  f"{config.model.attention_impl!r}")
  if config.optimizer.state_dtype not in ts.STATE_DTYPES:
    errors.append(f"optimizer.state_dtype: must be one of {ts.STATE_DTYPES}, got "
                  f"{config.optimizer.state_dtype!r}")
  if not isinstance(config.optimizer.master_weights, bool):
    errors.append(f"optimizer.master_weights: must be true or false, got "
                  f"{config.optimizer.master_weights!r}")
  errors += profiling.config_errors(config.get("profile_steps", ""), config.num_steps)
  if jax.process_count() > 1 and config.sft.num_steps and config.sft.batch_size % jax.process_count():
    errors.append(f"sft.batch_size={config.sft.batch_size} is not divisible by the "
                  f"{jax.process_count()} processes")
  if num_devices is not None and not errors:
    try:
      mesh_shape = _mesh_shape(config, num_devices)
      divisor = mesh_shape["data"] * mesh_shape["fsdp"]
      batch = config.prompts_per_step * config.group_size // max(config.minibatches_per_rollout, 1)
      if batch % divisor:
        errors.append(f"the update batch prompts_per_step*group_size/minibatches_per_rollout={batch} "
                      f"is not divisible by the batch mesh axes data*fsdp={divisor}")
      if jax.process_count() > 1 and config.eval.batch_size % jax.process_count():
        errors.append(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
      if config.eval.batch_size % divisor:
        errors.append(f"eval.batch_size={config.eval.batch_size} is not divisible by data*fsdp={divisor}")
    except ValueError as e:
      errors.append(f"mesh: {e}")
  if errors:
    raise ConfigError("invalid config: " + "; ".join(errors))


def _model_errors(model) -> list[str]:
  """Where the weights come from: a checkpoint, or random weights only when asked for."""
  init = model.get("init", "auto")
  if init not in MODEL_INIT:
    return [f"model.init={init!r} must be one of {MODEL_INIT}"]
  if model.checkpoint:
    if init == "random":
      return [f"model.init='random' contradicts model.checkpoint={model.checkpoint!r}: give one"]
    problem = cli.model_folder_problem(model.checkpoint)
    return [f"model.checkpoint={problem}"] if problem else []
  if model.preset not in model_config_lib.PRESET_NAMES:
    return [f"model.preset={model.preset!r} is unknown; known {model_config_lib.PRESET_NAMES}"]
  if init == "auto" and model.preset not in RANDOM_INIT_PRESETS:
    return [f"model.checkpoint is not set: give the {model.preset} weights with "
            "--config.model.checkpoint=/path/to/the/model (an HF folder or a trained checkpoint), "
            "or pass --config.model.init=random to train a randomly initialised "
            f"{model.preset} on purpose"]
  return []


def rollout_share(times: dict[str, float]) -> float:
  """Fraction of the RL step (rollout + reward + prepare + update, evaluation excluded) spent
  sampling."""
  step = sum(times.get(f"time/{phase}", 0.0) for phase in ("rollout", "reward", "prepare", "update"))
  return times.get("time/rollout", 0.0) / step if step > 0 else 0.0


def _mesh_shape(config, num_devices: int) -> dict[str, int]:
  """``config.mesh`` resolved against the device count (-1 fills the rest)."""
  shape = {a: int(config.mesh[a]) for a in sharding.MESH_AXES}
  return dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(shape, num_devices)))


def rl_optimizer(config):
  """The RL optimizer of ``config.optimizer`` (AdamW, clipping, schedule over all updates)."""
  return ts.make_optimizer(
      config.optimizer.learning_rate, weight_decay=config.optimizer.weight_decay,
      b1=config.optimizer.b1, b2=config.optimizer.b2, max_grad_norm=config.optimizer.max_grad_norm,
      warmup_steps=config.optimizer.warmup_steps,
      total_steps=config.num_steps * config.updates_per_rollout,
      schedule=config.optimizer.schedule, state_dtype=config.optimizer.state_dtype)


def rollout_sampler_config(config) -> sampler_lib.SamplerConfig:
  """The rollout sampler settings of ``config.rollout`` (`rollout.sampler_config`)."""
  return rollout.sampler_config(config.rollout)


def abstract_rollout_batch(config, mesh, minibatches: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes/shardings of the RL batch of one step (prompts_per_step × group_size rows of
  prompt_length + gen_length tokens), or of one of its ``minibatches``, split over the batch
  mesh axes (for ahead-of-time compilation)."""
  b = config.prompts_per_step * config.group_size // minibatches
  t = config.task.prompt_length + config.rollout.gen_length
  spec = {"sequences": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.bool_),
          "prompt_mask": ((b, t), jnp.bool_), "completion_mask": ((b, t), jnp.bool_),
          "rewards": ((b,), jnp.float32), "group_ids": ((b,), jnp.int32),
          "example_ids": ((b,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in spec.items()}


def load_model_and_tokenizer(config, mesh):
  """The model (sharded on ``mesh``) and tokenizer named by ``config.model`` / ``config.tokenizer``."""
  overrides = {"remat": bool(config.model.remat),
               "use_key_padding_mask": bool(config.model.use_key_padding_mask),
               "attention_impl": config.model.get("attention_impl", "auto")}
  if config.model.dtype:
    overrides["dtype"] = config.model.dtype
  path = config.model.checkpoint
  if path and (pathlib.Path(path) / "config.json").is_file():
    model, _ = hf_io.load_pretrained(path, mesh=mesh, param_dtype=config.model.param_dtype or None,
                                     **overrides)
  elif path:
    model = checkpointing.load_model_checkpoint(path, mesh=mesh)
    model = _with_config(model, model.config.replace(**overrides))
  else:
    preset_overrides = dict(overrides)
    if config.model.param_dtype:
      preset_overrides["param_dtype"] = config.model.param_dtype
    model = create_model(model_config_lib.get_preset(config.model.preset, **preset_overrides),
                         seed=config.seed)
  tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer or path, family=model.config.family)
  return model, tokenizer


def _with_config(model, new_config):
  """The same parameters under a config that differs only in compute options."""
  _, state = nnx.split(model)
  fresh = nnx.eval_shape(lambda: create_model(new_config))
  new_graphdef, _ = nnx.split(fresh)
  return nnx.merge(new_graphdef, state)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
  """Holds the compiled functions and the run's state; `run` is the loop."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  # `run_start.FRESH` or `run_start.RESUME` (`run_start.plan`, under the workdir's lock).
  start: str = run_start.FRESH
  # Damaged latest checkpoint: resume from the newest intact one instead of failing.
  fallback_to_previous_checkpoint: bool = False

  def __post_init__(self):
    config = self.config
    self.workdir = pathlib.Path(self.workdir)
    validate_config(config, jax.device_count())
    self.task = task_base.get_task(config.task.name)
    reward_pool_lib.configure_task(self.task, config)  # code tasks: config.sandbox
    with cli.user_input(f"task {config.task.name} data"):  # before the (slow) model load
      self.data = self.load_data()
    cli.check(len(self.data[0]) > 0 and len(self.data[2]) > 0,
              f"task {config.task.name}: no training or no held-out examples (task.train_source="
              f"{config.task.train_source!r}, task.eval_source={config.task.eval_source!r})")
    self.mesh = sharding.create_mesh(_mesh_shape(config, jax.device_count()))
    with cli.user_input(f"model {config.model.checkpoint or config.model.preset}"):
      self.model, self.tokenizer = load_model_and_tokenizer(config, self.mesh)
    self.data_report = data_checks.check_truncation(  # before anything is compiled or written
        self.tokenizer, self.task, self.data[0], self.data[2], config.task.prompt_length,
        config.task.get("max_truncated_fraction", 0.05))
    model_config = self.model.config
    problem = attention.platform_error(model_config.attention_impl, jax.default_backend(),
                                       model_config.compute_dtype)
    cli.check(problem is None, f"model.attention_impl: {problem}")
    if config.model.lora_rank:
      self.model = lora.add_adapters(self.model, rank=config.model.lora_rank,
                                     alpha=config.model.lora_alpha,
                                     targets=tuple(config.model.lora_targets), seed=config.seed)
    self.graphdef, params = nnx.split(self.model)
    self.model_config, self.model = self.model.config, None  # its arrays are donated below
    self.param_shardings = sharding.state_shardings(params, self.mesh)
    params = jax.device_put(params, self.param_shardings)
    self.objective = registry.get_objective(config.objective)
    self.objective_config = self.objective.make_config(config.get(config.objective, {}))
    self.optimizer = rl_optimizer(config)
    # Optimizer moments (and master weights) sharded like the parameters (explicit: XLA would
    # replicate the zeros that initialise them).
    init = functools.partial(ts.init_train_state, optimizer=self.optimizer, seed=config.seed,
                             master_weights=config.optimizer.master_weights)
    _, self.state_shardings = train_step.state_shardings(init, params, self.mesh)
    # The parameters are donated: the state's params reuse their buffers (no second copy).
    self.state = jax.jit(init, out_shardings=self.state_shardings, donate_argnums=0)(params)
    # Resident while sampling: the train state and (full fine-tuning) the reference copy, which
    # has the parameters' shapes and shardings.
    self.sampling = sampling_layout.layout_for_training(
        self.mesh, self.model_config, int(config.mesh.get("sampling_tensor", 0)),
        self.state.params,
        (self.state,) if config.model.lora_rank else (self.state, self.state.params))
    self.rollout_config = rollout_sampler_config(config)
    self.eval_config = sampler_lib.SamplerConfig(
        gen_length=config.eval.gen_length, steps=config.eval.steps,
        block_length=config.eval.block_length, temperature=0.0, remasking="low_confidence",
        batch_invariant=True)
    self.prompt_length = config.task.prompt_length
    self._train_step = None  # compiled ahead of time in `compile_steps`
    self._prepare = None

  # -- data -------------------------------------------------------------------------------------
  def load_data(self):
    c, task = self.config, self.task
    if task.name == digit_sort.DigitSortTask.name:
      train = task.load_train(c.task.train_source or None, seed=c.seed)
      warmup = task.load_train(None, seed=c.seed + 1,
                               ascending_fraction=c.sft.ascending_fraction) if c.sft.num_steps else []
      held_out = task.load_eval(c.task.eval_source or None, num_examples=c.eval.num_examples,
                                seed=c.seed)
    else:
      train = task.load_train(c.task.train_source or None)
      held_out = task.load_eval(c.task.eval_source or None)
      warmup = train if c.sft.num_steps else []
    held_out = data_checks.distinct_held_out(task, train, held_out)[0][: c.eval.num_examples]
    return train, warmup, held_out

  def make_iterator(self, train):
    cfg = pipeline.PipelineConfig(prompts_per_batch=self.config.prompts_per_step,
                                  group_size=self.config.group_size, seed=self.config.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return pipeline.make_iterator(train, cfg)

  # -- sampling and evaluation -----------------------------------------------------------------
  def sample(self, sampling_params, prompt_ids, prompt_mask, key, sampler_config):
    """Samples from this process's prompts with ``sampling_params`` (from
    `sampling_layout.reshard`, freed after); returns the global (sequences [B, P + L], prompt
    mask [B, P]) on the devices, split over the batch axes."""
    put = self.put_batch({"ids": prompt_ids, "mask": prompt_mask})
    out = sampling_layout.generate(self.sampling, self.graphdef, sampling_params, put["ids"],
                                   put["mask"], key, sampler_config)
    # Back on the training mesh's batch split (token ids only), where the RL step reads them.
    return jax.device_put(out.sequences, sharding.batch_sharding(self.mesh, 2)), put["mask"]

  def evaluate(self, params, examples) -> dict[str, float]:
    """Greedy held-out accuracy (%) with the eval sampler; pads the last batch."""
    params = sampling_layout.reshard(params, self.sampling)  # once for every eval batch
    bs = self.config.eval.batch_size
    completions = []
    for start in range(0, len(examples), bs):
      chunk = examples[start:start + bs]
      padded = chunk + [chunk[-1]] * (bs - len(chunk))
      ids, mask, _ = rollout.encode_prompts(self.tokenizer, self.task, padded,
                                            prompt_length=self.prompt_length, evaluation=True)
      share = bs // jax.process_count()  # each process feeds its rows of the batch
      mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
      # The sampling layout's mesh is in scope inside `sample`: rows stay split over devices.
      seqs = step_io.fetch_all_rows(self.sample(params, ids[mine], mask[mine], jax.random.key(0),
                                                self.eval_config)[0])
      completions += rollout.decode_completions(self.tokenizer, seqs, self.prompt_length)[:len(chunk)]
    style = self.config.eval.get("style", task_base.DEFAULT_EVAL_STYLE)
    scores = self.task.score_many(completions, examples,
                                  **({"eval_style": style} if style != "fixed" else {}))
    summary = self.task.summarize(scores)
    return {"eval/accuracy": float(summary["accuracy"])}

  # -- warm-up ----------------------------------------------------------------------------------
  def warmup(self, examples, bar_enabled: bool):
    """Masked-diffusion SFT on demonstrations (``config.sft``), before RL."""
    c = self.config
    optimizer = ts.make_optimizer(c.sft.learning_rate, max_grad_norm=c.optimizer.max_grad_norm,
                                  state_dtype=c.optimizer.state_dtype)
    init = functools.partial(ts.init_train_state, optimizer=optimizer, seed=c.seed + 1,
                             master_weights=c.optimizer.master_weights)
    # Fixed state shardings (the parameters' FSDP layout, moments split like them), so the RL
    # step accepts the result.
    _, shardings = train_step.state_shardings(init, self.state.params, self.mesh)
    # Donated: the warm-up state takes over the parameters' buffers; self.state gets them back
    # (trained) at the end.
    state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(self.state.params)
    step_fn = sft.jit_sft_step(self.graphdef, optimizer, shardings)
    rng = np.random.default_rng(c.seed)
    progress = metrics_lib.ProgressBar(c.sft.num_steps, desc="sft warm-up",
                                       disable=None if bar_enabled else True,
                                       process_index=jax.process_index(),
                                       log_every_steps=max(c.log_every_steps, c.sft.num_steps // 10),
                                       log_every_seconds=c.log_every_seconds)
    loss = float("nan")
    share = c.sft.batch_size // jax.process_count()  # each process feeds its rows of the batch
    for step in range(c.sft.num_steps):
      chunk = [examples[i] for i in rng.integers(0, len(examples), c.sft.batch_size)]
      chunk = chunk[jax.process_index() * share:(jax.process_index() + 1) * share]
      batch = self._sft_batch(chunk)
      state, m = step_fn(state, batch)
      if step % 25 == 0 or step == c.sft.num_steps - 1:
        loss = float(m["sft/loss"])
        progress.update(step + 1, {"loss": loss})
    progress.close()
    self.state = jax.device_put(self.state.replace(params=state.params, master=state.master),
                                self.state_shardings)
    return {"sft/final_loss": loss}

  def _sft_batch(self, examples):
    ids, mask, _ = rollout.encode_prompts(self.tokenizer, self.task, examples,
                                          prompt_length=self.prompt_length)
    gen = self.config.rollout.gen_length
    completion = np.full((len(examples), gen), self.tokenizer.eos_token_id, np.int32)
    for row, example in enumerate(examples):
      target = self.tokenizer.encode(example.get("demonstration", example.get("answer", "")))[:gen]
      completion[row, :len(target)] = target
    seqs = np.concatenate([ids, completion], axis=1)
    batch = rollout.rl_batch(seqs, mask, np.zeros(len(examples)), np.arange(len(examples)),
                             np.arange(len(examples)))
    return self.put_batch({k: batch[k] for k in ("sequences", "attention_mask", "completion_mask")})

  def put_batch(self, arrays: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global device arrays split over the batch mesh axes (dim 0)."""
    return step_io.put_rows(self.mesh, arrays)

  # -- the RL train step --------------------------------------------------------------------------
  def abstract_rollout_batch(self, minibatches: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/shardings of the RL batch of one step, or of one of its ``minibatches`` (for
    ahead-of-time compilation)."""
    return abstract_rollout_batch(self.config, self.mesh, minibatches)

  def compile_steps(self, ref_params) -> dict[str, int]:
    """Jits `prepare_rollout` and AOT-compiles `rl_update` for the run's shapes; logs memory."""
    self._prepare = train_step.jit_prepare(self.graphdef, self.objective, self.objective_config,
                                           self.mesh)
    prepared = jax.eval_shape(self._prepare, self.state.params, ref_params,
                              self.abstract_rollout_batch(), self.state.key, train_step.SCALAR_INT32)
    minibatches = self.config.minibatches_per_rollout
    batch = self.abstract_rollout_batch(minibatches)
    per_example = {k: jax.ShapeDtypeStruct((v.shape[0] // minibatches,) + v.shape[1:], v.dtype,
                                           sharding=sharding.batch_sharding(self.mesh, v.ndim))
                   for k, v in prepared.per_example.items()}
    jitted = train_step.jit_rl_update(self.graphdef, self.objective, self.objective_config,
                                      self.optimizer, self.state_shardings)
    self._train_step, info = train_step.compile_ahead_of_time(
        jitted, train_step.abstract(self.state), batch, per_example, train_step.SCALAR_INT32,
        train_step.SCALAR_INT32)
    _log.info("train step compiled ahead of time: %s",
              ", ".join(f"{k.removeprefix('compile/').removesuffix('_size_in_bytes')} memory "
                        f"{v / 2**20:,.1f} MiB" for k, v in info.items()) or "no memory analysis")
    return info

  def update_batches(self, batch: dict[str, jax.Array], per_example: dict[str, jax.Array]):
    """The (batch, per-example) pairs of the ``updates_per_rollout`` updates of one rollout, cut
    on the device (`step_io.minibatch`).

    With ``minibatches_per_rollout`` = M, the rollout (prompts in order, each prompt's G
    completions consecutive) is split into M disjoint mini-batches of whole groups (consecutive
    rows of the global batch) and update i uses mini-batch i mod M (BGPO's off-policy mode:
    M = 2, two updates). M = 1 reuses the whole rollout for every update (DMPO's F-fold buffer
    reuse, diffu-GRPO's μ iterations).
    """
    minibatches = self.config.minibatches_per_rollout
    placed = [step_io.minibatch(self.mesh, (batch, per_example), m, minibatches)
              for m in range(minibatches)]
    for iteration in range(self.config.updates_per_rollout):
      yield placed[iteration % minibatches]

  # -- the loop ---------------------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    """Trains from the start or the latest checkpoint. SIGINT / SIGTERM never raise inside it
    (`interrupts.InterruptHandler`); a file-system failure is one `cli.Fault` line."""
    guard = interrupts.InterruptHandler(multi_process=jax.process_count() > 1).install()
    try:
      with workdir_lib.quiet_storage_error_logs(), workdir_lib.storage_operation(
          "write to the workdir", self.workdir):
        return self._run(guard)
    finally:
      guard.uninstall()

  def _run(self, guard: interrupts.InterruptHandler) -> dict[str, Any]:
    c = self.config
    train, warmup_examples, held_out = self.data
    self.workdir.mkdir(parents=True, exist_ok=True)  # only once config, data and model are good
    if self.start == run_start.FRESH and jax.process_index() == 0:
      workdir_lib.write_run_config(self.workdir, run_start.config_json(c))
    iterator = self.make_iterator(train)
    ckpt = checkpointing.TrainCheckpointer(self.workdir / "checkpoints",
                                           save_interval_steps=c.checkpoint.every_steps,
                                           max_to_keep=c.checkpoint.max_to_keep)
    start_step = 0
    if ckpt.latest_step() is not None:
      # Restored straight into the state's shardings; the freshly initialised state is freed
      # first, so two train states never share the devices' memory.
      abstract_state, self.state = train_step.abstract(self.state), None
      try:
        restored = ckpt.restore(abstract_state=abstract_state,
                                fallback=self.fallback_to_previous_checkpoint)
      except checkpointing.CheckpointIntegrityError:
        raise
      except ValueError as e:  # another run's state (a checkpoint without its config)
        raise WorkdirError(f"{e}; a resume needs the same model, LoRA and optimizer settings: use "
                           "another --workdir, or pass --overwrite to start from scratch") from e
      start_step = int(restored.metadata["checkpoint_step"])
      self.state = jax.device_put(restored.state, self.state_shardings)
      iterator.set_state(restored.iterator_state)
      _log.info("resumed from step %d", start_step)
    reference_dir = self.workdir / "reference_model"
    # Resume: rows after the restored step are dropped (they are recomputed). Fresh start: any
    # rows left by an earlier run without a checkpoint (allowed by `overwrite`) are dropped too.
    with cli.file_operation("write the metrics", self.workdir / metrics_lib.METRICS_FILE):
      writer = metrics_lib.MetricWriter(self.workdir, process_index=jax.process_index(),
                                        resume_step=start_step if start_step else -1,
                                        wandb=bool(c.wandb.enabled), wandb_project=c.wandb.project,
                                        config=c.to_dict())
    guard.exit_note = ("nothing to save yet; re-run the same command to start again" if not start_step
                       else f"nothing new since the checkpoint of step {start_step}; re-run the same "
                       "command to resume")
    results: dict[str, Any] = {**self.data_report}
    bar_enabled = bool(c.progress_bar)
    if not start_step:
      if c.sft.num_steps:
        results.update(self.warmup(warmup_examples, bar_enabled))
      initial_eval = self.evaluate(self.state.params, held_out)
      results["eval/accuracy_start"] = initial_eval["eval/accuracy"]
      writer.write(0, {**initial_eval, **results})
    # The reference policy is the model RL starts from (after any warm-up); saved once so a
    # resumed run compares against the same reference.
    ref_params = None  # with LoRA: the base with adapters disabled, built inside `prepare`
    if self.objective.uses_reference(self.objective_config) and not c.model.lora_rank:
      if start_step:
        ref_params = nnx.split(checkpointing.load_model_checkpoint(
            reference_dir, shardings=self.param_shardings))[1]
      else:
        ref_params = jax.tree.map(jnp.copy, self.state.params)
        with workdir_lib.storage_operation("write the reference model", reference_dir):
          checkpointing.save_model_checkpoint(reference_dir, self.state.params, self.model_config,
                                              overwrite=True)
    elif not start_step and jax.process_index() == 0:
      reference_dir.mkdir(exist_ok=True)

    results.update(self.compile_steps(ref_params))
    reward_pool = reward_pool_lib.RewardPool(c.task.name, c.task.reward_style, c.task.reward_workers,
                                             timeout_s=c.task.get("reward_timeout_s", 0.0) or None)
    timer = metrics_lib.PhaseTimer()
    progress = metrics_lib.ProgressBar(c.num_steps, initial=start_step, desc=f"{c.objective} RL",
                                       disable=None if bar_enabled else True,
                                       process_index=jax.process_index(),
                                       log_every_steps=c.log_every_steps,
                                       log_every_seconds=c.log_every_seconds)
    profiler = profiling.StepProfiler(c.get("profile_steps", ""), self.workdir)
    last_metrics: dict[str, float] = {}
    step = start_step
    checkpoints = workdir_lib.storage_operation  # a failed save: one line, older steps intact
    failure: Optional[BaseException] = None
    try:
      for step in range(start_step, c.num_steps):
        profiler.start_step(step + 1)
        element = next(iterator)
        examples = element["examples"]
        rollout_key = jax.random.fold_in(jax.random.fold_in(self.state.key, step), 0x5A3)
        with timer.phase("rollout"):
          ids, mask, truncated = rollout.encode_prompts(self.tokenizer, self.task, examples,
                                                        prompt_length=self.prompt_length)
          sequences, prompt_mask = self.sample(
              sampling_layout.reshard(self.state.params, self.sampling), ids, mask, rollout_key,
              self.rollout_config)
          # Host copy 1 of 2: this process's completion tokens, for its rewards.
          completion_ids = step_io.fetch_local_rows(sequences[:, self.prompt_length:], self.mesh)
        with timer.phase("reward"):
          completions = rollout.decode_completions(self.tokenizer, completion_ids, 0)
          rewards = reward_pool(completions, examples)
        batch_size = len(examples)
        example_ids = (step * jax.process_count() + jax.process_index()) * batch_size + np.arange(batch_size)
        # The batch is built on the device from the sampler's output (no copy of the sequences).
        truncated_rows = np.arange(batch_size) < truncated  # only their sum is used
        batch, rollout_metrics = step_io.device_rl_batch(
            self.mesh, sequences, prompt_mask, self.put_batch({
                "rewards": np.asarray(rewards, np.float32), "group_ids": element["group_ids"],
                "example_ids": example_ids, "truncated": truncated_rows}))
        with timer.phase("prepare"):
          prepared = self._prepare(self.state.params, ref_params, batch, self.state.key,
                                   jnp.int32(step))
          jax.block_until_ready(prepared.per_example)  # the phase time covers the device work
        with timer.phase("update"):
          update_metrics = []
          for iteration, (mb, pe) in enumerate(self.update_batches(batch, prepared.per_example)):
            self.state, m = self._train_step(self.state, mb, pe, jnp.int32(step),
                                             jnp.int32(iteration))
            update_metrics.append(m)
          # Host copy 2 of 2: every metric of the step, packed into one vector on the device.
          step_metrics = step_io.fetch_metrics(self.mesh, update_metrics, {
              **{f"prepare/{k}": v for k, v in prepared.metrics.items()}, **rollout_metrics})
        guard.unsaved_progress = True  # a stop now saves this step first
        step_metrics["reward/failed_calls"] = float(len(reward_pool.last_failures))
        done = step + 1
        if c.eval.every_steps and (done % c.eval.every_steps == 0 or done == c.num_steps):
          with timer.phase("eval"):
            step_metrics.update(self.evaluate(self.state.params, held_out))
        times = timer.metrics()
        step_metrics.update(times)
        step_metrics["time/rollout_share"] = rollout_share(times)
        step_metrics["rollout/tokens_per_second"] = metrics_lib.tokens_per_second(
            completion_ids.shape[0] * c.rollout.gen_length, times.get("time/rollout", 0.0))
        with cli.file_operation("write the metrics", writer.path):
          writer.write(done, step_metrics)
        last_metrics = step_metrics
        progress.update(done, {"reward": step_metrics["reward/mean"],
                               "correct": step_metrics["reward/accuracy"],
                               **({"eval_acc": step_metrics["eval/accuracy"]}
                                  if "eval/accuracy" in step_metrics else {})},
                        phases={k.removeprefix("time/"): v for k, v in times.items()})
        stop = guard.should_stop()
        with checkpoints("write the checkpoint", ckpt.directory, run_start.last_checkpoint_note(ckpt)):
          ckpt.save(done, self.state, iterator_state=iterator.get_state(),
                    consumed_prompts=done * c.prompts_per_step, metadata={"config": c.to_json()},
                    force=done == c.num_steps or stop)
          profiler.end_step(done)
          if stop:
            signum = guard.first_signal or signal.SIGTERM  # another process was signalled
            _log.warning("stop requested (%s): saving step %d and exiting",
                         interrupts.signal_name(signum), done)
            ckpt.wait_until_finished()
            results["interrupted_at" if signum == signal.SIGINT else "preempted_at"] = done
            break
    except BaseException as e:
      failure = e
      raise
    finally:
      profiler.close()
      progress.close()
      with checkpoints("write the checkpoint", ckpt.directory, run_start.last_checkpoint_note(ckpt)):
        run_start.close_after_run(ckpt, [reward_pool.close, writer.close], failure)
    results.update({k: v for k, v in last_metrics.items() if k.startswith("eval/")})
    guard.unsaved_progress = False  # every step is in the last checkpoint now
    if guard.stop_requested and "preempted_at" not in results and "interrupted_at" not in results:
      # A signal during the last step's save: stop without the final model (the same command
      # writes it).
      signum = guard.first_signal or signal.SIGTERM
      results["interrupted_at" if signum == signal.SIGINT else "preempted_at"] = c.num_steps
    if "preempted_at" not in results and "interrupted_at" not in results:
      # The trained policy (LoRA adapters folded in) in the project's model format: launch/eval.py,
      # launch/generate.py and launch/convert.py (to a Hugging Face folder) take it directly.
      guard.exit_note = (f"the checkpoint of step {c.num_steps} is saved but not the final model; "
                         "re-run the same command to write it")
      final = final_model.export(self.workdir, self.graphdef, self.state.params, self.mesh)
      if jax.process_index() == 0:
        results["final_model"] = str(final)
    return results



def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          fallback_to_previous_checkpoint: bool = False) -> dict[str, Any]:
  """Runs (or resumes) training in ``workdir``; returns summary numbers. A finished run (its last
  checkpoint at ``num_steps`` and its final model written) is left as it is:
  ``{"finished": step, "final_model": ...}``.

  The workdir is locked for the run (`workdir.RunFolder`: a second run on it is refused) and
  how the run starts is decided under the lock (`run_start.plan`): ``overwrite`` starts from
  scratch where the workdir holds a run this config cannot continue (metrics of another run
  without a checkpoint, or checkpoints that differ in a structural key), which is an error
  otherwise. ``fallback_to_previous_checkpoint``: if the latest checkpoint fails its checksums,
  resume from the newest intact one (otherwise the error stops the run).
  """
  validate_config(config, jax.device_count())
  with workdir_lib.RunFolder(workdir, lock=jax.process_index() == 0) as folder:
    step = run_start.finished_step(config, folder.path)
    if step is not None:
      final = (folder.path / final_model.FINAL_MODEL_DIR).absolute()
      _log.info("the run in %s is finished (step %d of num_steps=%d); its final model is %s. "
                "Raise --config.num_steps to train further.", workdir, step, config.num_steps, final)
      return {"finished": step, "final_model": str(final)}
    start = run_start.plan_on_every_process(folder.path, run_start.config_json(config), overwrite)
    return Trainer(config, folder.path, start=start,
                   fallback_to_previous_checkpoint=fallback_to_previous_checkpoint).run()
