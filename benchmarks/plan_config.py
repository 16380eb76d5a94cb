"""A published config for a compile-only plan (`benchmarks/memory.py --config`,
`benchmarks/step_time.py`): loaded with dotted overrides and validated as the trainer would,
except what compiling does not need."""

from __future__ import annotations

import importlib.util
import json
from typing import Any


def load_config(path: str, overrides: list[str]) -> "ml_collections.ConfigDict":
  """``get_config()`` of a configs/*.py file with dotted ``key=value`` overrides (JSON values)."""
  spec = importlib.util.spec_from_file_location("published_config", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--config: cannot load {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in parse_overrides(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"--override {key}: unknown key {leaf!r} in {'.'.join(parents) or 'config'}")
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and not isinstance(
        node[leaf], bool) else value
  return config


def validate_for_plan(config, num_devices: int) -> None:
  """`loop.validate_config`, except the context-length check: a plan may put a small preset at
  a published config's shapes (``--override model.preset=tiny`` at 1024 tokens) and only
  compiles, and ``max_seq_len`` is the context a model was trained for, not a limit of its
  programs (RoPE takes any position). Nothing is tokenized either: a config without a
  checkpoint or tokenizer gets the byte tokenizer (the vocabulary is the preset's)."""
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  if not config.model.checkpoint and not config.get("tokenizer"):
    config.tokenizer = "byte"
  try:
    loop.validate_config(config, num_devices)
  except loop.ConfigError as e:
    errors = [m for m in str(e).removeprefix("invalid config: ").split("; ")
              if "exceeds the model's max_seq_len" not in m]
    if errors:
      raise loop.ConfigError("invalid config: " + "; ".join(errors)) from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
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


def emit(result: dict[str, Any], output: str | None) -> None:
  """Prints ``result`` as one JSON line and appends it to ``output`` (a JSON-lines file) if
  given."""
  line = json.dumps(result)
  print(line, flush=True)
  if output:
    with open(output, "a", encoding="utf-8") as f:
      f.write(line + "\n")
