"""Per-position log p(target) from hidden states and the output head, in fp32, without
[B, T, V] logits and with the head moved once per call (`docs/scaling.md` §3).

  log p(y_i) = (h_i · W[:, y_i]) − logsumexp_v (h_i · W[:, v])       (h [B, T, D], W [D, V])

Two loops: vocabulary tiles outside, sequence chunks inside. Tile t holds the columns
t, t + K, t + 2K, ... of the head (K tiles of V / K columns; strided so that a vocabulary split
over ``tensor`` stays split). The forward pass keeps a running max and sum of exponentials per
position over the tiles (the online logsumexp) and picks each target's logit from its tile. Each
tile is gathered from the head's storage layout once (`sharding.weight_specs`), so a call moves
the head once, whatever the number of chunks, and holds only a [D, V / K] piece of it.

The backward pass is hand-written: per tile, recompute each chunk's logits, d logits =
g · (onehot(y) − softmax), d hidden += d logits · tileᵀ (fp32 carry over tiles) and
d tile = Σ_chunks hiddenᵀ · d logits in an fp32 carry of per-device partial sums, reduce-scattered
to the storage layout once per tile in ``reduce_dtype`` (default: the head's dtype). Live logits
are [B, chunk, V / K].
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp

from dmpo_jax import sharding


def vocab_tiles(vocab_size: int, max_tile: Optional[int]) -> int:
  """The fewest tiles K (a divisor of the vocabulary) with at most ``max_tile`` columns each."""
  if not max_tile or max_tile >= vocab_size:
    return 1
  return next(k for k in range(1, vocab_size + 1) if vocab_size % k == 0
              and vocab_size // k <= max_tile)


def chunked_target_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                             chunk_size: int, *, max_vocab_tile: Optional[int] = None,
                             reduce_dtype: Any = None) -> jax.Array:
  """log_softmax(hidden @ head)[targets], fp32 [B, T] (see module docstring).

  hidden: [B, T, D] (compute dtype); head: [D, V] in its storage dtype and layout (cast to
  hidden's dtype per tile); targets: [B, T] int, taken modulo V (as `take_along_axis` would wrap
  negatives). ``max_vocab_tile``: most head columns per tile (None: one tile).
  """
  b, t, d = hidden.shape
  chex.assert_shape(targets, (b, t))
  chex.assert_shape(head, (d, None))
  vocab = head.shape[1]
  chunk = max(1, min(chunk_size, t))
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hidden_chunks = hidden.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
  target_chunks = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1).astype(jnp.int32)
  target_chunks = target_chunks % vocab  # the same index in the forward and backward
  k = vocab_tiles(vocab, max_vocab_tile)
  specs = sharding.weight_specs((d, vocab // k), ("embed", "vocab"))  # of one tile
  reduce = jnp.dtype(head.dtype if reduce_dtype is None else reduce_dtype)
  out = _tiled_log_probs(k, specs, reduce, hidden_chunks, head, target_chunks)
  return out.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]


def _tiles(head: jax.Array, k: int) -> jax.Array:
  """[D, V] -> [K, D, V / K]; tile t = columns t, t + K, ..."""
  d, vocab = head.shape
  return head.reshape(d, vocab // k, k).transpose(2, 0, 1)


def _gathered(tile: jax.Array, specs, dtype) -> jax.Array:
  """One tile [D, V / K] in the compute dtype and layout (cast first: the gather moves it)."""
  tile = tile.astype(dtype)
  return tile if specs is None else jax.lax.with_sharding_constraint(tile, specs[0])


def _tile_logits(h: jax.Array, tile: jax.Array) -> jax.Array:
  """[b, c, D] x [D, V / K] -> [b, c, V / K] fp32 (compute-dtype operands, fp32 accumulation)."""
  return jnp.einsum("bcd,dv->bcv", h, tile, preferred_element_type=jnp.float32)


def _forward(k, specs, hidden_chunks, head, target_chunks):
  """Online logsumexp over tiles: returns (log p(y), logsumexp) fp32 [N, b, c]."""
  shape = target_chunks.shape
  tile_index, tile_column = target_chunks % k, target_chunks // k

  def tile_body(carry, xs):
    tile, t = xs
    weight = _gathered(tile, specs, hidden_chunks.dtype)

    def chunk_body(_, xs):
      h, column, in_tile, running_max, running_sum, target = xs
      logits = _tile_logits(h, weight)
      new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
      new_sum = (running_sum * jnp.exp(running_max - new_max)
                 + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1))
      picked = jnp.take_along_axis(logits, column[..., None], axis=-1)[..., 0]
      return None, (new_max, new_sum, jnp.where(in_tile, picked, target))

    _, carry = jax.lax.scan(chunk_body, None,
                            (hidden_chunks, tile_column, tile_index == t) + carry)
    return carry, None

  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.float32))
  (running_max, running_sum, target), _ = jax.lax.scan(
      tile_body, init, (_tiles(head, k), jnp.arange(k, dtype=jnp.int32)))
  log_norm = running_max + jnp.log(running_sum)
  return target - log_norm, log_norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tiled_log_probs(k, specs, reduce_dtype, hidden_chunks, head, target_chunks):
  """[N, b, c, D], [D, V], [N, b, c] -> [N, b, c] fp32 target log-probs."""
  del reduce_dtype
  return _forward(k, specs, hidden_chunks, head, target_chunks)[0]


def _tiled_fwd(k, specs, reduce_dtype, hidden_chunks, head, target_chunks):
  del reduce_dtype
  log_probs, log_norm = _forward(k, specs, hidden_chunks, head, target_chunks)
  return log_probs, (hidden_chunks, head, target_chunks, log_norm)


def _tiled_bwd(k, specs, reduce_dtype, residuals, cotangent):
  """d log p(y)/d logits = onehot(y) − softmax(logits); per tile and chunk:
  d hidden += d_logits · tileᵀ, d tile += hiddenᵀ · d_logits (fp32 carries)."""
  hidden_chunks, head, target_chunks, log_norm = residuals
  n_chunks, rows, chunk, d_model = hidden_chunks.shape
  vocab = head.shape[1]
  width = vocab // k
  tile_index, tile_column = target_chunks % k, target_chunks // k
  columns = jnp.arange(width, dtype=jnp.int32)
  # The tile gradient sums over rows, which are split over the batch axes: each device keeps
  # its own partial sum in the carry ([S, D, V / K], S = batch shards, split over them) and the
  # sum over devices is one reduce-scatter per tile after the chunk loop. (A [D, V / K] carry
  # would be reduced at every chunk.)
  shards, partial_spec = sharding.batch_partials((d_model, width), specs and specs[0], rows)

  def per_shard(x):  # [b, c, ...] -> [S, b / S, c, ...], the S axis on the batch axes
    return x.reshape(shards, rows // shards, *x.shape[1:])

  def pinned(x):
    return x if partial_spec is None else jax.lax.with_sharding_constraint(x, partial_spec)

  def tile_body(d_hidden, xs):
    tile, t = xs
    weight = _gathered(tile, specs, hidden_chunks.dtype)

    def chunk_body(d_tile, xs):
      h, column, in_tile, norm, g = xs
      probs = jnp.exp(_tile_logits(h, weight) - norm[..., None])
      onehot = (in_tile[..., None] & (columns == column[..., None])).astype(jnp.float32)
      d_logits = (g.astype(jnp.float32)[..., None] * (onehot - probs)).astype(h.dtype)
      d_h = jnp.einsum("bcv,dv->bcd", d_logits, weight, preferred_element_type=jnp.float32)
      d_tile = pinned(d_tile + jnp.einsum("sbcd,sbcv->sdv", per_shard(h), per_shard(d_logits),
                                          preferred_element_type=jnp.float32))
      return d_tile, d_h

    d_tile, d_h = jax.lax.scan(
        chunk_body, pinned(jnp.zeros((shards, d_model, width), jnp.float32)),
        (hidden_chunks, tile_column, tile_index == t, log_norm, cotangent))
    d_tile = jnp.sum(d_tile, axis=0).astype(reduce_dtype)
    if specs is not None:  # the reduce-scatter of this tile's gradient, once
      d_tile = jax.lax.with_sharding_constraint(d_tile, specs[1])
    return d_hidden + d_h, d_tile.astype(head.dtype)

  d_hidden, d_tiles = jax.lax.scan(
      tile_body, jnp.zeros(hidden_chunks.shape, jnp.float32),
      (_tiles(head, k), jnp.arange(k, dtype=jnp.int32)))
  d_head = d_tiles.transpose(1, 2, 0).reshape(d_model, vocab)
  return d_hidden.astype(hidden_chunks.dtype), d_head, None


_tiled_log_probs.defvjp(_tiled_fwd, _tiled_bwd)
