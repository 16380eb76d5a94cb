"""Memory-efficient bidirectional attention with a key-padding mask, chosen per platform.

All implementations compute, per batch row b, query t and head h (`docs/llada.md` §2.1)

    out[b, t, h] = Σ_s softmax_s(q[b, t, h] · k[b, s, g(h)] / √hd  over s with key_mask[b, s]) v[b, s, g(h)]

(g(h) = h // (H / Hkv) for GQA; queries at padded positions are computed like any other, only
the keys are masked). They differ in what they materialise:

* ``xla``: `jax.nn.dot_product_attention(implementation="xla")`, fp32 scores [B, H, T, S] in
  HBM (`layers.attention`). Runs everywhere; the reference for the others.
* ``cudnn``: cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`,
  NVIDIA GPUs, bf16 / fp16). cuDNN's mask is a per-row key *length* (keys [0, len) attend), so
  each row's keys and values are first stably reordered real-first (`keys_real_first`): the
  softmax-weighted sum over keys does not depend on their order, so this is exact for any key
  mask, left padding included, and no [B, 1, T, S] bias is built.
* ``splash``: the Pallas splash-attention kernel on TPU (`jax.experimental.pallas.ops.tpu.
  splash_attention`, flash-style tiles in VMEM, its own backward kernels). The key mask becomes
  segment ids: every query has segment 0, a real key 0 and a masked key 1, and the kernel lets
  only equal ids attend, which is exactly the key-padding mask. Lengths are padded up to the
  128-row tile (padded keys masked, padded queries dropped); query windows shorter than one tile
  (the dual cache's block steps, [B, H, 32, S] scores) take the ``xla`` path. On CPU the same
  kernel runs in Pallas interpret mode (tests), chosen at lowering by `jax.lax.platform_dependent`
  so that an ahead-of-time compile for a TPU topology gets the real kernel. The compiler cannot
  partition a Pallas kernel: inside a mesh context (`jax.sharding.get_abstract_mesh`, set by
  `jax.sharding.use_abstract_mesh` or `jax.set_mesh`) it runs under `jax.shard_map`, split over
  the batch axes and, when the head counts allow, ``tensor``; outside one it runs as is, which
  is right on one device only.
* ``auto``: ``splash`` on TPU inside a mesh context (else ``xla``), ``cudnn`` on GPU for bf16 /
  fp16, ``xla`` otherwise (`choose`; the platform is that of the context mesh's devices, so an
  ahead-of-time compile for a TPU topology from a CPU host gets splash, else
  `jax.default_backend()`).

A row whose keys are all masked is undefined (the XLA path averages every value, the kernels do
not); the transformer never builds one (the generation canvas is always real).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dmpo_jax.models import layers as L

IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_TILE = 128          # the kernel's lane width: sequence tiles are multiples of it
_SPLASH_BLOCKS = (512, 256, 128)
_BATCH_AXES = ("data", "fsdp")   # as `dmpo_jax.sharding.BATCH_AXES`
_HEAD_AXIS = "tensor"
_PLATFORM_IMPL = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_impl(impl: Optional[str], dtype, platform: Optional[str] = None) -> str:
  """The concrete implementation of ``impl`` (`IMPLS`; None = ``auto``) for ``platform``
  (default `jax.default_backend()`) and compute ``dtype``: ``auto`` -> ``splash`` on TPU,
  ``cudnn`` on GPU when the dtype is bf16 / fp16 (cuDNN's flash kernel has no fp32), else
  ``xla``. Explicit choices are returned as given."""
  impl = "auto" if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  chosen = _PLATFORM_IMPL.get(platform or jax.default_backend(), "xla")
  if chosen == "cudnn" and jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return "xla"
  return chosen


def choose(impl: Optional[str], dtype, query_length: int, has_mesh: bool,
           platform: Optional[str] = None) -> str:
  """The implementation one call runs: `resolve_impl`, except that splash falls back to XLA for
  query windows shorter than one tile, and ``auto`` does so outside a mesh context (a Pallas
  kernel cannot be partitioned by the compiler, so it needs the mesh to run under
  `jax.shard_map`; an explicit ``splash`` outside one runs the kernel as is, right on one
  device)."""
  chosen = resolve_impl(impl, dtype, platform)
  if chosen == "splash" and (query_length < SPLASH_TILE or (not has_mesh and impl in (None, "auto"))):
    return "xla"
  return chosen


def platform_error(impl: Optional[str], platform: str, dtype) -> Optional[str]:
  """Why ``impl`` cannot run on ``platform`` with compute ``dtype`` (None when it can): ``cudnn``
  needs a GPU and bf16 / fp16, ``splash`` a TPU (or CPU, interpreted)."""
  if impl == "cudnn":
    if platform not in ("gpu", "cuda"):
      return f"attention_impl='cudnn' needs an NVIDIA GPU; this process runs on {platform}"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
      return (f"attention_impl='cudnn' needs a bf16 or fp16 compute dtype, got "
              f"{jnp.dtype(dtype).name}")
  if impl == "splash" and platform not in ("tpu", "cpu"):
    return (f"attention_impl='splash' is a TPU kernel (interpreted on CPU); this process runs on "
            f"{platform}")
  return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array],
              impl: Optional[str] = "auto") -> jax.Array:
  """Bidirectional attention (module docstring). q: [B, T, H, hd]; k, v: [B, S, Hkv, hd] with H a
  multiple of Hkv; key_mask: [B, S] (True / 1 = real key) or None. Returns [B, T, H, hd] in
  q's dtype; scores and softmax statistics are fp32 in every implementation."""
  b, t, h, hd = q.shape
  chex.assert_rank([k, v], 4)
  chex.assert_equal_shape([k, v])
  if key_mask is not None:
    chex.assert_shape(key_mask, (b, k.shape[1]))
    key_mask = key_mask.astype(jnp.bool_)
  mesh = jax.sharding.get_abstract_mesh()
  # The mesh's devices name the platform compiled for (a TPU topology from a CPU host too).
  platform = None if mesh.empty else getattr(getattr(mesh, "abstract_device", None), "platform", None)
  chosen = choose(impl, q.dtype, t, has_mesh=not mesh.empty, platform=platform)
  if chosen == "xla":
    return L.attention(q, k, v, key_mask, implementation="xla")
  if chosen == "cudnn":
    return cudnn_attention(q, k, v, key_mask)
  return splash_attention(q, k, v, key_mask)


# -- cuDNN -----------------------------------------------------------------------------------------

def keys_real_first(k: jax.Array, v: jax.Array, key_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(k, v) with each row's real keys moved to the front in their order (a stable sort), and
  the int32 [B] count of real keys: attention over keys [0, count) of the result equals
  attention under ``key_mask`` (the weighted sum over keys is order-free)."""
  order = jnp.argsort(~key_mask, axis=1, stable=True)  # real (False) keys first
  gather = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)  # noqa: E731
  return gather(k), gather(v), jnp.sum(key_mask, axis=1, dtype=jnp.int32)


def cudnn_attention(q, k, v, key_mask, implementation: str = "cudnn"):
  """cuDNN flash attention with the key mask as per-row key lengths (`keys_real_first`).
  ``implementation="xla"`` runs the same reordering through XLA (how CPU tests check it)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  if key_mask is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  k, v, lengths = keys_real_first(k, v, key_mask)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                      implementation=implementation)


# -- splash (Pallas, TPU) --------------------------------------------------------------------------

def _block(length: int) -> int:
  return next(size for size in _SPLASH_BLOCKS if length % size == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  """The splash kernel for one batch row [H, q_len, hd] x [Hkv, kv_len, hd] with a full
  (bidirectional) static mask; masking comes from the segment ids. Built once per shape."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  bq, bkv = _block(q_len), _block(kv_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                            block_q_dq=bq, block_kv_dq=bkv)
  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len)) for _ in range(num_heads)])
  with jax.ensure_compile_time_eval():  # concrete mask tables, reusable across traces
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash_rows(q, k, v, q_segments, kv_segments):
  """Splash over a batch of rows: q [B, H, Tp, hd], k/v [B, Hkv, Sp, hd] (tile multiples),
  segment ids [B, Tp] / [B, Sp]. The compiled kernel on TPU, interpreted elsewhere."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # pylint: disable=import-outside-toplevel

  def run(interpret):
    kernel = _splash_kernel(q.shape[1], q.shape[2], k.shape[2], interpret)
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=SegmentIds(qs, ks))  # noqa: E731
    return lambda *args: jax.vmap(one)(*args)

  return jax.lax.platform_dependent(q, k, v, q_segments, kv_segments, tpu=run(False),
                                    cpu=run(True))


def _mesh_specs(mesh, batch: int, heads: int, kv_heads: int):
  """(batch axes, head axis) of the ambient mesh that split this call evenly (None if none)."""
  batch_axes = tuple(a for a in _BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
  if batch_axes and batch % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()
  head_size = mesh.shape.get(_HEAD_AXIS, 1)
  head_axis = _HEAD_AXIS if head_size > 1 and not heads % head_size and not kv_heads % head_size else None
  return (batch_axes or None), head_axis


def splash_attention(q, k, v, key_mask):
  """The splash kernel with the key mask as segment ids (module docstring)."""
  b, t, h, hd = q.shape
  s, kvh = k.shape[1], k.shape[2]
  tp, sp = -(-t // SPLASH_TILE) * SPLASH_TILE, -(-s // SPLASH_TILE) * SPLASH_TILE
  real = jnp.ones((b, s), jnp.bool_) if key_mask is None else key_mask
  kv_segments = jnp.pad(jnp.where(real, 0, 1).astype(jnp.int32), ((0, 0), (0, sp - s)),
                        constant_values=1)
  q_segments = jnp.zeros((b, tp), jnp.int32)
  # The kernel does not scale: q / √hd in q's dtype (as XLA's path scales its fp32 scores).
  q = (q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)).swapaxes(1, 2)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  k, v = (jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k, v))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = _splash_rows(q, k, v, q_segments, kv_segments)
  else:
    batch_axes, head_axis = _mesh_specs(mesh, b, h, kvh)
    heads = PartitionSpec(batch_axes, head_axis, None, None)
    rows = PartitionSpec(batch_axes, None)
    out = jax.shard_map(_splash_rows, mesh=mesh, in_specs=(heads, heads, heads, rows, rows),
                        out_specs=heads, check_vma=False)(q, k, v, q_segments, kv_segments)
  return out[:, :, :t].swapaxes(1, 2).astype(q.dtype)
