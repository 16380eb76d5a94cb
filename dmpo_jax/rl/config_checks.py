"""Config validation: can this training config run? Everything is checked before any data or
weights are read; `validate_config` raises one `ConfigError` line naming every bad key.

* **numbers** (`NUMERIC_FIELDS`): type, finiteness and range of every numeric field;
* **names**: the objective (and its own config), the task, its evaluation style and reward
  settings (`reward_pool.config_errors`), the rollout sampler (`rollout.sampler_config`), and
  every key whose value comes from a fixed set (`CHOICES`: ``optimizer.schedule``,
  ``task.reward_style``, ...), with the allowed values;
* **where the weights come from** (`model_errors`): a model folder, or random weights only when
  asked for;
* **paths** (`path_errors`): ``tokenizer`` "byte", "" (the checkpoint's) or a folder, and a local
  ``task.*_source`` an existing file (a name like ``owner/dataset`` is a Hugging Face dataset);
* **lengths** (`length_errors`): prompt + generation (rollout and held-out evaluation) must fit
  the model's ``max_seq_len`` (the context it was trained for), read from the preset or the
  checkpoint's config file without loading weights;
* **batch shapes**: generation blocks, mini-batches of whole groups, and the batch split over the
  mesh (`validate_config` with the device count).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Optional

import jax
import ml_collections

from dmpo_jax import errors as error_lib
from dmpo_jax import profiling, sharding
from dmpo_jax.models import config as model_config_lib
from dmpo_jax.rl import registry, rollout
from dmpo_jax.rl import train_state as ts
from dmpo_jax.tasks import base as task_base, reward_pool as reward_pool_lib


class ConfigError(error_lib.UserError, ValueError):
  """A training config that cannot run (the message names the key and the problem)."""


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


def _get(config, dotted: str) -> Any:
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


# Keys whose value must be one of a fixed set (besides those `validate_config` checks with
# their own message: objective, task.name, model.preset / init / dtypes, eval.style, and the
# rollout sampler's remasking and cache through `rollout.sampler_config`).
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer.schedule": ts.SCHEDULES,
    "task.reward_style": task_base.REWARD_STYLES,
}


def choice_errors(config) -> list[str]:
  errors = []
  for key, allowed in CHOICES.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      continue
    if value not in allowed:
      errors.append(f"{key}={value!r} is not one of {list(allowed)}"
                    f"{error_lib.closest(str(value), allowed)}")
  return errors


def _is_hub_name(source: str) -> bool:
  """``owner/name`` (a Hugging Face dataset), as `tasks.base.read_rows` tells them apart."""
  return "/" in source and not source.startswith((".", "/", "~")) and not os.path.exists(source)


def path_errors(config) -> list[str]:
  """The tokenizer, data sources and LoRA targets (``model.checkpoint``: `model_errors`)."""
  errors = []
  checkpoint = config.model.checkpoint
  tokenizer = config.get("tokenizer", "")
  if not tokenizer and not checkpoint:
    errors.append("tokenizer='' means the checkpoint's tokenizer, but model.checkpoint is not set: "
                  "give --config.tokenizer=byte or a tokenizer folder")
  elif tokenizer and tokenizer != "byte":
    if not os.path.exists(tokenizer):
      errors.append(f"tokenizer={tokenizer} does not exist (expected 'byte' or a folder with "
                    "tokenizer.json)")
    elif not os.path.isdir(tokenizer):
      errors.append(f"tokenizer={tokenizer} is a file, not a folder (expected 'byte' or a folder "
                    "with tokenizer.json)")
  for key in ("train_source", "eval_source"):
    source = config.task.get(key, "")
    if not source or _is_hub_name(source):
      continue
    if not os.path.exists(os.path.expanduser(source)):
      errors.append(f"task.{key}={source} does not exist (a local data file, or a Hugging Face "
                    "dataset name owner/name)")
    elif os.path.isdir(os.path.expanduser(source)):
      errors.append(f"task.{key}={source} is a folder, not a data file (.jsonl, .json, .csv, "
                    ".parquet)")
  if config.model.lora_rank:
    try:
      model_config_lib.get_preset("tiny").replace(
          lora_rank=int(config.model.lora_rank), lora_alpha=float(config.model.lora_alpha),
          lora_targets=tuple(config.model.lora_targets))
    except (ValueError, TypeError) as e:
      errors.append(f"model.{str(e).removeprefix('Invalid ModelConfig: ')}")
  return errors


def model_max_seq_len(config) -> tuple[Optional[int], str]:
  """(max_seq_len, where it comes from) of the configured model, without loading weights; None
  when it cannot be read (the model load reports why)."""
  checkpoint = config.model.checkpoint
  try:
    if not checkpoint:
      return model_config_lib.get_preset(config.model.preset).max_seq_len, f"preset {config.model.preset}"
    path = pathlib.Path(checkpoint)
    if (path / "model_config.json").is_file():
      from dmpo_jax import checkpointing  # pylint: disable=import-outside-toplevel
      return checkpointing.load_model_config(path).max_seq_len, f"{path / 'model_config.json'}"
    from dmpo_jax.models import hf_io  # pylint: disable=import-outside-toplevel
    return hf_io.model_config_from_hf(path).max_seq_len, f"{path / hf_io.CONFIG_FILE}"
  except (ValueError, KeyError, OSError):
    return None, ""


def length_errors(config) -> list[str]:
  max_len, source = model_max_seq_len(config)
  if max_len is None:
    return []
  errors = []
  prompt = config.task.prompt_length
  for block in ("rollout", "eval"):
    gen = config[block].gen_length
    if prompt + gen > max_len:
      errors.append(f"task.prompt_length + {block}.gen_length = {prompt} + {gen} = {prompt + gen} "
                    f"exceeds the model's max_seq_len={max_len} ({source}): lower "
                    f"{block}.gen_length to at most {max(max_len - prompt, 0)}")
  return errors


def errors(config) -> list[str]:
  """Every problem of the choices, paths and lengths of a training config (one message each)."""
  found = choice_errors(config) + path_errors(config)
  if not found:  # the lengths need a readable model config
    found += length_errors(config)
  return found


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Checks everything that can be checked before any work; raises `ConfigError` (one line
  naming every bad key)."""
  problems = numeric_errors(config)
  if problems:  # the checks below assume sane numbers
    raise ConfigError("invalid config: " + "; ".join(problems))
  if config.objective not in registry.objective_names():
    problems.append(f"objective={config.objective!r} is unknown; known {list(registry.objective_names())}")
  else:
    objective = registry.get_objective(config.objective)
    try:
      ocfg = objective.make_config(config.get(config.objective, {}))
      limit = objective.max_updates_per_rollout(ocfg)
      if limit is not None and config.updates_per_rollout > limit:
        problems.append(f"updates_per_rollout={config.updates_per_rollout} exceeds {limit}, the most "
                        f"{config.objective!r} supports with this config")
    except ValueError as e:
      problems.append(f"{config.objective}: {e}")
    if objective.uses_group_statistics and config.group_size < 2:
      problems.append(f"group_size={config.group_size} must be >= 2: {config.objective!r} normalises "
                      "rewards over the completions of a prompt")
  if config.task.name not in task_base.task_names():
    problems.append(f"task.name={config.task.name!r} is unknown; known {task_base.task_names()}")
  else:
    try:
      task_base.check_eval_style(config.eval.get("style", "fixed"), config.task.name)
    except ValueError as e:
      problems.append(f"eval.style: {e}")
    problems += reward_pool_lib.config_errors(config)
  for block, prefix in ((config.rollout, "rollout"), (config.eval, "eval")):
    gen, blk, steps = block.gen_length, block.block_length, block.steps
    if gen % blk:
      problems.append(f"{prefix}.gen_length={gen} is not a multiple of {prefix}.block_length={blk}")
    elif steps % (gen // blk):
      problems.append(f"{prefix}.steps={steps} is not a multiple of the number of blocks {gen // blk}")
    elif prefix == "rollout":
      try:
        rollout.sampler_config(block)
      except ValueError as e:
        problems.append(f"rollout: {e}")
  if config.prompts_per_step % config.minibatches_per_rollout:
    problems.append(f"prompts_per_step={config.prompts_per_step} is not divisible by "
                    f"minibatches_per_rollout={config.minibatches_per_rollout} (mini-batches hold "
                    "whole groups)")
  reference_micro = config[config.objective].get("reference_micro_batch_size") if (
      config.objective in config) else None
  update_batch = (config.prompts_per_step * config.group_size
                  // max(config.minibatches_per_rollout, 1))
  if reference_micro and update_batch % reference_micro:
    problems.append(f"{config.objective}.reference_micro_batch_size={reference_micro} does not divide "
                    f"the update batch prompts_per_step*group_size/minibatches_per_rollout="
                    f"{update_batch}")
  problems += model_errors(config.model)
  problems += errors(config)
  for name in ("dtype", "param_dtype"):
    if config.model[name] not in ("",) + model_config_lib.DTYPES:
      problems.append(f"model.{name}: must be '' (the preset's / checkpoint's) or one of "
                      f"{model_config_lib.DTYPES}, got {config.model[name]!r}")
  if config.model.get("attention_impl", "auto") not in model_config_lib.ATTENTION_IMPLS:
    problems.append(f"model.attention_impl: must be one of {model_config_lib.ATTENTION_IMPLS}, got "
                    f"{config.model.attention_impl!r}")
  if config.optimizer.state_dtype not in ts.STATE_DTYPES:
    problems.append(f"optimizer.state_dtype: must be one of {ts.STATE_DTYPES}, got "
                    f"{config.optimizer.state_dtype!r}")
  if not isinstance(config.optimizer.master_weights, bool):
    problems.append(f"optimizer.master_weights: must be true or false, got "
                    f"{config.optimizer.master_weights!r}")
  problems += profiling.config_errors(config.get("profile_steps", ""), config.num_steps)
  if jax.process_count() > 1 and config.sft.num_steps and config.sft.batch_size % jax.process_count():
    problems.append(f"sft.batch_size={config.sft.batch_size} is not divisible by the "
                    f"{jax.process_count()} processes")
  if num_devices is not None and not problems:
    try:
      shape = mesh_shape(config, num_devices)
      divisor = shape["data"] * shape["fsdp"]
      batch = config.prompts_per_step * config.group_size // max(config.minibatches_per_rollout, 1)
      if batch % divisor:
        problems.append(f"the update batch prompts_per_step*group_size/minibatches_per_rollout={batch} "
                        f"is not divisible by the batch mesh axes data*fsdp={divisor}")
      if jax.process_count() > 1 and config.eval.batch_size % jax.process_count():
        problems.append(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
      if config.eval.batch_size % divisor:
        problems.append(f"eval.batch_size={config.eval.batch_size} is not divisible by data*fsdp={divisor}")
    except ValueError as e:
      problems.append(f"mesh: {e}")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def model_errors(model) -> list[str]:
  """Where the weights come from: a checkpoint, or random weights only when asked for."""
  init = model.get("init", "auto")
  if init not in MODEL_INIT:
    return [f"model.init={init!r} must be one of {MODEL_INIT}"]
  if model.checkpoint:
    if init == "random":
      return [f"model.init='random' contradicts model.checkpoint={model.checkpoint!r}: give one"]
    problem = error_lib.model_folder_problem(model.checkpoint)
    return [f"model.checkpoint={problem}"] if problem else []
  if model.preset not in model_config_lib.PRESET_NAMES:
    return [f"model.preset={model.preset!r} is unknown; known {model_config_lib.PRESET_NAMES}"]
  if init == "auto" and model.preset not in RANDOM_INIT_PRESETS:
    return [f"model.checkpoint is not set: give the {model.preset} weights with "
            "--config.model.checkpoint=/path/to/the/model (an HF folder or a trained checkpoint), "
            "or pass --config.model.init=random to train a randomly initialised "
            f"{model.preset} on purpose"]
  return []


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """``config.mesh`` resolved against the device count (-1 fills the rest)."""
  shape = {a: int(config.mesh[a]) for a in sharding.MESH_AXES}
  return dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(shape, num_devices)))
