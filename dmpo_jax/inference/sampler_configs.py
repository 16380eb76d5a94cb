"""THE builder of sampler settings: rollouts (``config.rollout``), the greedy evaluation of the
trainer and `launch/eval.py`, and `launch/generate.py`'s flags all go through `build`.

Evaluation follows the published protocol (`docs/tasks.md` §1, §7): greedy (τ = 0),
low-confidence remasking, ``batch_invariant`` decoding (a row's tokens do not depend on the batch
size, its batch-mates or the number of devices: `docs/tasks.md` §7.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

from dmpo_jax.diffusion.dream_sampler import DreamSamplerConfig
from dmpo_jax.diffusion.sampler_config import SamplerConfig

# Config values <= 0 that mean "off" (None) in a config block (`configs/base.py` ``rollout``).
OFF_AT_OR_BELOW_ZERO = ("threshold", "factor", "max_tokens_per_step")
STEPS_CHOICES = ("full", "half")


def _items(values: Any) -> dict[str, Any]:
  return dict(values.items()) if hasattr(values, "items") else dict(values)


def build(config_class: type, values: Any, **fixed: Any) -> Any:
  """``config_class(**values, **fixed)`` (a `SamplerConfig` or `DreamSamplerConfig`); a key that
  names no field of it raises ValueError naming it (the class validates the values)."""
  fields = {f.name for f in dataclasses.fields(config_class)}
  values = {**_items(values), **fixed}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"unknown sampler key(s) {unknown}; known {sorted(fields)}")
  return config_class(**values)


def sampler_config(block: Any, **fixed: Any) -> SamplerConfig:
  """The `SamplerConfig` of a config block (``config.rollout``): every key that names a
  `SamplerConfig` field is passed on, with the config's "off" values ``threshold`` / ``factor``
  ≤ 0 and ``max_tokens_per_step`` ≤ 0 meaning None; ``fixed`` overrides (e.g. the trace).
  A key that is no sampler field, or a bad value, raises ValueError naming it."""
  values = _items(block)
  for name in OFF_AT_OR_BELOW_ZERO:
    if name in values and values[name] is not None and values[name] <= 0:
      values[name] = None
  return build(SamplerConfig, values, **fixed)


def resolve_steps(steps: Union[str, int], gen_length: int) -> int:
  """Denoising steps: ``full`` = gen_length (DMPO's ``--full_steps``), ``half`` = gen_length / 2
  (d1), or a positive integer."""
  if steps == "full":
    return gen_length
  if steps == "half":
    return gen_length // 2
  value = int(steps)
  if value <= 0:
    raise ValueError(f"--steps must be full, half or a positive integer, got {steps!r}")
  return value


def greedy_eval(gen_length: int, block_length: int, steps: Union[str, int]) -> SamplerConfig:
  """The evaluation sampler: greedy, low-confidence remasking, batch-invariant."""
  return build(SamplerConfig, {}, gen_length=gen_length, block_length=block_length,
               steps=resolve_steps(steps, gen_length), temperature=0.0,
               remasking="low_confidence", batch_invariant=True)


def eval_sampler_config(eval_block: Any) -> SamplerConfig:
  """`greedy_eval` of a training config's ``eval`` block (gen_length, block_length, steps)."""
  return greedy_eval(eval_block["gen_length"], eval_block["block_length"], eval_block["steps"])


def from_flags(flag_values: Any, sampler: str) -> Union[SamplerConfig, DreamSamplerConfig]:
  """The LLaDA (``sampler="llada"``) or Dream sampler settings from the flags (an absl
  `FlagValues` or a dict) that name one of its fields (`launch/generate.py`); other flags are
  ignored."""
  config_class = {"llada": SamplerConfig, "dream": DreamSamplerConfig}[sampler]
  names = set(flag_values)
  values = {}
  for field in dataclasses.fields(config_class):
    if field.name in names:
      value = flag_values[field.name]
      values[field.name] = value if isinstance(flag_values, Mapping) else value.value
  return build(config_class, values)
