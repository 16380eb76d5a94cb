"""Model configuration and presets for the bidirectional masked-diffusion transformer.

One architecture covers LLaDA-8B(-Instruct) (`docs/llada.md` §1-3) and Dream-7B (`docs/llada.md` §9):
pre-norm blocks with RMSNorm (fp32), rotate-half RoPE (fp32), SwiGLU MLP, MHA or GQA, optional
q/k/v bias, untied output head. The two families differ in

* ``logit_alignment``: ``same_position`` (LLaDA: logits at i predict token i) or ``shifted``
  (Dream: logits at i predict token i+1, so the prediction for i is read from i-1);
* ``positions_from_padding``: LLaDA uses absolute positions 0..T-1 even with left padding, Dream
  uses ``cumsum(attention_mask) - 1`` so positions start at the first real token.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

import jax.numpy as jnp

FAMILIES = ("llada", "dream")
LOGIT_ALIGNMENTS = ("same_position", "shifted")
DTYPES = ("float32", "bfloat16", "float16")
# LoRA targets by LLaDA checkpoint name (`docs/llada.md` §3) -> the Flax parameter they adapt. The
# HF-Llama / Qwen2 names of the same modules are accepted as aliases (`LORA_TARGET_ALIASES`).
LORA_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "attn_out": "o_proj",
                "ff_proj": "gate_proj", "up_proj": "up_proj", "ff_out": "down_proj"}
LORA_TARGET_ALIASES = {"o_proj": "attn_out", "gate_proj": "ff_proj", "down_proj": "ff_out"}


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")  # `dmpo_jax.models.attention`
_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "mlp_hidden_size", "max_seq_len", "mask_token_id", "eos_token_id", "pad_token_id",
               "logprob_chunk_size", "logprob_vocab_tile", "lora_rank")
_OPTIONAL_INT_FIELDS = ("eot_token_id", "bos_token_id")
_FLOAT_FIELDS = ("rope_theta", "norm_eps", "initializer_range", "lora_alpha")
_BOOL_FIELDS = ("qkv_bias", "positions_from_padding", "remat", "use_key_padding_mask")
_STR_FIELDS = ("family", "logit_alignment", "param_dtype", "dtype", "grad_reduce_dtype")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the transformer. Frozen so it can be a static jit argument."""

  family: str = "llada"
  vocab_size: int = 126464
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  head_dim: int = 128
  mlp_hidden_size: int = 12288
  rope_theta: float = 500000.0
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  logit_alignment: str = "same_position"
  positions_from_padding: bool = False
  max_seq_len: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  use_key_padding_mask: bool = True
  # Special token ids. Defaults are LLaDA's; loaders overwrite them from the checkpoint.
  mask_token_id: int = 126336
  eos_token_id: int = 126081
  pad_token_id: int = 126081
  eot_token_id: Optional[int] = 126348
  bos_token_id: Optional[int] = 126080
  initializer_range: float = 0.02
  # How many sequence positions the chunked log-prob function processes at once.
  logprob_chunk_size: int = 128
  # Most output-head columns the log-prob function handles at once (`models.logprobs`): the head
  # is gathered one vocabulary tile at a time and its fp32 gradient carry is [D, tile].
  logprob_vocab_tile: int = 16384
  # dtype in which weight gradients are summed over devices (`sharding.gather_for_compute`):
  # "" = the compute dtype, "float32" = an fp32 reduce-scatter rounded once.
  grad_reduce_dtype: str = ""
  # Attention kernel (`dmpo_jax.models.attention`): "auto" (splash on TPU, cuDNN on GPU for
  # bf16 / fp16, else XLA), "xla", "cudnn" or "splash". None (older checkpoints) reads as "auto".
  attention_impl: str = "auto"
  # LoRA adapters (`dmpo_jax.models.lora`): rank 0 = none. Targets use LLaDA's names
  # (`LORA_TARGETS`) or their HF-Llama aliases; stored as canonical LLaDA names in
  # `LORA_TARGETS` order. Output of a target += (x A) B · lora_alpha / lora_rank.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

  def __post_init__(self):
    type_errors = self._type_errors()
    if type_errors:  # range checks below assume the types
      raise ValueError("Invalid ModelConfig: " + "; ".join(type_errors))
    errors = self._canonicalize_lora_targets()
    if self.attention_impl is None:
      object.__setattr__(self, "attention_impl", "auto")
    for name, low in (("rope_theta", 0.0), ("norm_eps", 0.0)):
      if not getattr(self, name) > low:
        errors.append(f"{name} must be positive, got {getattr(self, name)}")
    if self.initializer_range < 0:
      errors.append(f"initializer_range must be >= 0, got {self.initializer_range}")
    if self.attention_impl not in ATTENTION_IMPLS:
      errors.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if int(self.lora_rank) < 0:
      errors.append(f"lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
    elif self.lora_rank > 0:
      if not self.lora_targets and not errors:
        errors.append(f"lora_rank={self.lora_rank} needs lora_targets (any of {tuple(LORA_TARGETS)})")
      if not self.lora_alpha > 0:
        errors.append(f"lora_alpha must be positive, got {self.lora_alpha}")
    elif self.lora_targets:
      errors.append(f"lora_targets={self.lora_targets} is set but lora_rank is 0 (no adapters)")
    if self.family not in FAMILIES:
      errors.append(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.logit_alignment not in LOGIT_ALIGNMENTS:
      errors.append(f"logit_alignment must be one of {LOGIT_ALIGNMENTS}, got {self.logit_alignment!r}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        errors.append(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.grad_reduce_dtype not in ("",) + DTYPES:
      errors.append(f"grad_reduce_dtype must be '' (the compute dtype) or one of {DTYPES}, got "
                    f"{self.grad_reduce_dtype!r}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_hidden_size", "max_seq_len", "logprob_chunk_size", "logprob_vocab_tile"):
      if int(getattr(self, name)) <= 0:
        errors.append(f"{name} must be positive, got {getattr(self, name)}")
    if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
      errors.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      errors.append(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id", "bos_token_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < self.vocab_size:
        errors.append(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
    if self.mask_token_id == self.pad_token_id:
      errors.append("mask_token_id must differ from pad_token_id (the sampler finds masks by id)")
    if errors:
      raise ValueError("Invalid ModelConfig: " + "; ".join(errors))

  def _type_errors(self) -> list[str]:
    """One message per field whose value has the wrong type (ints: integers, not bools; floats:
    finite numbers; bools: bools; strings: strings)."""
    errors = []
    for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
      value = getattr(self, name)
      if value is None and name in _OPTIONAL_INT_FIELDS:
        continue
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        errors.append(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    for name in _FLOAT_FIELDS:
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or not math.isfinite(value)):
        errors.append(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    for name in _BOOL_FIELDS:
      if not isinstance(getattr(self, name), bool):
        errors.append(f"{name} must be true or false, got {getattr(self, name)!r}")
    for name in _STR_FIELDS:
      if not isinstance(getattr(self, name), str):
        errors.append(f"{name} must be a string, got {getattr(self, name)!r}")
    return errors

  def _canonicalize_lora_targets(self) -> list[str]:
    """LoRA targets -> a tuple of canonical LLaDA names in `LORA_TARGETS` order (lists from
    JSON / config files accepted); returns error messages for unknown or repeated names."""
    given = self.lora_targets
    if isinstance(given, str):
      return [f"lora_targets must be a sequence of module names, got the string {given!r}"]
    errors, canonical = [], []
    for name in given:
      llada_name = LORA_TARGET_ALIASES.get(name, name)
      if llada_name not in LORA_TARGETS:
        errors.append(f"lora_targets: unknown module {name!r}; LLaDA names {tuple(LORA_TARGETS)} "
                      f"or aliases {tuple(LORA_TARGET_ALIASES)}")
      elif llada_name in canonical:
        errors.append(f"lora_targets names module {llada_name!r} twice (given {tuple(given)})")
      else:
        canonical.append(llada_name)
    object.__setattr__(self, "lora_targets", tuple(n for n in LORA_TARGETS if n in canonical))
    return errors

  @property
  def lora_scale(self) -> float:
    """alpha / r, the factor of the adapter output (0 when LoRA is off)."""
    return float(self.lora_alpha) / self.lora_rank if self.lora_rank else 0.0

  def lora_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{Flax parameter name: (input dims, output dims)} of every LoRA-adapted kernel."""
    d, f, hd = self.d_model, self.mlp_hidden_size, self.head_dim
    dims = {"q_proj": ((d,), (self.n_heads, hd)), "k_proj": ((d,), (self.n_kv_heads, hd)),
            "v_proj": ((d,), (self.n_kv_heads, hd)), "o_proj": ((self.n_heads, hd), (d,)),
            "gate_proj": ((d,), (f,)), "up_proj": ((d,), (f,)), "down_proj": ((f,), (d,))}
    return {LORA_TARGETS[t]: dims[LORA_TARGETS[t]] for t in self.lora_targets}

  def num_lora_params(self) -> int:
    """Adapter parameters: n_layers · r · Σ_targets (fan_in + fan_out)."""
    total = 0
    for fan_in, fan_out in self.lora_shapes().values():
      total += math.prod(fan_in) + math.prod(fan_out)
    return self.n_layers * self.lora_rank * total

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def num_params(self) -> int:
    """Exact base parameter count (embedding + blocks + final norm + untied head); LoRA
    adapters are counted separately by `num_lora_params`."""
    d, f, hd = self.d_model, self.mlp_hidden_size, self.head_dim
    attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
    if self.qkv_bias:
      attn += (self.n_heads + 2 * self.n_kv_heads) * hd
    block = attn + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + self.n_layers * block + d

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * matmul params + attention scores (bidirectional: full T)."""
    matmul_params = self.num_params() - self.vocab_size * self.d_model - (2 * self.n_layers + 1) * self.d_model
    attention = 4 * self.n_layers * self.n_heads * self.head_dim * seq_len
    return 2.0 * matmul_params + attention


_PRESETS = {
    # LLaDA-8B / LLaDA-8B-Instruct (GSAI-ML/LLaDA-8B-Instruct config.json), `docs/llada.md` §1.
    "llada_8b": dict(
        family="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        head_dim=128, mlp_hidden_size=12288, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
        logit_alignment="same_position", positions_from_padding=False, max_seq_len=4096,
        param_dtype="bfloat16", dtype="bfloat16", remat=True,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348,
        bos_token_id=126080),
    # Dream-v0-Instruct-7B (Qwen2 layout), `docs/llada.md` §9.
    "dream_7b": dict(
        family="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        head_dim=128, mlp_hidden_size=18944, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
        logit_alignment="shifted", positions_from_padding=True, max_seq_len=2048,
        param_dtype="bfloat16", dtype="bfloat16", remat=True,
        mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, eot_token_id=151645,
        bos_token_id=None),
    # ~1.1B LLaDA-shaped model with the real LLaDA vocabulary and special ids, for benchmarks.
    "llada_1b": dict(
        family="llada", vocab_size=126464, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
        head_dim=128, mlp_hidden_size=5632, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
        logit_alignment="same_position", positions_from_padding=False, max_seq_len=4096,
        param_dtype="bfloat16", dtype="bfloat16", remat=True,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348,
        bos_token_id=126080),
    # Fast on CPU: used by tests and the built-in demo with the byte-level tokenizer
    # (ids 0..255 bytes, 256.. special tokens; see `dmpo_jax.models.tokenizer.ByteTokenizer`).
    "tiny": dict(
        family="llada", vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, mlp_hidden_size=128, rope_theta=10000.0, norm_eps=1e-5, qkv_bias=False,
        logit_alignment="same_position", positions_from_padding=False, max_seq_len=512,
        param_dtype="float32", dtype="float32", remat=False,
        mask_token_id=256, eos_token_id=257, pad_token_id=257, eot_token_id=258,
        bos_token_id=259, logprob_chunk_size=64),
}

PRESET_NAMES = tuple(sorted(_PRESETS))


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset (`llada_8b`, `dream_7b`, `llada_1b`, `tiny`) with overrides."""
  if name not in _PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; expected one of {PRESET_NAMES}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"Unknown ModelConfig field(s) {sorted(unknown)} for preset {name!r}")
  return ModelConfig(**{**_PRESETS[name], **overrides})
