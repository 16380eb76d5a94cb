"""The sampling layout: the policy resharded once per RL step for the rollout's many small
forward passes (`docs/scaling.md` §2).

Training stores the weights FSDP-split (`sharding.TRAIN_RULES`): a forward pass all-gathers every
weight. A rollout makes one forward pass per denoising step (256 per rollout for ``bgpo_math``),
so on the training layout it would move all the weights 256 times. The sampler runs instead on a
copy in the compute layout (`sharding.SAMPLING_RULES`: ``embed`` unsplit) on a mesh of the same
devices shaped ``(data = N / k, fsdp = 1, tensor = k)``:

* ``k = 1``: the weights are replicated, every device samples its own rows; a denoising step
  moves no weights at all;
* ``k > 1`` (the weights do not fit on one device next to the training state): heads, KV heads,
  MLP and vocabulary are split over ``tensor`` groups of k devices (Megatron-style), and a step
  all-reduces activations within a group (2 per layer) instead of gathering weights.

The copy is made once per RL step (`reshard`), used by every denoising step of the rollout (and
by evaluation), and dropped afterwards. With one device, or when training is data-parallel only,
it is the training layout itself: `reshard` then returns the same buffers (no copy).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from dmpo_jax import sharding

# The sampling copy may take at most this share of what the training state leaves free on a
# device; the rest is for the sampler's activations (KV, logits, attention).
WEIGHT_SHARE_OF_FREE = 0.5


@dataclasses.dataclass(frozen=True)
class SamplingLayout:
  """Where the rollout sampler's weights and rows live."""
  mesh: Mesh      # the training mesh's devices as (data = N / tensor, fsdp = 1, tensor)
  tensor: int

  def param_shardings(self, params: Any) -> Any:
    return sharding.state_shardings(params, self.mesh, sharding.SAMPLING_RULES)

  def batch_sharding(self, ndim: int = 2) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh, ndim)

  @property
  def batch_divisor(self) -> int:
    return sharding.batch_divisor(self.mesh)


def sampling_mesh(train_mesh: Mesh, tensor: int) -> Mesh:
  """The training mesh's devices (same order) as a ``(N / tensor, 1, tensor)`` mesh: consecutive
  devices form a tensor group."""
  devices = np.asarray(train_mesh.devices).reshape(-1)
  if tensor < 1 or len(devices) % tensor:
    raise ValueError(f"sampling tensor parallelism {tensor} does not divide the {len(devices)} "
                     "devices")
  # Reshaped as they are, not through `jax.make_mesh`: the groups must be consecutive devices of
  # the training mesh, which already follows the topology.
  return Mesh(devices.reshape(len(devices) // tensor, 1, tensor), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def valid_tensor_sizes(model_config: Any, num_devices: int) -> list[int]:
  """Tensor-group sizes k that divide the device count, the heads, KV heads, MLP width and
  vocabulary (so every split weight splits evenly), in increasing order."""
  dims = (model_config.n_heads, model_config.n_kv_heads, model_config.mlp_hidden_size,
          model_config.vocab_size)
  return [k for k in range(1, num_devices + 1)
          if num_devices % k == 0 and all(d % k == 0 for d in dims)]


def choose_tensor(model_config: Any, num_devices: int, weight_bytes: int,
                  device_bytes: Optional[int], resident_bytes: int) -> int:
  """The smallest tensor-group size whose weight share fits: weight_bytes / k at most
  `WEIGHT_SHARE_OF_FREE` of (device_bytes − resident_bytes). Unknown device memory (CPU): 1."""
  sizes = valid_tensor_sizes(model_config, num_devices)
  if device_bytes is None:
    return 1
  budget = WEIGHT_SHARE_OF_FREE * (device_bytes - resident_bytes)
  for k in sizes:
    if weight_bytes / k <= budget:
      return k
  return sizes[-1]


def device_memory_bytes(device: Any) -> Optional[int]:
  """The device's memory limit from the runtime (None where it reports none, e.g. CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def layout_for(train_mesh: Mesh, model_config: Any, requested: int, weight_bytes: int,
               resident_bytes: int, device_bytes: Optional[int] = None) -> SamplingLayout:
  """The sampling layout on ``train_mesh``'s devices: ``requested`` tensor-group size, or
  (``requested = 0``) `choose_tensor` with the first device's memory."""
  num_devices = train_mesh.devices.size
  if requested:
    if requested not in valid_tensor_sizes(model_config, num_devices):
      raise ValueError(f"mesh.sampling_tensor={requested} must divide the {num_devices} devices, "
                       f"the heads ({model_config.n_heads}), KV heads ({model_config.n_kv_heads}), "
                       f"MLP width ({model_config.mlp_hidden_size}) and vocabulary "
                       f"({model_config.vocab_size})")
    tensor = requested
  else:
    if device_bytes is None:
      device_bytes = device_memory_bytes(np.asarray(train_mesh.devices).flat[0])
    tensor = choose_tensor(model_config, num_devices, weight_bytes, device_bytes, resident_bytes)
  return SamplingLayout(sampling_mesh(train_mesh, tensor), tensor)


def layout_for_training(train_mesh: Mesh, model_config: Any, requested: int, params: Any,
                        resident: tuple[Any, ...]) -> SamplingLayout:
  """`layout_for` the trainer: ``resident`` = the trees that stay on the devices while sampling
  (train state, reference copy)."""
  return layout_for(train_mesh, model_config, requested, param_bytes(params),
                    sum(per_device_bytes(tree) for tree in resident))


def inference_layout(model_config: Any, params: Any, tensor: int = 0,
                     devices: Optional[list[Any]] = None) -> SamplingLayout:
  """The sampling layout over every device (or ``devices``) for evaluation / generation alone
  (nothing else resident): replicated when the weights fit (``tensor = 0``: auto)."""
  mesh = sharding.create_mesh((1, -1, 1), devices=devices)
  return layout_for(mesh, model_config, tensor, param_bytes(params), 0)


def reshard(params: Any, layout: SamplingLayout) -> Any:
  """The sampling copy of ``params`` (leaves already in the target layout are not copied)."""
  return jax.device_put(params, layout.param_shardings(params))


def generate(layout: SamplingLayout, graphdef: Any, params: Any, prompt_ids: Any,
             prompt_mask: Any, key: jax.Array, config: Any, sampler: Any = None) -> Any:
  """``sampler(graphdef, params, ids, mask, key, config)`` (default: the LLaDA sampler) on the
  sampling layout: prompts placed split over its batch axes, traced with its mesh in scope (so
  the model pins its activations to the rows). ``params`` should come from `reshard`."""
  if sampler is None:
    from dmpo_jax.diffusion import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
    sampler = sampler_lib.generate
  ids = _put_rows(prompt_ids, layout)
  mask = _put_rows(prompt_mask, layout)
  # Every input on the sampling mesh: a multi-process run's key is a global array of the
  # training mesh (device_put cannot move an array that other processes hold; jit can).
  if getattr(getattr(key, "sharding", None), "mesh", layout.mesh) != layout.mesh:
    key = jax.jit(lambda k: k, out_shardings=sharding.replicated(layout.mesh))(key)
  with jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh):
    return sampler(graphdef, params, ids, mask, key, config)


def _put_rows(array: Any, layout: SamplingLayout) -> jax.Array:
  """Rows split over the batch axes when they divide, else replicated on the layout's mesh (a
  global array of several processes is resharded, not gathered)."""
  rows = np.shape(array)[0]
  target = (layout.batch_sharding(np.ndim(array)) if rows % layout.batch_divisor == 0
            else sharding.replicated(layout.mesh))
  return jax.device_put(array, target)


def param_bytes(params: Any) -> int:
  """Total bytes of a pytree of arrays (or `ShapeDtypeStruct`s)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays or `ShapeDtypeStruct`s (its shard of
  each leaf; a leaf without a sharding counts whole)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    leaf_sharding = getattr(leaf, "sharding", None)
    shape = leaf_sharding.shard_shape(leaf.shape) if leaf_sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total
