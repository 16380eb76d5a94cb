"""Gradient machinery shared by every RL objective (`docs/architecture.md` §4, §5).

* `LossOutput` / `WeightedMetric`: the (numerator, denominator) loss contract (`docs/algorithms.md`
  §5.4). Accumulating numerators and denominators separately over MC samples and micro-batches
  and dividing once gives the exact global mean, never a mean of means.
* `accumulate_gradients`: one loop over (micro-batch, MC sample) pairs with ``value_and_grad``
  in the body and fp32 gradients in the carry. Only one (micro-batch, MC sample)
  forward/backward graph is alive at a time. The trip count reaches XLA as a runtime value
  (through an optimization barrier), so the compiler can neither drop the loop at one iteration
  nor unroll it: every number of MC samples compiles to the same loop with the same buffers, so
  peak memory is independent of n by construction, and more micro-batches only shrink the
  per-iteration activations (measured with `benchmarks/memory.py`). The price is the loop's
  fixed working set, one sample's gradient next to the accumulator, which a loop-free program
  would not need: losses without an MC axis (``num_samples=None``) with one micro-batch take
  their gradient directly.
* `micro_batch_map`: the gradient-free counterpart (pass 1 of the two-pass method of
  `docs/algorithms.md` §5.2, old/reference scoring), also a scan over micro-batches.
* `value_with_surrogate_grad`: value v, gradient of a surrogate s (``v + s − stop_gradient(s)``),
  used by the two-pass objectives whose exact loss value comes from pass 1.

Micro-batches are *strided*: micro-batch m holds rows m, m + M, m + 2M, ... (M = number of
micro-batches). With the batch axis sharded over devices each micro-batch then spans every
device. Every leaf of a micro-batched pytree must have the batch as its leading axis.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
from flax import struct

from dmpo_jax import sharding
from dmpo_jax.models import lora

PyTree = Any
_TINY = 1e-30


@struct.dataclass
class WeightedMetric:
  """A metric accumulated as (total, weight); its value is total / weight."""
  total: jax.Array
  weight: jax.Array

  @classmethod
  def mean_of(cls, values: jax.Array, where: Optional[jax.Array] = None) -> "WeightedMetric":
    """Sum and count of ``values`` (optionally only where ``where`` is True), fp32."""
    values = jnp.asarray(values, jnp.float32)
    if where is None:
      return cls(jnp.sum(values), jnp.asarray(values.size, jnp.float32))
    where = jnp.broadcast_to(where, values.shape)
    return cls(jnp.sum(jnp.where(where, values, 0.0)), jnp.sum(where.astype(jnp.float32)))

  def value(self) -> jax.Array:
    return self.total / jnp.maximum(self.weight, _TINY)

  def __add__(self, other: "WeightedMetric") -> "WeightedMetric":
    return WeightedMetric(self.total + other.total, self.weight + other.weight)


@struct.dataclass
class LossOutput:
  """Unreduced loss: ``numerator`` (what is differentiated), ``denominator`` (the count it is
  averaged over) and auxiliary metrics. The reported loss is numerator / denominator."""
  numerator: jax.Array
  denominator: jax.Array
  metrics: dict[str, WeightedMetric]

  @property
  def loss(self) -> jax.Array:
    return self.numerator / jnp.maximum(self.denominator, _TINY)

  def metric_values(self) -> dict[str, jax.Array]:
    """{"loss": loss, name: value} with every metric reduced."""
    out = {name: metric.value() for name, metric in self.metrics.items()}
    out["loss"] = self.loss
    return out

  def __add__(self, other: "LossOutput") -> "LossOutput":
    if set(self.metrics) != set(other.metrics):
      raise ValueError(f"cannot add LossOutputs with different metrics: {sorted(self.metrics)} "
                       f"vs {sorted(other.metrics)}")
    return LossOutput(self.numerator + other.numerator, self.denominator + other.denominator,
                      {k: self.metrics[k] + other.metrics[k] for k in self.metrics})


def loss_normalization(global_denominators: jax.Array, reference_micro_batch_size: Optional[int],
                       reference_counts: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Per-row (scale, denominator) of a loss reported as Σ_i scale_i·ℓ_i / Σ_i denominator_i.

  ``reference_micro_batch_size=None`` (the default of every objective: layout-free): scale 1 and
  the objective's ``global_denominators`` (token counts for a global token mean, 1/G per row
  for a per-prompt mean, ...).

  ``reference_micro_batch_size=c`` reproduces the PyTorch reference trainers, which reduce each
  per-device micro-batch of c completions on its own and average the K = B/c micro-batch losses
  (gradient accumulation and the data-parallel mean), `docs/algorithms.md` §5.4:

      L_ref = (1/K) Σ_k Σ_{i∈k} ℓ_i / Σ_{i∈k} n_i     (n_i = ``reference_counts``, e.g. tokens)
      L_ref = (1/K) Σ_k Σ_{i∈k} ℓ_i                   (``reference_counts=None``: micro-batch sums)

  Micro-batch k holds rows k·c .. k·c + c − 1 (prompt-major batches, as the reference's repeat
  sampler lays them out over devices), so scale_i = 1/Σ_{i'∈k(i)} n_i' (or 1) and
  denominator_i = 1/c. fp32 [B] each.
  """
  den = jnp.asarray(global_denominators, jnp.float32)
  chex.assert_rank(den, 1)
  batch_size = den.shape[0]
  if reference_micro_batch_size is None:
    return jnp.ones_like(den), den
  c = int(reference_micro_batch_size)
  if c <= 0 or batch_size % c:
    raise ValueError(f"reference_micro_batch_size={c} must be positive and divide the update "
                     f"batch ({batch_size} completions)")
  if reference_counts is None:
    scale = jnp.ones_like(den)
  else:
    counts = jnp.asarray(reference_counts, jnp.float32)
    chex.assert_shape(counts, (batch_size,))
    totals = jnp.sum(counts.reshape(batch_size // c, c), axis=-1)
    scale = jnp.repeat(1.0 / jnp.maximum(totals, _TINY), c)
  return scale, jnp.full((batch_size,), 1.0 / c, jnp.float32)


def _zeros_like_shape(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def batch_size_of(batch: PyTree) -> int:
  """The common leading dimension of every leaf (clear error if they disagree)."""
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    shapes = jax.tree.map(lambda x: tuple(x.shape), batch)
    raise ValueError(f"every micro-batched leaf needs the same leading batch axis; got {shapes}")
  return sizes.pop()


def num_micro_batches(batch_size: int, micro_batch_size: Optional[int]) -> int:
  if micro_batch_size is None or micro_batch_size >= batch_size:
    return 1
  if micro_batch_size <= 0 or batch_size % micro_batch_size:
    raise ValueError(f"micro_batch_size={micro_batch_size} must be positive and divide the batch "
                     f"size {batch_size}")
  return batch_size // micro_batch_size


def split_micro_batches(batch: PyTree, micro_batch_size: Optional[int]) -> PyTree:
  """[B, ...] leaves -> [M, B/M, ...] with micro-batch m = rows m, m + M, ... (strided)."""
  b = batch_size_of(batch)
  m = num_micro_batches(b, micro_batch_size)
  return jax.tree.map(lambda x: x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1), batch)


def merge_micro_batches(tree: PyTree) -> PyTree:
  """Inverse of `split_micro_batches`: [M, B/M, ...] -> [B, ...]."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]),
                      tree)


def micro_batch_map(fn: Callable[[PyTree], PyTree], batch: PyTree,
                    micro_batch_size: Optional[int]) -> PyTree:
  """Applies ``fn`` (no gradient) to each micro-batch with a `lax.scan` and reassembles the
  batch-leading outputs in the original row order. ``fn(micro_batch) -> pytree of [b, ...]``."""
  if num_micro_batches(batch_size_of(batch), micro_batch_size) == 1:
    return jax.tree.map(jax.lax.stop_gradient, fn(batch))
  micro = split_micro_batches(batch, micro_batch_size)

  def body(carry, micro_batch):
    return carry, jax.tree.map(jax.lax.stop_gradient, fn(micro_batch))

  _, out = jax.lax.scan(body, None, micro)
  return merge_micro_batches(out)


SampleLossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Mapping[str, WeightedMetric]]]


def accumulate_gradients(loss_fn: SampleLossFn, params: PyTree, batch: PyTree, *,
                         num_samples: Optional[int], micro_batch_size: Optional[int],
                         denominator_fn: Callable[[PyTree], jax.Array],
                         normalize: bool = True) -> tuple[PyTree, LossOutput]:
  """Σ over micro-batches b and MC samples j of ∇ loss_fn(params, b, j), in fp32.

  ``loss_fn(params, micro_batch, j) -> (numerator_j, metrics_j)`` is the contribution of MC
  sample j (int32 scalar, 0..num_samples-1) of one micro-batch; its gradient is taken inside the
  loop body and added to an fp32 carry. ``num_samples=None`` marks a loss without an MC-sample
  axis (one forward per micro-batch, j = 0): with a single micro-batch there is nothing to
  accumulate and the gradient is taken directly, without the loop's working set.
  ``denominator_fn(micro_batch)`` is counted once per micro-batch. Returns (grads, LossOutput)
  with grads = ∇(Σ numerator) / Σ denominator when ``normalize`` (the gradient of the reported
  loss), otherwise ∇ Σ numerator.
  """
  single_pass = num_samples is None
  num_samples = 1 if single_pass else num_samples
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  micro = split_micro_batches(batch, micro_batch_size)
  first = jax.tree.map(lambda x: x[0], micro)
  # Denominators do not depend on the parameters: summing them first lets every per-sample
  # gradient be scaled by 1/Σden inside the loop, so the accumulator is the returned gradient
  # (no extra normalised copy of a parameter-sized buffer after the loop).
  denominator = jnp.sum(jax.vmap(lambda mb: jnp.asarray(denominator_fn(mb), jnp.float32))(micro))
  grad_scale = 1.0 / jnp.maximum(denominator, _TINY) if normalize else jnp.float32(1.0)

  def value(p, micro_batch, j):
    numerator, metrics = loss_fn(p, micro_batch, j)
    chex.assert_shape(numerator, ())
    numerator = numerator.astype(jnp.float32)
    return numerator * jax.lax.stop_gradient(grad_scale), (numerator, dict(metrics))

  # Gradients w.r.t. the trainable part only (LoRA adapters when present, else everything).
  value_and_grad = lora.value_and_grad_trainable(value, has_aux=True)
  metrics_shape = jax.eval_shape(lambda: value(params, first, jnp.int32(0))[1][1])
  # The fp32 accumulator is split like the parameters when a mesh is set (`sharding.constrain_logical`):
  # built from zeros, XLA would otherwise be free to replicate it on every device.
  grads0 = sharding.constrain_logical(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), lora.split_trainable(params)[0]))
  carry0 = (grads0, jnp.zeros((), jnp.float32), _zeros_like_shape(metrics_shape))

  num_micro = jax.tree.leaves(micro)[0].shape[0]
  if single_pass and num_micro == 1:
    (_, (numerator, metrics)), grads = value_and_grad(params, first, jnp.int32(0))
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    return grads, LossOutput(numerator, denominator, metrics)

  def body(i, carry):
    # Iteration i is (micro-batch i // n, MC sample i % n).
    grads, numerator, metrics = carry
    m, j = i // num_samples, i % num_samples
    micro_batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, m, keepdims=False), micro)
    # Tying the parameters to the iteration keeps XLA from hoisting per-parameter work out of
    # the loop (on CPU: fp32 copies of every bf16 weight, alive for the whole loop).
    params_i, _ = jax.lax.optimization_barrier((params, i))
    (_, (num_j, metrics_j)), grads_j = value_and_grad(params_i, micro_batch, j)
    grads = sharding.constrain_logical(
        jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, grads_j))
    metrics = jax.tree.map(jnp.add, metrics, metrics_j)
    return grads, numerator + num_j, metrics

  # The trip count goes through an optimization barrier so XLA sees a loop of unknown length:
  # it cannot elide the loop at one iteration or unroll it, so every n compiles to the same loop
  # with the same buffers (peak memory independent of n by construction).
  trip_count = jax.lax.optimization_barrier(jnp.int32(num_micro * num_samples))
  grads, numerator, metrics = jax.lax.fori_loop(0, trip_count, body, carry0)
  return grads, LossOutput(numerator, denominator, metrics)


def value_with_surrogate_grad(value: jax.Array, surrogate: jax.Array) -> jax.Array:
  """Returns ``value`` in the forward pass with the gradient of ``surrogate``:
  value + surrogate − stop_gradient(surrogate) (exact two-pass objectives, §5.2)."""
  return jax.lax.stop_gradient(value) + surrogate - jax.lax.stop_gradient(surrogate)
