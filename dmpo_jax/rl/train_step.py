"""The pure RL train step and its ahead-of-time compilation (`docs/architecture.md` §3).

  rl_update(state, batch, per_example, rollout_step, iteration) -> (state, metrics)

computes the objective's gradients (`objective.grads`: loop accumulation over MC samples and
micro-batches) and applies one AdamW update, skipping it when the loss or a gradient is not
finite. It is jitted with the state's shardings in and out and the state donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from dmpo_jax import sharding
from dmpo_jax.models import lora
from dmpo_jax.rl import registry, scoring, train_state as ts


def rl_update(graphdef: Any, objective: registry.Objective, objective_config: Any,
              optimizer: optax.GradientTransformation, state: ts.TrainState,
              batch: dict[str, jax.Array], per_example: dict[str, jax.Array],
              rollout_step: jax.Array, iteration: jax.Array) -> tuple[ts.TrainState, dict[str, jax.Array]]:
  """One optimizer update on a prepared rollout (see module docstring).

  Mask keys: shared-per-rollout masks use ``rollout_step``; fresh per-update masks use the state's
  step, so a resumed run draws the same masks as an uninterrupted one.
  """
  keys = scoring.make_keys(state.key, rollout_step, state.step, iteration)
  aux = registry.Prepared(per_example, {})
  grads, out = objective.grads(graphdef, state.params, batch, aux, keys, objective_config)
  state, step_metrics = ts.apply_gradients(state, grads, optimizer, out.loss)
  return state, {**{f"train/{k}": v for k, v in out.metric_values().items()}, **step_metrics}


def prepare_rollout(graphdef: Any, objective: registry.Objective, objective_config: Any,
                    params: Any, ref_params: Any, batch: dict[str, jax.Array], base_key: jax.Array,
                    rollout_step: jax.Array) -> registry.Prepared:
  """No-grad scoring of a rollout (old / reference ELBO terms, advantages or weights).

  ``ref_params=None`` with a LoRA model: the reference is the base with adapters disabled
  (`lora.disabled`), built here inside the jitted function so it shares the base weights.
  """
  if ref_params is None and lora.has_adapters(params):
    ref_params = lora.disabled(params)
  keys = scoring.make_keys(base_key, rollout_step, 0, 0)
  return objective.prepare(graphdef, params, ref_params, batch, keys, objective_config)


def state_shardings(init: Callable[[Any], ts.TrainState], params: Any,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(abstract `TrainState`, its shardings) of ``init(params)`` (`train_state.init_train_state`
  with its optimizer bound) on ``mesh``.

  optax keeps the AdamW moments (and the master weights) as `nnx.State`s that carry the
  parameters' ``logical_axes``, so they are split exactly like the parameters (FSDP over
  ``embed``, ...); without explicit output shardings XLA would replicate the zeros that
  initialise them on every device.
  """
  abstract_state = jax.eval_shape(init, params)
  return abstract_state, sharding.state_shardings(abstract_state, mesh)


def on_mesh(fn: Callable, mesh: Optional[jax.sharding.Mesh]) -> Callable:
  """``fn`` traced with ``mesh`` as the ambient (abstract) mesh, so the model pins activations to
  the batch split and gathers weights to their compute layout (`sharding.constrain_batch`,
  `sharding.gather_for_compute`); ``fn`` itself without a mesh."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def mesh_of(shardings: Any) -> Optional[jax.sharding.Mesh]:
  """The mesh of the first `NamedSharding` in a pytree of shardings (None without one)."""
  meshes = [s.mesh for s in jax.tree.leaves(shardings)
            if isinstance(s, jax.sharding.NamedSharding)]
  return meshes[0] if meshes else None


def jit_rl_update(graphdef: Any, objective: registry.Objective, objective_config: Any,
                  optimizer: optax.GradientTransformation, state_shardings: Any) -> Callable:
  """`rl_update` jitted with the state sharded in and out and donated. It is traced on the
  state's mesh (`on_mesh`): activations split over the batch axes, the gradient accumulator
  split like the parameters (`sharding.constrain_logical`)."""
  fn = functools.partial(rl_update, graphdef, objective, objective_config, optimizer)
  return jax.jit(on_mesh(fn, mesh_of(state_shardings)), donate_argnums=0,
                 out_shardings=(state_shardings, None))


def traced_once(fn: Callable) -> Callable:
  """``fn`` (a plain function, to be jitted) under `chex.assert_max_traces` with n = 1: a second
  trace, which would recompile every step (new shapes, dtypes or static values), raises.

  chex counts traces per definition site, process-wide, so the count restarts here: each call
  makes a new jitted function (one per trainer)."""
  chex.clear_trace_counter()
  return chex.assert_max_traces(fn, n=1)


def jit_prepare(graphdef: Any, objective: registry.Objective, objective_config: Any,
                mesh: Optional[jax.sharding.Mesh]) -> Callable:
  """`prepare_rollout` jitted and traced on ``mesh`` (`on_mesh`); it may be traced once
  (`traced_once`)."""
  def prepare(params, ref_params, batch, base_key, rollout_step):
    return prepare_rollout(graphdef, objective, objective_config, params, ref_params, batch,
                           base_key, rollout_step)
  return jax.jit(on_mesh(traced_once(prepare), mesh))


def compile_ahead_of_time(jitted: Callable, *args) -> tuple[Any, dict[str, int]]:
  """Lowers and compiles ``jitted`` for ``args`` (arrays or `jax.ShapeDtypeStruct`s) and returns
  the compiled executable with its memory analysis (temp / argument / output bytes)."""
  compiled = jitted.lower(*args).compile()
  analysis = compiled.memory_analysis()
  info = {}
  if analysis is not None:
    for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
      if hasattr(analysis, name):
        info[f"compile/{name}"] = int(getattr(analysis, name))
  return compiled, info


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings) of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


SCALAR_INT32 = jax.ShapeDtypeStruct((), jnp.int32)
