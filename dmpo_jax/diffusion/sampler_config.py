"""The LLaDA sampler's static settings (`SamplerConfig`, validated at construction) and the named
Fast-dLLM modes of the benchmarks (`mode_options`); `dmpo_jax.diffusion.sampler` re-exports them.
The options are described in that module's docstring (`docs/llada.md` §6, §7)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings (hashable: a jit static argument)."""
  gen_length: int = 128
  steps: int = 128
  block_length: int = 32
  temperature: float = 0.0
  remasking: str = "low_confidence"
  cfg_scale: float = 0.0
  logits_eos_inf: bool = False
  confidence_eos_eot_inf: bool = False
  eos_eot_aliased: bool = False
  reference_quota: bool = False
  threshold: Optional[float] = None
  factor: Optional[float] = None
  max_tokens_per_step: Optional[int] = None
  cache: str = "none"
  stop_at_eos: bool = False
  return_trace: bool = False
  noise_dtype: str = "float32"
  batch_invariant: bool = False

  def __post_init__(self):
    errors = []
    if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
      errors.append(f"gen_length ({self.gen_length}), block_length ({self.block_length}) and steps "
                    f"({self.steps}) must be positive")
    elif self.gen_length % self.block_length:
      errors.append(f"gen_length ({self.gen_length}) must be a multiple of block_length "
                    f"({self.block_length})")
    elif not self.parallel and self.steps % (self.gen_length // self.block_length):
      errors.append(f"steps ({self.steps}) must be a multiple of the number of blocks "
                    f"({self.gen_length // self.block_length})")
    if self.remasking not in REMASKING:
      errors.append(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
    if self.cache not in CACHES:
      errors.append(f"cache must be one of {CACHES}, got {self.cache!r}")
    if self.temperature < 0 or self.cfg_scale < 0:
      errors.append(f"temperature ({self.temperature}) and cfg_scale ({self.cfg_scale}) must be >= 0")
    if self.noise_dtype not in ("float32", "float64"):
      errors.append(f"noise_dtype must be float32 or float64, got {self.noise_dtype!r}")
    if self.threshold is not None and self.factor is not None:
      errors.append("give at most one of threshold and factor")
    if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
      errors.append(f"threshold must be in (0, 1], got {self.threshold}")
    if self.factor is not None and not self.factor > 0:
      errors.append(f"factor must be > 0, got {self.factor}")
    if self.max_tokens_per_step is not None:
      if self.max_tokens_per_step < 1:
        errors.append(f"max_tokens_per_step must be >= 1, got {self.max_tokens_per_step}")
      if not self.parallel:
        errors.append("max_tokens_per_step caps threshold or factor decoding; give one of them "
                      "(the quota schedule already fixes the tokens per step)")
    if self.reference_quota and (self.parallel or self.cache != "none" or self.stop_at_eos):
      errors.append("reference_quota reproduces the reference quota sampler: it needs cache='none', "
                    "no threshold / factor and no stop_at_eos")
    if errors:
      raise ValueError("Invalid SamplerConfig: " + "; ".join(errors))

  @property
  def parallel(self) -> bool:
    """Confidence-aware parallel decoding (threshold or factor): steps per block vary."""
    return self.threshold is not None or self.factor is not None

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  def replace(self, **kwargs) -> "SamplerConfig":
    return dataclasses.replace(self, **kwargs)


# Named (cache, parallel rule) combinations of the benchmarks and `docs/sampling.md`.
MODES = ("standard", "prefix_cache", "dual_cache", "threshold", "factor",
         "prefix_cache+threshold", "dual_cache+threshold", "dual_cache+factor")


def mode_options(mode: str, threshold: float = 0.9, factor: float = 1.0) -> dict[str, Any]:
  """The `SamplerConfig` fields of a named mode: ``standard`` | ``prefix_cache`` | ``dual_cache``,
  optionally ``+threshold`` / ``+factor`` (or ``threshold`` / ``factor`` alone, no cache)."""
  if mode not in MODES:
    raise ValueError(f"unknown sampler mode {mode!r}; known {MODES}")
  parts = mode.split("+")
  cache = {"prefix_cache": "prefix", "dual_cache": "dual"}.get(parts[0], "none")
  return {"cache": cache, "threshold": threshold if "threshold" in parts else None,
          "factor": factor if "factor" in parts else None}
