"""Device mesh and logical-axis sharding rules (`docs/scaling.md` §1).

Parameters carry ``logical_axes`` metadata (e.g. ``('vocab', 'embed')``). A rule set maps each
logical axis to a mesh axis (or ``None`` = replicated) of a ``('data', 'fsdp', 'tensor')`` mesh:

* training rules (`TRAIN_RULES`): how weights are stored: FSDP over ``embed``, tensor
  parallelism over heads / MLP / vocab;
* compute rules (`SAMPLING_RULES`): the layout a weight is used in: whole over the batch axes
  (``embed`` unsplit), still split over ``tensor``. Inside the model every weight is gathered to
  it just before its matmul (`gather_for_compute`); the rollout sampler gets the policy resharded
  to it once per RL step (`dmpo_jax.sampling_layout`), so its denoising steps gather nothing.

Activations are split over the batch axes ``('data', 'fsdp')`` from the embedding output on
(`constrain_batch`): with FSDP every device computes its own rows with the gathered weights, and
weight gradients are reduce-scattered back to the storage layout (`docs/scaling.md`).

A dimension that the mesh axis size does not divide is replicated instead (tiny models on big
meshes), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxis = Union[None, str, tuple[str, ...]]

TRAIN_RULES: dict[str, MeshAxis] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # LoRA factors: rank is tiny, never sharded.
    "lora_rank": None,
}

SAMPLING_RULES: dict[str, MeshAxis] = {**TRAIN_RULES, "embed": None}


def create_mesh(shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
                axis_names: Sequence[str] = MESH_AXES,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds a mesh; one axis may be -1 to take the remaining devices.

  ``shape`` is either a sequence aligned with ``axis_names`` or a mapping ``{axis: size}``
  (missing axes get size 1). The devices are placed by `jax.make_mesh`, which orders them by the
  physical topology (TPU rings, GPU slices; CPU devices keep their order). Every axis is
  ``AxisType.Auto``: the code shards through ``NamedSharding`` in/out and
  ``with_sharding_constraint``, whereas `jax.make_mesh` defaults to ``Explicit`` axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices), axis_names)
  return jax.make_mesh(sizes, tuple(axis_names), axis_types=(AxisType.Auto,) * len(sizes),
                       devices=devices)


def resolve_mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> list[int]:
  """Axis sizes aligned with ``axis_names``; a -1 axis takes the remaining devices.

  ``shape`` is a sequence aligned with ``axis_names`` or a mapping ``{axis: size}`` (missing axes
  get size 1). Raises ValueError when the sizes cannot use exactly ``num_devices`` devices.
  """
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(axis_names)
    if unknown:
      raise ValueError(f"Mesh shape names unknown axes {sorted(unknown)}; axes are {tuple(axis_names)}")
    sizes = [int(shape.get(name, 1)) for name in axis_names]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(axis_names):
      raise ValueError(f"Mesh shape {tuple(sizes)} does not match axis names {tuple(axis_names)}")
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {tuple(sizes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot fill mesh {tuple(sizes)} (fixed part {known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"Mesh {dict(zip(axis_names, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} available")
  return sizes


def partition_spec(shape: Sequence[int], logical_axes: Optional[Sequence[Optional[str]]],
                   rules: Mapping[str, MeshAxis], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec of one array from its logical axes under ``rules`` on ``mesh``."""
  if logical_axes is None:
    return PartitionSpec()
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical_axes):
    if name is not None and name not in rules:
      raise KeyError(f"No sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
    target = None if name is None else rules[name]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or size == 1 or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxis] = TRAIN_RULES) -> Any:
  """NamedShardings with the same tree structure as an `nnx.State` (or abstract state).

  Leaves without ``logical_axes`` metadata are replicated.
  """
  def one(variable):
    if not _is_variable(variable):
      return NamedSharding(mesh, PartitionSpec())
    value = variable.get_value()
    axes = variable.get_metadata().get("logical_axes")
    return variable.replace(NamedSharding(mesh, partition_spec(value.shape, axes, rules, mesh)))
  return jax.tree.map(one, state, is_leaf=_is_variable)


def constrain_logical(tree: Any, rules: Mapping[str, MeshAxis] = TRAIN_RULES) -> Any:
  """Pins every `nnx.Variable` of ``tree`` (inside ``jit``) to the sharding of its
  ``logical_axes`` under ``rules`` on the ambient mesh (`jax.sharding.use_abstract_mesh`, as
  `train_step.jit_rl_update` sets it); the identity without one, or for leaves without axes.

  Used for buffers XLA would otherwise be free to replicate, such as the fp32 gradient
  accumulator of `grad.accumulate_gradients` (created from zeros, so nothing propagates a
  sharding to it): pinned, it is split like the parameters and each sample's gradient is
  reduce-scattered into it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tree

  def one(variable):
    if not _is_variable(variable):
      return variable
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      return variable
    value = variable.get_value()
    spec = partition_spec(value.shape, axes, rules, mesh)
    return variable.replace(jax.lax.with_sharding_constraint(value, spec))
  return jax.tree.map(one, tree, is_leaf=_is_variable)


def _ambient_mesh() -> Optional[jax.sharding.AbstractMesh]:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def batch_axes(mesh: Any) -> tuple[str, ...]:
  """The batch mesh axes of ``mesh`` of size > 1, in `BATCH_AXES` order."""
  return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins ``x`` (inside ``jit``) to rows split over the batch axes of the ambient mesh, every other
  dimension unsplit; the identity without a mesh or when the rows do not divide.

  Placed on the residual stream (embedding output, each layer, final norm): without it XLA may
  take an activation's layout from a weight's (the embedding lookup from the table's ``embed``
  split) and then every device holds every row.
  """
  mesh = _ambient_mesh()
  if mesh is None or x.ndim == 0:
    return x
  axes = batch_axes(mesh)
  size = math.prod(mesh.shape[a] for a in axes)
  if not axes or x.shape[0] % size:
    return x
  spec = PartitionSpec(axes if len(axes) > 1 else axes[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def weight_specs(shape: Sequence[int], logical_axes: Optional[Sequence[Optional[str]]]
                 ) -> Optional[tuple[PartitionSpec, PartitionSpec]]:
  """(compute spec, storage spec) of a weight on the ambient mesh (`SAMPLING_RULES`,
  `TRAIN_RULES`); None without a mesh or logical axes."""
  mesh = _ambient_mesh()
  if mesh is None or logical_axes is None:
    return None
  return (partition_spec(shape, logical_axes, SAMPLING_RULES, mesh),
          partition_spec(shape, logical_axes, TRAIN_RULES, mesh))


def batch_partials(shape: Sequence[int], spec: Optional[PartitionSpec], rows: int
                   ) -> tuple[int, Optional[PartitionSpec]]:
  """(S, spec) for per-device partial sums over rows of an array of ``shape``: S = the number of
  batch shards of the ambient mesh, and ``spec`` puts a leading [S] axis on the batch axes in
  front of ``spec`` (the array's own layout). (1, None) without a mesh or when ``rows`` does not
  divide (`constrain_batch` leaves such rows unsplit)."""
  mesh = _ambient_mesh()
  if mesh is None:
    return 1, None
  axes = batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  if not axes or rows % shards:
    return 1, None
  rest = tuple(spec) + (None,) * (len(shape) - len(spec)) if spec is not None else (None,) * len(shape)
  return shards, PartitionSpec(axes if len(axes) > 1 else axes[0], *rest)


def gather_for_compute(weight: jax.Array, logical_axes: Optional[Sequence[Optional[str]]],
                       dtype: Any = None, reduce_dtype: Any = None) -> jax.Array:
  """``weight`` cast to ``dtype`` and gathered (inside ``jit``) from its storage layout
  (`TRAIN_RULES`) to the compute layout (`SAMPLING_RULES`) of the ambient mesh.

  The cast comes first, so the all-gather moves compute-dtype bytes. The gradient goes the other
  way: the cotangent (each device's partial sum over its rows) is cast to ``reduce_dtype``
  (default: the compute dtype), reduce-scattered to the storage layout, and cast to the weight's
  dtype. With ``reduce_dtype=float32`` the sum over devices runs in fp32 and is rounded once
  (each device's partial sum is rounded by its matmul, as on one device). Without a mesh: the
  cast alone.
  """
  dtype = jnp.dtype(weight.dtype if dtype is None else dtype)
  specs = weight_specs(weight.shape, logical_axes)
  if specs is None:
    return weight.astype(dtype)
  reduce = jnp.dtype(dtype if reduce_dtype is None else reduce_dtype)
  return _gather(weight, specs[0], specs[1], dtype, reduce, jnp.dtype(weight.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _gather(weight, gathered, stored, dtype, reduce_dtype, weight_dtype):
  del stored, reduce_dtype, weight_dtype
  return jax.lax.with_sharding_constraint(weight.astype(dtype), gathered)


def _gather_fwd(weight, gathered, stored, dtype, reduce_dtype, weight_dtype):
  return _gather(weight, gathered, stored, dtype, reduce_dtype, weight_dtype), None


def _gather_bwd(gathered, stored, dtype, reduce_dtype, weight_dtype, _, cotangent):
  del gathered, dtype
  reduced = jax.lax.with_sharding_constraint(cotangent.astype(reduce_dtype), stored)
  return (reduced.astype(weight_dtype),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays are split over ('data', 'fsdp') on their leading dimension."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (the product of the batch mesh axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
