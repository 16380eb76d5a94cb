"""LoRA adapters for the stacked transformer (Hu et al. 2021; `docs/algorithms.md` §2.5-§2.6, §2.8).

A target kernel W (input dims -> output dims, stacked over layers) gets two factors

  A: [layers, *input dims, r]  ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))  (PEFT's kaiming-uniform, a=sqrt(5))
  B: [layers, r, *output dims] = 0

and the adapted output is  y = x W + ((x A) B) · alpha / r.  B = 0 at initialisation, so the
adapted model starts equal to the base. Targets use LLaDA's checkpoint names (`docs/llada.md` §3,
`ModelConfig.lora_targets`): q_proj, k_proj, v_proj, attn_out, ff_proj (gate), up_proj, ff_out
(down); HF-Llama names o_proj, gate_proj, down_proj are aliases.

Adapters are `nnx.LoRAParam` variables (a subclass of `nnx.Param`) at
``model.blocks.lora.<param>.{a,b}`` (``<param>`` = the Flax kernel name: q_proj ... down_proj).
They are stored in float32 whatever the base dtype (small; PEFT also keeps adapters in fp32) and
cast to the compute dtype in the forward.

Pure helpers over `nnx.State` (all jit-friendly):

* `disabled(params)`: the same state with every B zeroed: the base model with adapters off, the
  reference policy of LoRA fine-tuning (`docs/algorithms.md` §2.5 row 11). Base arrays are shared.
* `split_trainable(params)` / `merge_trainable(trainable, frozen)`: adapters vs everything else;
  without adapters everything is trainable (full fine-tuning).
* `value_and_grad_trainable(fn)`: ``jax.value_and_grad`` w.r.t. the trainable part only.
* `merge_into_base(params, config)`: W + A B · alpha / r folded into the base kernels (export).

Model-level helpers: `add_adapters(model, ...)` (attach freshly initialised adapters to a loaded
base model) and `merged_model(model)` (a plain ``lora_rank = 0`` model, e.g. for
`hf_io.save_pretrained`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmpo_jax.models.config import ModelConfig

LORA_ATTR = "lora"
"""Attribute of `Blocks` holding the adapters (absent when ``config.lora_rank == 0``)."""

# Logical axes of the input / output dims of each adaptable kernel (as in `transformer.Blocks`).
_KERNEL_AXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "q_proj": (("embed",), ("heads", "head_dim")),
    "k_proj": (("embed",), ("kv_heads", "head_dim")),
    "v_proj": (("embed",), ("kv_heads", "head_dim")),
    "o_proj": (("heads", "head_dim"), ("embed",)),
    "gate_proj": (("embed",), ("mlp",)),
    "up_proj": (("embed",), ("mlp",)),
    "down_proj": (("mlp",), ("embed",)),
}
_LETTERS = "ijklmn"  # einsum letters of a kernel's input/output dims


# A LoRA factor: flax's own variable type (an `nnx.Param`), so ``state.split(LoRAParam, ...)``
# separates adapters from base weights. `nnx.LoRA` itself does not serve: it is one 2-D
# in_features -> out_features layer, while these factors are stacked over layers with
# multi-axis kernels ([L, D, H, hd]), logical sharding axes and PEFT's initialisation.
LoRAParam = nnx.LoRAParam


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_factors(key: jax.Array, shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...],
                  rank: int, n_layers: int) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{kernel: (A, B)}: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform with
  a = sqrt(5)), B = 0. One compiled function for all targets (eager init compiles per shape)."""
  sizes = [n_layers * math.prod(fan_in) * rank for _, fan_in, _ in shapes]
  # One uniform draw sliced per target: a single threefry kernel to compile (it dominates).
  unit = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = {}, 0
  for (kernel, fan_in, fan_out), size in zip(shapes, sizes):
    bound = 1.0 / math.sqrt(math.prod(fan_in))
    a = unit[start:start + size].reshape(n_layers, *fan_in, rank) * bound
    out[kernel] = (a, jnp.zeros((n_layers, rank, *fan_out), jnp.float32))
    start += size
  return out


class Adapter(nnx.Module):
  """The factors of one target kernel, stacked over layers: a [L, *in, r], b [L, r, *out]."""

  def __init__(self, kernel: str, a: jax.Array, b: jax.Array):
    in_axes, out_axes = _KERNEL_AXES[kernel]
    self.a = LoRAParam(a, logical_axes=("layers", *in_axes, "lora_rank"))
    self.b = LoRAParam(b, logical_axes=("layers", "lora_rank", *out_axes))


class LoRA(nnx.Module):
  """All adapters of a model: one `Adapter` attribute per target, named by its Flax kernel."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.lora_rank <= 0:
      raise ValueError("LoRA adapters need config.lora_rank > 0")
    shapes = tuple((kernel, tuple(fan_in), tuple(fan_out))
                   for kernel, (fan_in, fan_out) in config.lora_shapes().items())
    factors = _init_factors(rngs.params(), shapes, config.lora_rank, config.n_layers)
    for kernel, (a, b) in factors.items():
      setattr(self, kernel, Adapter(kernel, a, b))

  def stacked(self) -> dict[str, dict[str, jax.Array]]:
    """{kernel name: {"a": [L, *in, r], "b": [L, r, *out]}} (scanned over layers with the base)."""
    return {name: {"a": adapter.a[...], "b": adapter.b[...]}
            for name, adapter in vars(self).items() if isinstance(adapter, Adapter)}


def adapter_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """((x A) · scale) B for one layer: x [B, T, *in], a [*in, r], b [r, *out] -> [B, T, *out].

  The scale multiplies the rank-r intermediate (cheapest place); the factors are cast to x's dtype.
  """
  n_in, n_out = a.ndim - 1, b.ndim - 1
  ins, outs = _LETTERS[:n_in], _LETTERS[n_in:n_in + n_out]
  low = jnp.einsum(f"bt{ins},{ins}r->btr", x, a.astype(x.dtype))
  return jnp.einsum(f"btr,r{outs}->bt{outs}", low * jnp.asarray(scale, x.dtype), b.astype(x.dtype))


# ------------------------------------------------------------------------------------------------
# Pure state helpers
# ------------------------------------------------------------------------------------------------

def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _last_key(path) -> str:
  entry = path[-1]
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def has_adapters(params: Any) -> bool:
  """Whether a state (or any pytree of variables) holds `LoRAParam` leaves."""
  return any(isinstance(v, LoRAParam)
             for v in jax.tree.leaves(params, is_leaf=_is_variable))


def disabled(params: nnx.State) -> nnx.State:
  """The same state with every B factor zeroed: the forward equals the base model exactly
  (x W + ((x A) · s) 0 = x W). Base arrays are shared, not copied; only the B zeros are new.

  Use it inside the jitted function that needs the reference (the train state is donated, so a
  reference built outside from the same arrays would be invalidated by the first update).
  """
  if not has_adapters(params):
    raise ValueError("disabled(params): the state has no LoRA adapters (LoRAParam); with full "
                     "fine-tuning the reference model is a frozen copy of the initial params")

  def zero_b(path, variable):
    if isinstance(variable, LoRAParam) and _last_key(path) == "b":
      return variable.replace(jnp.zeros_like(variable.get_value()))
    return variable
  return jax.tree_util.tree_map_with_path(zero_b, params, is_leaf=_is_variable)


def split_trainable(params: Any) -> tuple[Any, Optional[nnx.State]]:
  """(trainable, frozen). With adapters: (the `LoRAParam` leaves, every other leaf); without:
  (params, None), i.e. full fine-tuning. Pure; works on concrete, traced or abstract states."""
  if not isinstance(params, nnx.State) or not has_adapters(params):
    return params, None
  trainable, frozen = params.split(LoRAParam, ...)
  return trainable, frozen


def merge_trainable(trainable: Any, frozen: Optional[nnx.State]) -> Any:
  """Inverse of `split_trainable` (same tree structure as the original state)."""
  if frozen is None:
    return trainable
  return nnx.merge_state(trainable, frozen)


def value_and_grad_trainable(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """``jax.value_and_grad(fn)`` w.r.t. the trainable part of its first argument only.

  ``g(params, *args) -> (value, grads)`` where grads has the structure of
  ``split_trainable(params)[0]``; the frozen part is closed over, so no cotangent (and no
  parameter-sized gradient buffer) is computed for base weights under LoRA.
  """
  def wrapped(params, *args):
    trainable, frozen = split_trainable(params)
    return jax.value_and_grad(lambda t, *a: fn(merge_trainable(t, frozen), *a),
                              has_aux=has_aux)(trainable, *args)
  return wrapped


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays / variables."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def _check_config_matches(params: nnx.State, config: ModelConfig) -> None:
  lora = params["blocks"][LORA_ATTR] if "blocks" in params and LORA_ATTR in params["blocks"] else None
  expected = set(config.lora_shapes())
  found = set() if lora is None else set(lora.keys())
  if found != expected:
    raise ValueError(f"LoRA adapters in the state {sorted(found)} do not match config.lora_targets "
                     f"{config.lora_targets} (kernels {sorted(expected)})")


def merge_into_base(params: nnx.State, config: ModelConfig) -> nnx.State:
  """Base params with every adapter folded in: W_l <- W_l + A_l B_l · alpha / r (fp32 product,
  cast to W's dtype), adapters removed. The result is the state of a ``lora_rank = 0`` model."""
  _check_config_matches(params, config)
  trainable, base = split_trainable(params)
  if base is None:
    return params
  scale = config.lora_scale
  blocks = base["blocks"]
  for kernel, adapter in trainable["blocks"][LORA_ATTR].items():
    a, b = adapter["a"].get_value(), adapter["b"].get_value()
    n_in, n_out = a.ndim - 2, b.ndim - 2
    ins, outs = _LETTERS[:n_in], _LETTERS[n_in:n_in + n_out]
    delta = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a.astype(jnp.float32),
                       b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale
    kernel_var = blocks[kernel]
    w = kernel_var.get_value()
    blocks[kernel] = kernel_var.replace((w.astype(jnp.float32) + delta).astype(w.dtype))
  return base


# ------------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------------

def add_adapters(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str],
                 seed: int = 0) -> nnx.Module:
  """A new model sharing ``model``'s base weights, with fresh adapters (B = 0, so it computes the
  same function) and ``config.lora_{rank,alpha,targets}`` set. ``model`` must have no adapters.
  Place the result's state with `dmpo_jax.sharding.state_shardings` as usual (``lora_rank`` axis)."""
  if model.config.lora_rank:
    raise ValueError(f"model already has LoRA adapters (rank {model.config.lora_rank})")
  config = model.config.replace(lora_rank=int(rank), lora_alpha=float(alpha),
                                lora_targets=tuple(targets))
  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state)  # a new module tree over the same arrays
  new.config = config
  setattr(new.blocks, LORA_ATTR, LoRA(config, rngs=nnx.Rngs(params=seed)))
  return new


def merged_model(model: nnx.Module) -> nnx.Module:
  """A ``lora_rank = 0`` model whose kernels have the adapters folded in (`merge_into_base`):
  the form to export with `hf_io.save_pretrained` (which writes base tensors only)."""
  config = model.config
  if not config.lora_rank:
    return model
  base_config = config.replace(lora_rank=0, lora_targets=())
  abstract = nnx.eval_shape(lambda: type(model)(base_config, rngs=nnx.Rngs(params=0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, merge_into_base(nnx.split(model)[1], config))
