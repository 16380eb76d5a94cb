"""Layout-dependent rules of the PyTorch reference trainers, reproduced on request
(`docs/algorithms.md` §6).

The reference trainers compute some statistics over the per-device micro-batch instead of the
group of a prompt. `dmpo_jax` defaults to the layout-free group versions; the published configs
switch these rules on where the paper's runs used them. A *reference micro-batch* is c consecutive
rows of the update batch (prompt-major, as TRL's repeat sampler lays a batch over devices, so with
G = 16 and c = 8 each micro-batch is half a group).

* `micro_batch_ids`: the scope labels row // c, usable wherever the `advantages` helpers take
  group labels (group means and softmaxes over the micro-batch instead of the group).
* `reference_ess_coeff`: the DMPO reference's ``find_coeff`` (adaptive coefficient for a target
  ESS): `scipy.optimize.minimize` (L-BFGS-B, bounds [0.01, 0.99], start 0.5, finite-difference
  gradient) of (target − ESS(c))², run on the host through `jax.pure_callback`, so it stays
  deterministic and jit-compatible. L-BFGS-B stops when the projected gradient is <= 1e-5; when
  the weights at c = 0.5 are already saturated (a best reward ahead by ≳ 10 nats of r/α, common
  at α = 0.04), ESS(0.5 ± 1e-8) equals ESS(0.5) to double precision, the gradient is 0 and the
  optimiser returns c = 0.5 after 0 iterations, with ``success=True``.
* `non_eos_mask_keep`: DMPO's ``loss_mask_non_eos=True`` as executed. The line
  ``masked_index[~completion_mask] = False`` applies ``~`` to an *int* mask (values 1 up to the
  first EOS, 0 after), giving −2 / −1, which then index *rows*: the last two rows of the
  [R·c, L] replicate-major loss-mask matrix are cleared (row −2 always, since position 0 is always
  before the first EOS; row −1 when some completion of the micro-batch has a position after its
  first EOS), and no position after an EOS is unmasked anywhere.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

# `find_coeff`'s defaults in the DMPO reference trainer.
REFERENCE_COEFF_RANGE = (0.01, 0.99)
REFERENCE_COEFF_START = 0.5
REFERENCE_COEFF_DEFAULT = 0.01


def micro_batch_ids(batch_size: int, micro_batch_size: int) -> jax.Array:
  """int32 [B] label of each row's reference micro-batch: row // c."""
  if micro_batch_size <= 0 or batch_size % micro_batch_size:
    raise ValueError(f"reference_micro_batch_size={micro_batch_size} must be positive and divide "
                     f"the batch ({batch_size} completions)")
  return jnp.arange(batch_size, dtype=jnp.int32) // micro_batch_size


def micro_batch_any(flags: jax.Array, micro_batch_size: int) -> jax.Array:
  """bool [B]: whether any row of each row's reference micro-batch has ``flags`` set."""
  chex.assert_rank(flags, 1)
  b = flags.shape[0]
  micro_batch_ids(b, micro_batch_size)  # validates c
  anyf = jnp.any(flags.reshape(b // micro_batch_size, micro_batch_size), axis=-1)
  return jnp.repeat(anyf, micro_batch_size)


def find_coeff(log_rnds: np.ndarray, rewards: np.ndarray, alpha: float, ess_threshold: float,
               default_coeff: float = REFERENCE_COEFF_DEFAULT,
               coeff_range: tuple[float, float] = REFERENCE_COEFF_RANGE) -> float:
  """The DMPO reference's ``find_coeff`` on host arrays (fp32 inputs, float64 arithmetic as
  numpy promotes them): argmin over c ∈ coeff_range of (threshold − ESS(softmax(c·ℓ)))², ℓ =
  log_rnd + r/α (α > 0) or r (α = 0), by L-BFGS-B from c = 0.5; ``default_coeff`` if the optimiser
  reports failure."""
  import scipy.optimize  # pylint: disable=import-outside-toplevel
  import scipy.special  # pylint: disable=import-outside-toplevel
  log_rnds = np.asarray(log_rnds, np.float32)
  rewards = np.asarray(rewards, np.float32)
  logits = log_rnds + rewards / alpha if alpha > 0 else rewards

  def loss(coeff):
    weights = scipy.special.softmax(coeff * logits, axis=0)
    # The reference's float64 host arithmetic, called by scipy per evaluation: not
    # `advantages.normalized_ess_from_sums` (fp32 on device), which would move the optimum.
    ess = 1 / np.sum(weights ** 2) / log_rnds.shape[0]
    return (ess_threshold - ess) ** 2

  result = scipy.optimize.minimize(loss, x0=REFERENCE_COEFF_START, bounds=[coeff_range])
  return float(result.x.item()) if result.success else float(default_coeff)


def _find_coeff_per_scope(log_rnds, rewards, scope_ids, alpha, ess_threshold):
  out = np.zeros(np.shape(rewards), np.float32)
  scope_ids = np.asarray(scope_ids)
  for scope in np.unique(scope_ids):
    rows = scope_ids == scope
    out[rows] = np.float32(find_coeff(np.asarray(log_rnds)[rows], np.asarray(rewards)[rows],
                                      alpha, ess_threshold))
  return out


def reference_ess_coeff(log_ratio_ref: jax.Array, rewards: jax.Array, scope_ids: jax.Array, *,
                        alpha: float, target_ess: float) -> jax.Array:
  """Per-row coefficient fp32 [B] from `find_coeff` run once per scope (``scope_ids``: groups, or
  `micro_batch_ids` for the reference's per-device rows), on the host via `jax.pure_callback`."""
  chex.assert_equal_shape([log_ratio_ref, rewards, scope_ids])
  if alpha < 0:
    raise ValueError(f"the reference ESS solver needs alpha >= 0, got {alpha}")

  def host(lr, r, ids):
    return _find_coeff_per_scope(lr, r, ids, alpha, target_ess)

  args = (log_ratio_ref.astype(jnp.float32), rewards.astype(jnp.float32), scope_ids)
  if not jax.sharding.get_abstract_mesh().empty:  # [B]-sized: gathered once, then to the host
    args = jax.lax.with_sharding_constraint(args, jax.sharding.PartitionSpec())
  return jax.pure_callback(host, jax.ShapeDtypeStruct(rewards.shape, jnp.float32), *args,
                           vmap_method="sequential")


def non_eos_mask_keep(row_in_micro_batch: jax.Array, micro_batch_has_tail: jax.Array,
                      mc_index: jax.Array, num_samples: int,
                      micro_batch_size: Optional[int]) -> jax.Array:
  """fp32 [b]: 0 for the loss-mask rows that DMPO's ``loss_mask_non_eos=True`` clears as executed,
  1 elsewhere (module docstring). Row i of a micro-batch of c, MC replicate j, sits at row
  f = j·c + i of the reference's [R·c, L] mask matrix; f = R·c − 2 is cleared always and
  f = R·c − 1 when ``micro_batch_has_tail`` (a completion of the micro-batch has a position after
  its first EOS)."""
  if micro_batch_size is None:
    raise ValueError("the as-executed loss_mask_non_eos rule needs reference_micro_batch_size")
  flat = jnp.asarray(mc_index, jnp.int32) * micro_batch_size + row_in_micro_batch.astype(jnp.int32)
  last = num_samples * micro_batch_size
  cleared = (flat == last - 2) | ((flat == last - 1) & micro_batch_has_tail)
  return jnp.where(cleared, 0.0, 1.0).astype(jnp.float32)
