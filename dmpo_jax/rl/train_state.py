"""Explicit training state, optimizer and precision policy (`docs/architecture.md` §3).

The jitted step is a pure function ``(TrainState, batch) -> (TrainState, metrics)`` over this
pytree; nothing stateful lives in Python objects inside the hot loop.

Precision policy (every dtype is fixed at `init_train_state` and never changes afterwards):

* parameters: stored in their own dtype (``model.param_dtype``), computed in ``model.dtype``;
  an update is added in fp32 and rounded back to the storage dtype (`optax.apply_updates`).
* optimizer state: AdamW's moments in ``state_dtype`` (default fp32 whatever the parameters
  are, as MaxText does). Gradients and parameters are cast to ``state_dtype`` before the
  optimizer sees them and the new state is cast back to the dtypes it was created with, so a
  bf16 model keeps fp32 moments and an fp32 gradient never promotes a bf16 moment.
* optional master weights (``TrainState.master``): an fp32 copy of the trainable parameters
  that receives the updates; ``params`` is then its rounded compute copy (so repeated small
  updates are not lost to bf16 rounding).
* skipped (non-finite) updates keep every leaf, dtype included, bit-identical.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dmpo_jax.models import lora

STATE_DTYPES = ("float32", "bfloat16", "float16")


@struct.dataclass
class TrainState:
  """params: trainable `nnx.State`; opt_state: optax state; step: int32 scalar (update calls made,
  skipped ones included); rng: raw uint32 key data of the run's base key (saved by checkpoints as
  plain data); master: None, or fp32 master copy of the trainable part of params
  (`lora.split_trainable`) when master weights are on."""
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  master: Any = None

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Every floating-point leaf of ``tree`` cast to ``dtype`` (other leaves unchanged)."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def with_state_dtype(inner: optax.GradientTransformation,
                     state_dtype: str = "float32") -> optax.GradientTransformation:
  """``inner`` run in ``state_dtype``: its state is created from parameters cast to
  ``state_dtype``, it sees gradients and parameters in ``state_dtype``, and each new state is cast
  back to the dtypes of the state it replaces (dtypes are invariant under `update`). The updates
  it returns are in ``state_dtype``."""
  if state_dtype not in STATE_DTYPES:
    raise ValueError(f"optimizer state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")

  def init(params):
    return inner.init(cast_floating(params, state_dtype))

  def update(updates, state, params=None):
    params = None if params is None else cast_floating(params, state_dtype)
    new_updates, new_state = inner.update(cast_floating(updates, state_dtype), state, params)
    new_state = jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.asarray(old).dtype),
                             new_state, state)
    return new_updates, new_state

  return optax.GradientTransformation(init, update)


SCHEDULES = ("constant", "cosine", "linear")  # learning-rate schedules of `make_optimizer`


def make_optimizer(learning_rate: float, *, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   warmup_steps: int = 0, total_steps: int = 0,
                   schedule: str = "constant",
                   state_dtype: str = "float32") -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a warm-up + {constant, cosine, linear} schedule, run in
  ``state_dtype`` (moments, clipping and the update itself; `with_state_dtype`)."""
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
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
  return with_state_dtype(optax.chain(*parts), state_dtype)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int, *,
                     master_weights: bool = False) -> TrainState:
  """The optimizer state covers the trainable part only (the LoRA adapters when the model has
  them, else every parameter: `lora.split_trainable`). ``master_weights``: keep an fp32 copy of
  that part (`TrainState.master`)."""
  trainable = lora.split_trainable(params)[0]
  return TrainState(params=params, opt_state=optimizer.init(trainable),
                    step=jnp.zeros((), jnp.int32),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    master=_fp32_copy(trainable) if master_weights else None)


def _fp32_copy(tree: Any) -> Any:
  """A float32 copy of ``tree`` in fresh buffers (fp32 leaves are copied, not aliased, so a state
  holding both can be donated)."""
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), tree)


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation,
                    loss: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update, skipped (parameters and optimizer state untouched) when the loss or
  any gradient is non-finite. ``grads`` covers the trainable part (`lora.split_trainable`).

  Without master weights the update is added to the stored parameters in fp32 and rounded to
  their dtype; with them it is added to the fp32 master copy and the parameters become its
  rounding. Every leaf of the returned state has the dtype it had before.
  Returns the new state and metrics (grad norm, skipped flag)."""
  trainable, frozen = lora.split_trainable(state.params)
  grad_norm = optax.global_norm(grads)
  # Not optax.apply_if_finite: a skipped step adds zero updates (bf16 -0.0 becomes +0.0), it
  # ignores the loss and wraps opt_state (old checkpoints do not restore); see test_precision.py.
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  weights = trainable if state.master is None else state.master
  updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, weights)
  new_weights = optax.apply_updates(weights, updates)  # fp32 sum, rounded to each leaf's dtype
  new_trainable = jax.tree.map(lambda new, old: new.astype(old.dtype), new_weights, trainable)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n.astype(o.dtype), o), new, old)
  new_state = state.replace(params=lora.merge_trainable(keep(new_trainable, trainable), frozen),
                            opt_state=keep(new_opt_state, state.opt_state),
                            master=None if state.master is None else keep(new_weights, state.master),
                            step=state.step + 1)
  return new_state, {"train/grad_norm": grad_norm,
                     "train/skipped_nonfinite": 1.0 - finite.astype(jnp.float32)}
