"""Explicit training state and optimizer (`jax_patterns.md` §2).

The jitted step is a pure function ``(TrainState, batch) -> (TrainState, metrics)`` over this
pytree; nothing stateful lives in Python objects inside the hot loop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dmpo_jax.models import lora


@struct.dataclass
class TrainState:
  """params: trainable `nnx.State`; opt_state: optax state; step: int32 scalar (update calls made,
  skipped ones included); rng: raw uint32 key data of the run's base key (saved by checkpoints as plain data)."""
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def make_optimizer(learning_rate: float, *, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   warmup_steps: int = 0, total_steps: int = 0,
                   schedule: str = "constant") -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a warm-up + {constant, cosine, linear} schedule."""
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}")
  if schedule not in ("constant", "cosine", "linear"):
    raise ValueError(f"schedule must be constant, cosine or linear, got {schedule!r}")
  decay_steps = max(1, total_steps - warmup_steps)
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    main = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  lr = main if warmup_steps <= 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), main], [warmup_steps])
  parts = []
  if max_grad_norm and max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """The optimizer state covers the trainable part only (the LoRA adapters when the model has
  them, else every parameter: `lora.split_trainable`)."""
  return TrainState(params=params, opt_state=optimizer.init(lora.split_trainable(params)[0]),
                    step=jnp.zeros((), jnp.int32),
                    rng=jax.random.key_data(jax.random.key(seed)))


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation,
                    loss: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update, skipped (parameters and optimizer state untouched) when the loss or
  any gradient is non-finite. ``grads`` covers the trainable part (`lora.split_trainable`).
  Returns the new state and metrics (grad norm, skipped flag)."""
  trainable, frozen = lora.split_trainable(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(params=lora.merge_trainable(keep(new_trainable, trainable), frozen),
                            opt_state=keep(new_opt_state, state.opt_state),
                            step=state.step + 1)
  return new_state, {"train/grad_norm": grad_norm,
                     "train/skipped_nonfinite": 1.0 - finite.astype(jnp.float32)}
