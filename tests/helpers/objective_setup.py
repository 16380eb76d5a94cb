"""A tiny transformer, batch and parameters for the objective tests (`tests/test_objectives_model.py`,
`tests/test_reference_options.py`).

The batch, the parameters, their graph definition and the step keys are built (compiled: even a
host-to-device copy is an XLA program) on first access to ``BATCH`` / ``GRAPHDEF`` /
``PARAMS_OLD`` / ``PARAMS_REF`` / ``PARAMS_NEW`` / ``KEYS``, once per process, never at import:
read them as ``objective_setup.PARAMS_OLD`` inside a test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmpo_jax.models.config import get_preset
from dmpo_jax.models.transformer import create_model, split_model
from dmpo_jax.rl import registry, scoring

CONFIG = get_preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                    mlp_hidden_size=64, logprob_chunk_size=16)
# Test programs compile ~4x faster at LLVM level 0 without the CPU fusion emitters; both only
# change code generation, not the numerics (no fast-math).
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def fast_jit(fn, static_argnums=()):
  """jit with the fast compile options, compiled once per input signature."""
  cache = {}

  def call(*args):
    dynamic = [a for i, a in enumerate(args) if i not in static_argnums]
    key = (tuple(args[i] for i in static_argnums), jax.tree.structure(dynamic),
           tuple((np.shape(x), str(getattr(x, 'dtype', type(x)))) for x in jax.tree.leaves(dynamic)))
    if key not in cache:
      cache[key] = jax.jit(fn, static_argnums=static_argnums).lower(*args).compile(FAST)
    return cache[key](*dynamic)

  return call


B, P, L = 4, 4, 8
T = P + L


def make_batch():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, 256, (B, T)).astype(np.int32)
  seq[:, P + 6:] = CONFIG.eos_token_id            # trailing EOS padding
  seq[1, P + 3] = CONFIG.eos_token_id              # an early EOS
  seq[0, 0] = CONFIG.pad_token_id                  # left padding
  attn = np.ones((B, T), bool)
  attn[0, 0] = False
  prompt = np.zeros((B, T), bool)
  prompt[:, :P] = True
  return {"sequences": jnp.asarray(seq), "attention_mask": jnp.asarray(attn),
          "prompt_mask": jnp.asarray(prompt), "completion_mask": jnp.asarray(~prompt),
          "rewards": jnp.asarray([1.0, 0.0, 2.0, 0.5]), "group_ids": jnp.asarray([4, 9, 4, 9]),
          "example_ids": jnp.asarray([10, 11, 12, 13])}


@functools.cache
def _lazy_values():
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(CONFIG, 0)))
  init = fast_jit(lambda seed: split_model(create_model(CONFIG, seed))[1], static_argnums=(0,))
  params_old, params_ref = init(0), init(1)
  params_new = fast_jit(lambda ps: jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape, p.dtype), ps))(params_old)
  keys = scoring.make_keys(jax.random.key(3), rollout_step=5, update_step=11, iteration=2)
  return {"BATCH": make_batch(), "GRAPHDEF": graphdef, "PARAMS_OLD": params_old, "PARAMS_REF": params_ref,
          "PARAMS_NEW": params_new, "KEYS": keys}


def __getattr__(name):  # PEP 562: the compiled values on first access
  if name in ("BATCH", "GRAPHDEF", "PARAMS_OLD", "PARAMS_REF", "PARAMS_NEW", "KEYS"):
    return _lazy_values()[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def jitted(name: str, which: str):
  obj = registry.get_objective(name)
  return fast_jit(getattr(obj, which), static_argnums=(0, 5))


def run(name: str, params, batch=None, aux=None, prepare_params=None, **overrides):
  """The objective's prepare (on ``prepare_params``, default PARAMS_OLD, unless ``aux`` is given)
  and grads on ``params`` for ``batch`` (default BATCH); returns (grads, output, aux)."""
  values = _lazy_values()
  batch = values["BATCH"] if batch is None else batch
  obj = registry.get_objective(name)
  cfg = obj.make_config(overrides)
  if aux is None:
    prepare_params = values["PARAMS_OLD"] if prepare_params is None else prepare_params
    aux = jitted(name, "prepare")(values["GRAPHDEF"], prepare_params, values["PARAMS_REF"], batch,
                                  values["KEYS"], cfg)
  grads, out = jitted(name, "grads")(values["GRAPHDEF"], params, batch, aux, values["KEYS"], cfg)
  return grads, out, aux


def assert_trees_close(a, b, rtol=2e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def model(params):
  return nnx.merge(_lazy_values()["GRAPHDEF"], params)


def full_canvas(batch=None):
  return (_lazy_values()["BATCH"] if batch is None else batch)["completion_mask"]
