"""Shared pieces of the objective modules: the config base class and the `Prepared` record.

Each objective module defines a frozen config dataclass (hashable, so it can be a static jit
argument) with ``__post_init__`` validation, a ``prepare`` function (no gradient, once per
rollout) and a ``grads`` function (loop-accumulated gradients, `grad.accumulate_gradients`),
and registers them in `dmpo_jax.rl.registry`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax


class Prepared(NamedTuple):
  """Output of ``objective.prepare``.

  per_example: dict of batch-leading arrays (advantages, weights, old/ref ELBO terms, ...). Slice
    it with the same row index as the batch to form mini-batches (whole groups only for the
    objectives that need group statistics inside ``grads``: DMPO model baseline).
  metrics: dict of scalar diagnostics of the rollout (weights ESS, zero-std fraction, ...).
  """
  per_example: dict[str, jax.Array]
  metrics: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Fields shared by every objective.

  micro_batch_size: rows per micro-batch inside ``grads`` / ``prepare`` (None = whole batch).
  """
  micro_batch_size: Optional[int] = None

  def __post_init__(self):
    errors = self.validation_errors()
    if errors:
      raise ValueError(f"Invalid {type(self).__name__}: " + "; ".join(errors))

  def validation_errors(self) -> list[str]:
    errors = []
    for f in dataclasses.fields(self):  # NaN / inf pass every `<` check below: refuse them here
      value = getattr(self, f.name)
      if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        errors.append(f"{f.name} must be finite, got {value}")
    if self.micro_batch_size is not None and self.micro_batch_size <= 0:
      errors.append(f"micro_batch_size must be positive or None, got {self.micro_batch_size}")
    return errors

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_mapping(cls, values: Optional[Mapping[str, Any]] = None, **overrides):
    """Builds a validated config from a (ml_collections-compatible) mapping; unknown keys raise."""
    merged = {**dict(values or {}), **overrides}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(merged) - known)
    if unknown:
      raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    for f in dataclasses.fields(cls):  # lists from config files -> tuples (hashable)
      if isinstance(merged.get(f.name), list):
        merged[f.name] = tuple(merged[f.name])
    return cls(**merged)


def check_choice(errors: list[str], name: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    errors.append(f"{name} must be one of {choices}, got {value!r}")


def check_positive(errors: list[str], name: str, value: Any, *, allow_zero: bool = False,
                   allow_none: bool = False) -> None:
  if value is None:
    if not allow_none:
      errors.append(f"{name} must be set")
    return
  if value < 0 or (value == 0 and not allow_zero):
    errors.append(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
