"""Loaded weights must be finite: a NaN or Inf in a checkpoint is refused with one line naming
the tensor, instead of sampling garbage.

Checksums (`checkpointing.array_checksums`) prove that the bytes are the ones that were saved;
they do not prove that what was saved is a usable model (an update that diverged, a corrupted
export, a hand-edited file). `check_finite` counts the non-finite values of every floating leaf
in one jitted reduction (the arrays stay where they are, sharded or not) and raises
`CheckpointError` naming each bad tensor, its count and the position of its first bad value.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmpo_jax.models.hf_io import CheckpointError


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=".")


@jax.jit
def _counts_and_first(tree):
  """Per leaf: (number of non-finite values, flat index of the first one)."""
  def one(x):
    bad = ~jnp.isfinite(x).reshape(-1)
    return jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad).astype(jnp.int32)
  return jax.tree.map(one, tree)


def nonfinite_tensors(params: Any) -> list[str]:
  """``"name: n NaN/Inf values of shape (...), the first at index (...)"`` for every floating
  leaf of ``params`` (a pytree of arrays, e.g. an `nnx.State`) that is not all finite."""
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if jnp.issubdtype(getattr(leaf, "dtype", np.int32), jnp.inexact)]
  if not leaves:
    return []
  results = jax.device_get(_counts_and_first([leaf for _, leaf in leaves]))
  problems = []
  for (path, leaf), (count, first) in zip(leaves, results):
    if int(count):
      where = tuple(int(i) for i in np.unravel_index(int(first), np.shape(leaf)))
      problems.append(f"{_name(path)}: {int(count)} NaN/Inf value(s) of shape {tuple(np.shape(leaf))}, "
                      f"the first at index {where}")
  return problems


def check_finite(params: Any, source: str) -> None:
  """Raises `CheckpointError` (one line) when a floating tensor of ``params`` holds NaN or Inf."""
  problems = nonfinite_tensors(params)
  if problems:
    raise CheckpointError(f"{source} holds non-finite weights: tensor " + "; tensor ".join(problems))
