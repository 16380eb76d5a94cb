"""Masked-diffusion SFT (the LLaDA SFT loss, `docs/llada.md` §8) for warm starts before RL.

Per sequence b: t ~ U(0,1), p = (1−ε)t + ε, each completion position (EOS padding included)
masked w.p. p, prompt never masked;

  loss = (1/B) Σ_b (1/|completion_b|) Σ_{i masked} −log p_θ(x0_i | x_t) / p_b.

It reuses the t-iid mask law and the ELBO term of `dmpo_jax.diffusion`, so the SFT loss is
exactly −(1/B) Σ_b elbo_term_b / |completion_b|.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dmpo_jax.diffusion import elbo, masking
from dmpo_jax.models import lora
from dmpo_jax.rl import train_state as ts, train_step


def sft_loss(graphdef: Any, params: Any, batch: dict[str, jax.Array], key: jax.Array,
             step: jax.Array) -> jax.Array:
  """LLaDA SFT loss of a batch with ``sequences``, ``attention_mask``, ``completion_mask``."""
  model = nnx.merge(graphdef, params)
  eligible = batch["completion_mask"] & batch["attention_mask"]
  keys = masking.mask_keys(key, step, jnp.arange(batch["sequences"].shape[0]), "sft")
  sample = masking.t_iid_mask(keys, eligible, 0)
  terms = elbo.elbo_term(model, batch["sequences"], sample, batch["attention_mask"])
  lengths = jnp.maximum(jnp.sum(eligible, axis=-1), 1).astype(jnp.float32)
  return -jnp.mean(terms / lengths)


def sft_step(graphdef: Any, optimizer: optax.GradientTransformation, state: ts.TrainState,
             batch: dict[str, jax.Array]) -> tuple[ts.TrainState, dict[str, jax.Array]]:
  """One SFT update (pure; jit with graphdef and optimizer static). Non-finite steps are skipped."""
  loss, grads = lora.value_and_grad_trainable(
      lambda params: sft_loss(graphdef, params, batch, state.key, state.step))(state.params)
  state, metrics = ts.apply_gradients(state, grads, optimizer, loss)
  return state, {"sft/loss": loss, **{k.replace("train/", "sft/"): v for k, v in metrics.items()}}


def jit_sft_step(graphdef: Any, optimizer: optax.GradientTransformation, state_shardings: Any):
  """`sft_step` jitted with the state sharded in and out and donated, traced on the state's mesh
  (activations split over the batch axes, `train_step.on_mesh`); it may be traced once
  (`train_step.traced_once`)."""
  def step(state, batch):
    return sft_step(graphdef, optimizer, state, batch)
  mesh = train_step.mesh_of(state_shardings)
  return jax.jit(train_step.on_mesh(train_step.traced_once(step), mesh), donate_argnums=0,
                 out_shardings=(state_shardings, None))
