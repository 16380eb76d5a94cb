"""The transformer loaded from tiny HF checkpoints vs a NumPy re-implementation of `docs/llada.md` §2/§9.

The reference below reads the HF tensors directly (torch [out, in] layout, float64) and is written
from the spec, independently of `dmpo_jax.models`: rotate-half RoPE, RMSNorm, bidirectional
attention with an optional key-padding mask, SwiGLU, untied head; Dream adds q/k/v biases, GQA,
positions ``cumsum(mask) - 1`` and the one-position logit shift.

Compile time dominates on CPU, so each model is compiled once (`_probe`) on a batch whose rows are
variants of one sequence (original / last token changed / left-padded / pad tokens changed).
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tests.helpers import hf_fixtures

from dmpo_jax.models import layers as L  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.hf_io import load_pretrained  # noqa: E402
from dmpo_jax.models.logprobs import vocab_tiles  # noqa: E402
from dmpo_jax.models.transformer import Transformer, chunked_target_log_probs  # noqa: E402

T = 8
N_PAD = 3
CHUNKS = (3, 4)


# ------------------------------------------------------------------------------------------------
# NumPy reference (float64)
# ------------------------------------------------------------------------------------------------

def np_rms_norm(x, weight, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def np_rope(x, positions, theta):
  """x [B, T, H, hd]; inv_freq_i = theta^(-2i/hd), angles duplicated, rotate_half = cat(-x2, x1)."""
  hd = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  angles = positions[..., None].astype(np.float64) * inv_freq
  angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
  rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
  return x * np.cos(angles) + rotated * np.sin(angles)


def np_attention(q, k, v, key_mask):
  """Non-causal softmax(q kᵀ/√hd) v; query head h uses key/value head h // (H / Hkv)."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    scores = np.where(key_mask[:, None, None, :].astype(bool), scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  probs = np.exp(scores)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def np_forward(tensors, family, config, ids, key_mask=None, positions=None):
  """Raw head output [B, T, V] (Dream: position i predicts token i+1)."""
  w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  if family == "llada":
    d, h, kvh = config["d_model"], config["n_heads"], config["n_kv_heads"]
    n_layers, eps, theta = config["n_layers"], config["rms_norm_eps"], config["rope_theta"]
    pre = "model.transformer."
    embed, final_norm, head = w[pre + "wte.weight"], w[pre + "ln_f.weight"], w[pre + "ff_out.weight"]

    def layer(i):
      p = f"{pre}blocks.{i}."
      return dict(attn_norm=w[p + "attn_norm.weight"], q=w[p + "q_proj.weight"], k=w[p + "k_proj.weight"],
                  v=w[p + "v_proj.weight"], o=w[p + "attn_out.weight"], ffn_norm=w[p + "ff_norm.weight"],
                  gate=w[p + "ff_proj.weight"], up=w[p + "up_proj.weight"], down=w[p + "ff_out.weight"])
  else:
    d, h, kvh = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    n_layers, eps, theta = config["num_hidden_layers"], config["rms_norm_eps"], config["rope_theta"]
    embed, final_norm, head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]

    def layer(i):
      p = f"model.layers.{i}."
      a = p + "self_attn."
      return dict(attn_norm=w[p + "input_layernorm.weight"], q=w[a + "q_proj.weight"],
                  k=w[a + "k_proj.weight"], v=w[a + "v_proj.weight"], qb=w[a + "q_proj.bias"],
                  kb=w[a + "k_proj.bias"], vb=w[a + "v_proj.bias"], o=w[a + "o_proj.weight"],
                  ffn_norm=w[p + "post_attention_layernorm.weight"], gate=w[p + "mlp.gate_proj.weight"],
                  up=w[p + "mlp.up_proj.weight"], down=w[p + "mlp.down_proj.weight"])
  hd = d // h
  b, t = ids.shape
  if positions is None:
    positions = np.broadcast_to(np.arange(t), (b, t))
  x = embed[ids]
  for i in range(n_layers):
    p = layer(i)
    hn = np_rms_norm(x, p["attn_norm"], eps)
    q, k, v = hn @ p["q"].T, hn @ p["k"].T, hn @ p["v"].T
    if "qb" in p:
      q, k, v = q + p["qb"], k + p["kb"], v + p["vb"]
    q = np_rope(q.reshape(b, t, h, hd), positions, theta)
    k = np_rope(k.reshape(b, t, kvh, hd), positions, theta)
    att = np_attention(q, k, v.reshape(b, t, kvh, hd), key_mask).reshape(b, t, h * hd)
    x = x + att @ p["o"].T
    hn = np_rms_norm(x, p["ffn_norm"], eps)
    gate = hn @ p["gate"].T
    x = x + ((gate / (1 + np.exp(-gate))) * (hn @ p["up"].T)) @ p["down"].T
  return np_rms_norm(x, final_norm, eps) @ head.T


def np_log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------------
# Models under test (each compiled once)
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _probe(graphdef, state, ids, mask):
  """Raw and aligned fp32 logits and token log-probs (targets = ids) at each chunk size."""
  model = nnx.merge(graphdef, state)
  hidden = model.hidden_states(ids, mask)
  out = {"raw": model.logits_from_hidden(hidden),
         "aligned": model(ids, mask)}
  for chunk in CHUNKS:
    out[f"logp_{chunk}"] = model.token_log_probs(ids, ids, mask, chunk_size=chunk)
  return out


def _variant_batch(vocab, pad_id, seed):
  """Rows: 0 original; 1 = 0 with its last token changed; 2 left-padded (N_PAD pads);
  3 = 2 with different tokens at the padded positions."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, vocab - 4, size=T)
  changed = base.copy()
  changed[-1] = (changed[-1] + 1) % (vocab - 4)
  padded = base.copy()
  padded[:N_PAD] = pad_id
  padded_other = padded.copy()
  padded_other[:N_PAD] = rng.integers(0, vocab - 4, size=N_PAD)
  ids = np.stack([base, changed, padded, padded_other]).astype(np.int32)
  mask = np.ones_like(ids)
  mask[2:, :N_PAD] = 0
  return ids, mask


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llada")
  tensors = hf_fixtures.make_llada_checkpoint(folder, sharded=True)
  config = hf_fixtures.llada_config(vocab=128)
  ids, mask = _variant_batch(128, pad_id=126, seed=0)
  model, _ = load_pretrained(folder, param_dtype="float32")
  out = jax.device_get(_probe(*nnx.split(model), ids, mask))
  return dict(folder=folder, tensors=tensors, config=config, ids=ids, mask=mask, out=out)


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
  folder = tmp_path_factory.mktemp("dream")
  tensors = hf_fixtures.make_dream_checkpoint(folder, sharded=False)
  config = hf_fixtures.dream_config()
  ids, mask = _variant_batch(160, pad_id=156, seed=1)
  model, _ = load_pretrained(folder, param_dtype="float32")
  out = jax.device_get(_probe(*nnx.split(model), ids, mask))
  return dict(tensors=tensors, config=config, ids=ids, mask=mask, out=out, model=model)


def _assert_logits_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# LLaDA
# ------------------------------------------------------------------------------------------------

def test_llada_logits_match_numpy_reference(llada):
  want = np_forward(llada["tensors"], "llada", llada["config"], llada["ids"], key_mask=llada["mask"])
  assert np.abs(want).max() > 1.0  # non-trivial logits
  _assert_logits_close(llada["out"]["raw"], want)
  np.testing.assert_array_equal(llada["out"]["aligned"], llada["out"]["raw"])  # no shift for LLaDA


def test_llada_is_bidirectional(llada):
  logits = llada["out"]["raw"]
  # Row 1 differs from row 0 only in the last token, yet every earlier position changes.
  assert np.all(np.abs(logits[1, :-1] - logits[0, :-1]).max(-1) > 1e-4)


def test_key_padding_mask_hides_padded_keys(llada):
  logits = llada["out"]["raw"]
  # Rows 2 and 3 differ only at masked (padded) positions: real positions are unaffected.
  np.testing.assert_allclose(logits[2, N_PAD:], logits[3, N_PAD:], rtol=0, atol=1e-5)


def test_llada_without_mask_and_with_remat(llada):
  """use_key_padding_mask=False attends to pads (the original LLaDA file); remat changes nothing."""
  model, info = load_pretrained(llada["folder"], param_dtype="float32", remat=True,
                                use_key_padding_mask=False)
  assert info.model_config.remat and not info.model_config.use_key_padding_mask
  out = jax.device_get(_probe(*nnx.split(model), llada["ids"], llada["mask"]))
  want = np_forward(llada["tensors"], "llada", llada["config"], llada["ids"], key_mask=None)
  _assert_logits_close(out["raw"], want)
  # Unpadded rows: the model with mask and without remat, up to fp32 reordering (remat and the
  # absent mask change XLA's fusion and summation order: ~1e-6 differences are expected).
  np.testing.assert_allclose(out["raw"][:2], llada["out"]["raw"][:2], rtol=1e-5, atol=1e-5)
  for chunk in CHUNKS:
    np.testing.assert_allclose(out[f"logp_{chunk}"][:2], llada["out"][f"logp_{chunk}"][:2],
                               rtol=1e-5, atol=1e-5)
  # Padded rows: the pad tokens now influence the real positions.
  assert np.abs(out["raw"][2, N_PAD:] - out["raw"][3, N_PAD:]).max() > 1e-3


def test_llada_token_log_probs_match_full_log_softmax(llada):
  ids = llada["ids"]
  want = np.take_along_axis(np_log_softmax(llada["out"]["raw"].astype(np.float64)),
                            ids[..., None], axis=-1)[..., 0]
  for chunk in CHUNKS:  # 3 does not divide T = 8; 4 does
    got = llada["out"][f"logp_{chunk}"]
    assert got.dtype == np.float32 and got.shape == ids.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Dream
# ------------------------------------------------------------------------------------------------

def test_dream_logits_match_numpy_reference(dream):
  ids, raw = dream["ids"], dream["out"]["raw"]
  want = np_forward(dream["tensors"], "dream", dream["config"], ids[:2])
  _assert_logits_close(raw[:2], want)
  # Aligned logits: the prediction for position i is the head output at i-1 (position 0 keeps its own).
  aligned = dream["out"]["aligned"]
  np.testing.assert_array_equal(aligned[:, 1:], raw[:, :-1])
  np.testing.assert_array_equal(aligned[:, 0], raw[:, 0])


def test_dream_positions_start_at_first_real_token(dream):
  ids, mask, raw = dream["ids"], dream["mask"], dream["out"]["raw"]
  positions = np.cumsum(mask, axis=-1) - 1  # Dream's generator; pad rows are never compared
  want = np_forward(dream["tensors"], "dream", dream["config"], ids, key_mask=mask,
                    positions=positions)
  real = mask.astype(bool)
  _assert_logits_close(raw[real], want[real])
  # With positions from padding and the key mask, a left-padded sequence equals the unpadded one.
  suffix = np_forward(dream["tensors"], "dream", dream["config"], ids[2:3, N_PAD:])
  _assert_logits_close(raw[2, N_PAD:], suffix[0])
  np.testing.assert_allclose(raw[2, N_PAD:], raw[3, N_PAD:], rtol=0, atol=1e-5)


def test_dream_token_log_probs_use_shifted_logits(dream):
  ids = dream["ids"]
  aligned = dream["out"]["aligned"].astype(np.float64)
  want = np.take_along_axis(np_log_softmax(aligned), ids[..., None], axis=-1)[..., 0]
  for chunk in CHUNKS:
    np.testing.assert_allclose(dream["out"][f"logp_{chunk}"], want, rtol=1e-5, atol=1e-5)


def test_dream_has_gqa_and_biases(dream):
  model = dream["model"]
  c = model.config
  assert (c.n_heads, c.n_kv_heads, c.head_dim, c.qkv_bias) == (4, 2, 8, True)
  assert model.blocks.k_proj[...].shape == (2, 32, 2, 8)
  assert model.blocks.q_bias[...].shape == (2, 4, 8)
  bias = dream["tensors"]["model.layers.1.self_attn.k_proj.bias"].astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model.blocks.k_bias[1]).reshape(-1), bias)


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def test_rms_norm_matches_numpy_in_llada_order():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 3, 16)) * 3).astype(np.float32)
  w = (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)
  rms_norm = jax.jit(L.rms_norm, static_argnums=2)
  np.testing.assert_allclose(rms_norm(x, w, 1e-5),
                             np_rms_norm(x.astype(np.float64), w, 1e-5), rtol=1e-5, atol=1e-6)
  # bf16: normalise in fp32, cast to bf16, then multiply by the bf16 weight in bf16.
  xb, wb = x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16)
  x32 = xb.astype(np.float32)
  normed = (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(ml_dtypes.bfloat16)
  want = (normed.astype(np.float32) * wb.astype(np.float32)).astype(ml_dtypes.bfloat16)
  got = np.asarray(rms_norm(xb, wb, 1e-5))
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2 ** -7, atol=0)


@functools.partial(jax.jit, static_argnums=2)
def _rope(x, positions, theta):
  cos, sin = L.rope_cos_sin(positions, x.shape[-1], theta)
  return L.apply_rope(x, cos, sin)


def test_rope_matches_numpy_rotate_half():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 30, 31, 90, 127]])
  for theta in (10000.0, 500000.0):
    got = _rope(x, positions, theta)
    np.testing.assert_allclose(got, np_rope(x.astype(np.float64), positions, theta), rtol=1e-4, atol=1e-4)
  # Position 0 is the identity; the rotation preserves each (i, i + hd/2) pair's norm.
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-6)
  pair_norm = lambda a: a[..., :8] ** 2 + a[..., 8:] ** 2  # noqa: E731
  np.testing.assert_allclose(pair_norm(np.asarray(got)), pair_norm(x), rtol=1e-4, atol=1e-5)


def test_gqa_attention_matches_repeated_kv_heads():
  rng = np.random.default_rng(2)
  q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
  key_mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
  got = jax.jit(L.attention)(q, k, v, key_mask)
  np.testing.assert_allclose(got, np_attention(q.astype(np.float64), k, v, key_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_chunked_target_log_probs_any_chunk_size(chunk):
  rng = np.random.default_rng(chunk)
  hidden = rng.standard_normal((2, 7, 6)).astype(np.float32)
  head = rng.standard_normal((6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(2, 7))
  got = chunked_target_log_probs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), chunk)
  want = np.take_along_axis(np_log_softmax(hidden.astype(np.float64) @ head), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 7])
@pytest.mark.slow
def test_chunked_target_log_probs_gradient_matches_numpy(chunk):
  # Hand-written VJP vs the float64 formula: for L = Σ w·log p(y), d logits = w·(onehot(y) − p),
  # d hidden = d logits · headᵀ, d head = Σ hiddenᵀ · d logits.
  rng = np.random.default_rng(10 + chunk)
  hidden = rng.standard_normal((2, 7, 6)).astype(np.float32)
  head = rng.standard_normal((6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(2, 7))
  weights = rng.standard_normal((2, 7)).astype(np.float32)
  loss = lambda h, w: jnp.sum(jnp.asarray(weights) * chunked_target_log_probs(
      h, w, jnp.asarray(targets), chunk))
  d_hidden, d_head = jax.grad(loss, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
  probs = np.exp(np_log_softmax(hidden.astype(np.float64) @ head))
  d_logits = weights[..., None] * (np.eye(11)[targets] - probs)
  np.testing.assert_allclose(d_hidden, d_logits @ head.T.astype(np.float64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_head, np.einsum("btd,btv->dv", hidden.astype(np.float64), d_logits),
                             rtol=1e-5, atol=1e-5)
  # bf16 weights: the gradient keeps the weight's dtype and stays close to the fp32 one.
  d_head_bf16 = jax.grad(loss, argnums=1)(jnp.asarray(hidden, jnp.bfloat16),
                                          jnp.asarray(head, jnp.bfloat16))
  assert d_head_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(d_head_bf16, np.float32), d_head, rtol=0,
                             atol=0.01 * float(np.abs(d_head).max()))
  # Negative targets wrap as in the forward gather (-1 is V - 1), in the gradient too.
  wrapped = jnp.asarray(np.where(targets == 10, -1, targets))
  d_hidden_wrapped = jax.grad(lambda h: jnp.sum(jnp.asarray(weights) * chunked_target_log_probs(
      h, jnp.asarray(head), wrapped, chunk)))(jnp.asarray(hidden))
  np.testing.assert_allclose(d_hidden_wrapped, d_hidden, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab,max_tile,chunk", [(12, 4, 3), (11, 4, 7), (12, 12, 5)])
@pytest.mark.slow
def test_vocab_tiled_log_probs_match_numpy(vocab, max_tile, chunk):
  # The head in K strided tiles (12 columns, tiles of <= 4: K = 3; 11 columns: K = 11 tiles of 1):
  # online logsumexp forward and per-tile backward equal the float64 formula.
  assert vocab_tiles(vocab, max_tile) == {(12, 4): 3, (11, 4): 11, (12, 12): 1}[(vocab, max_tile)]
  rng = np.random.default_rng(vocab + chunk)
  hidden = rng.standard_normal((2, 7, 6)).astype(np.float32)
  head = rng.standard_normal((6, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(2, 7))
  weights = rng.standard_normal((2, 7)).astype(np.float32)
  fn = lambda h, w: chunked_target_log_probs(h, w, jnp.asarray(targets), chunk,
                                             max_vocab_tile=max_tile)
  log_probs = np_log_softmax(hidden.astype(np.float64) @ head)
  np.testing.assert_allclose(fn(jnp.asarray(hidden), jnp.asarray(head)),
                             np.take_along_axis(log_probs, targets[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  d_hidden, d_head = jax.grad(lambda h, w: jnp.sum(jnp.asarray(weights) * fn(h, w)),
                              argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
  d_logits = weights[..., None] * (np.eye(vocab)[targets] - np.exp(log_probs))
  np.testing.assert_allclose(d_hidden, d_logits @ head.T.astype(np.float64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_head, np.einsum("btd,btv->dv", hidden.astype(np.float64), d_logits),
                             rtol=1e-5, atol=1e-5)


def _count_params(config):
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_param_counts_of_presets():
  llada_count = _count_params(get_preset("llada_8b"))
  # `docs/llada.md` §1: 2·126464·4096 + 32·(4·4096² + 3·4096·12288) + norms (65·4096).
  assert llada_count == 2 * 126464 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 12288) + 65 * 4096
  assert abs(llada_count - 8.02e9) < 0.01e9
  assert llada_count == get_preset("llada_8b").num_params()
  dream_count = _count_params(get_preset("dream_7b"))
  assert dream_count == 7_615_616_512  # Qwen2.5-7B's parameter count
