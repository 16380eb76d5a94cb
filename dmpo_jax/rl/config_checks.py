"""Config checks beyond numbers: names from a fixed set, paths, and lengths against the model.

`errors(config)` returns one message per bad key (``loop.validate_config`` joins them into one
line), before any data or weights are read:

* **choices** (`CHOICES`): every key whose value comes from a fixed set names the allowed values
  (``optimizer.schedule``, ``task.reward_style``, ``rollout.remasking``, ...);
* **paths**: ``tokenizer`` "byte", "" (the checkpoint's) or a folder, and a local
  ``task.*_source`` an existing file (a name like ``owner/dataset`` is a Hugging Face dataset);
  (``model.checkpoint``, which must be a model folder, is checked by `loop.validate_config`);
* **lengths**: prompt + generation (rollout and held-out evaluation) must fit the model's
  ``max_seq_len`` (the context it was trained for), read from the preset or the checkpoint's
  config file without loading weights.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

from dmpo_jax import errors as error_lib
from dmpo_jax.models import config as model_config_lib
from dmpo_jax.rl import train_state as ts
from dmpo_jax.tasks import base as task_base

# Keys whose value must be one of a fixed set (besides those `loop.validate_config` checks with
# their own message: objective, task.name, model.preset / init / dtypes, eval.style, and the
# rollout sampler's remasking and cache through `rollout.sampler_config`).
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer.schedule": ts.SCHEDULES,
    "task.reward_style": task_base.REWARD_STYLES,
}


def _get(config, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


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
  """The tokenizer, data sources and LoRA targets (``model.checkpoint``: `loop._model_errors`)."""
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
