"""Independent numpy re-implementations of the PyTorch reference trainers' loss rules, and a mock
model to run the registry's objectives on identical tensors (`docs/algorithms.md` §6).

The mock (`TableModel`) returns per-token log-probs that are its parameters, table[row, t], the row
read from the clean target sequence (its first token is the row index). The reference rules below
are written from the reference code's operations (DMPO `dmpo_trainer.py`, DARE
`compute_policy_loss_bgpo` + `llada_dp_actor_bgpo.py`, d1 / wd1 / SPG trainers) on float64 numpy
arrays, with the reference's per-device micro-batch layout (c consecutive rows) and its gradient-
accumulation / data-parallel mean over micro-batches. The gradient of each loss with respect to the
table is written out by hand. Each function returns (loss, gradient, scale), scale being the same
reduction of the terms' absolute values (the loss's magnitude before cancellation). Random masks are
inputs: the tests regenerate the masks the objective drew from its keys (the mask laws have their
own tests).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
from flax import nnx

from dmpo_jax.models.config import get_preset

CONFIG = get_preset("tiny")
EOS = CONFIG.eos_token_id


class TableModel(nnx.Module):
  """log π(target_t | inputs) = table[row, t], row = targets[:, 0]."""

  def __init__(self, table: np.ndarray):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))
    self.config = CONFIG

  def token_log_probs(self, input_ids, targets, attention_mask=None, *, chunk_size=None):
    del input_ids, attention_mask, chunk_size
    return self.table[...][targets[:, 0]]


def make_batch(prompts: int, group: int, prompt_len: int, gen_len: int, seed: int = 0) -> dict:
  """Prompt-major batch of prompts·group rows; row i starts with token i; a mix of completions
  with an early EOS (then EOS padding), one at the last position, and none; rewards vary within
  each group (all equal in the last group when there are several, a zero-std group)."""
  rng = np.random.default_rng(seed)
  b, t = prompts * group, prompt_len + gen_len
  seq = rng.integers(0, 256, (b, t)).astype(np.int32)
  seq[:, 0] = np.arange(b)
  seq[seq == EOS] = 1
  for i in range(b):
    kind = i % 4
    if kind == 0:
      seq[i, prompt_len + int(rng.integers(1, gen_len // 2)):] = EOS
    elif kind == 1:
      seq[i, t - 1] = EOS
    elif kind == 2:
      seq[i, prompt_len + int(rng.integers(gen_len // 2, gen_len - 1)):] = EOS
  prompt = np.zeros((b, t), bool)
  prompt[:, :prompt_len] = True
  rewards = rng.choice([0.0, 0.5, 1.0, 2.0, 2.5], b).astype(np.float32)
  if prompts > 1:
    rewards[-group:] = 1.0
  return {"sequences": seq, "attention_mask": np.ones((b, t), bool), "prompt_mask": prompt,
          "completion_mask": ~prompt, "rewards": rewards,
          "group_ids": np.repeat(np.arange(prompts) * 7 + 3, group).astype(np.int32),
          "example_ids": np.arange(b, dtype=np.int32) + 100}


def completion_mask_upto_eos(batch: dict) -> np.ndarray:
  """The references' completion_mask over the canvas [B, L]: 1 up to and including the first
  EOS (everything when there is none), int as in the reference code."""
  comp = batch["sequences"][:, batch["prompt_mask"][0].sum():]
  is_eos = comp == EOS
  eos_idx = np.where(is_eos.any(1), is_eos.argmax(1), comp.shape[1])
  return (np.arange(comp.shape[1])[None] <= eos_idx[:, None]).astype(np.int64)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return scipy.special.softmax(x, axis=axis)


def grpo_advantages(rewards: np.ndarray, group: int, eps: float = 1e-6) -> np.ndarray:
  r = rewards.astype(np.float64).reshape(-1, group)
  std = r.std(axis=1, ddof=1, keepdims=True)
  return ((r - r.mean(1, keepdims=True)) / (std + eps)).reshape(-1)


def mean_centered(rewards: np.ndarray, group: int) -> np.ndarray:
  r = rewards.astype(np.float64).reshape(-1, group)
  return (r - r.mean(1, keepdims=True)).reshape(-1)


# -- DMPO (`DMPOTrainer._generate_and_score_completions`, `compute_loss`, `find_coeff`) -----------

def find_coeff(log_rnds, rewards, alpha, ess_threshold, default_coeff=0.01, coeff_range=(0.01, 0.99)):
  log_rnds = np.asarray(log_rnds, np.float32)
  rewards = np.asarray(rewards, np.float32)

  def loss(coeff):
    if alpha > 0.0:
      weights = scipy.special.softmax(coeff * (log_rnds + rewards / alpha), axis=0)
    else:
      weights = scipy.special.softmax(coeff * rewards, axis=0)
    ess = 1 / np.sum(weights ** 2) / log_rnds.shape[0]
    return (ess_threshold - ess) ** 2
  result = scipy.optimize.minimize(loss, x0=0.5, bounds=[coeff_range])
  return result.x.item() if result.success else default_coeff


def dmpo_reference(*, theta_v, theta_ref, theta_new, weight_masks, loss_masks, rewards, group,
                   micro, cmask, alpha=0.04, coeff=1.0, baseline="individual", strength=1.0,
                   ada_threshold=None, log_rnd_omit_eos=False, loss_mask_non_eos=False):
  """(loss, d loss / d theta_new [B, L]) of the DMPO reference (``loss="wdce"``).

  theta_*: per-token log-probs [B, L] on the canvas; weight_masks [K, B, L], loss_masks [R, B, L]
  (bool, canvas positions); micro = per-device batch c; cmask = `completion_mask_upto_eos`.
  alpha = -1 follows the intent (w = r, w⁻ = −r): the reference raises UnboundLocalError there.
  """
  b, length = theta_new.shape
  num_proc = b // micro

  def elbo_per_token(theta):  # compute_log_prob_elbo: mean_k (L / m_k)·log p at masked positions
    m = np.maximum(weight_masks.sum(-1), 1)
    return ((length / m)[..., None] * weight_masks * theta[None]).mean(0)

  pre, cur = elbo_per_token(theta_ref), elbo_per_token(theta_v)
  if log_rnd_omit_eos:
    pre, cur = pre * cmask, cur * cmask
  pre, cur = pre.sum(1), cur.sum(1)
  grouped_r = rewards.astype(np.float64).reshape(num_proc, micro)
  grouped_lr = (pre - cur).reshape(num_proc, micro)
  if alpha != -1:
    coeffs = np.full((num_proc, 1), coeff)
    if ada_threshold is not None:
      for i in range(num_proc):
        coeffs[i, 0] = np.float32(find_coeff(grouped_lr[i], grouped_r[i], alpha, ada_threshold))
    if alpha > 0:
      pos = coeffs * (grouped_lr + grouped_r / alpha)
      neg = coeffs * (grouped_lr - grouped_r / alpha)
    else:
      pos, neg = coeffs * grouped_r, -coeffs * grouped_r
    adv = softmax(pos.reshape(-1, group)).reshape(-1)
    neg_adv = softmax(neg.reshape(-1, group)).reshape(-1)
  else:
    adv, neg_adv = grouped_r.reshape(-1), -grouped_r.reshape(-1)

  r = loss_masks.shape[0]
  losses, scales, grad = [], [], np.zeros_like(theta_new, np.float64)
  for k in range(num_proc):
    rows = slice(k * micro, (k + 1) * micro)
    masked_index = loss_masks[:, rows].reshape(r * micro, length).copy()   # x.repeat([R, 1]) layout
    if loss_mask_non_eos:  # as executed: ~ on an int tensor, then integer (row) indexing
      masked_index[~np.tile(cmask[rows], (r, 1))] = False
    m = np.maximum(masked_index.sum(-1), 1)
    logp = np.tile(theta_new[rows], (r, 1))
    ce = np.where(masked_index, -logp, 0.0)
    a = np.tile(adv[rows], r)
    if baseline != "none":
      if baseline == "model":
        lpt = (-ce).reshape(r, micro, length).transpose(1, 0, 2)
        tw = (length / m).reshape(r, micro, 1).transpose(1, 0, 2)
        lpt = (tw * lpt).mean(1).sum(1)
        factor = np.tile(softmax(lpt - cur[rows]), r)
      elif baseline == "individual":
        factor = np.tile(neg_adv[rows], r)
      else:
        factor = a.mean()
      a = a - strength * factor
    losses.append((ce.sum(-1) / m * a).sum() / r)
    scales.append(np.abs(ce.sum(-1) / m * a).sum() / r)
    grad[rows] += (-(masked_index * (a / m)[:, None]) / r).reshape(r, micro, length).sum(0)
  return float(np.mean(losses)), grad / num_proc, float(np.mean(scales))


# -- BGPO (DARE) and VRPO-OL ---------------------------------------------------------------------

def dare_bgpo_reference(*, theta_new, theta_old, masks, rewards, group, clip=0.2, dual_clip=3.0,
                        normalize=True):
  """DARE's BGPO: per MC copy ℓ = (L/k)·Σ_masked log p / L, ratio 1 + d (A > 0, written
  exp(log(1 + d))) or exp(d), verl's PPO clip + dual clip, token mean of a per-sequence constant
  (= mean over rows), / mc_num, summed over copies. ``clip=None`` drops the clips (the paper)."""
  n, b, length = masks.shape
  a = grpo_advantages(rewards, group)
  loss, scale_sum, grad = 0.0, 0.0, np.zeros((b, length))
  for j in range(n):
    k = masks[j].sum(-1)
    scale = (length / k) / (length if normalize else 1.0)
    d = scale * ((theta_new - theta_old) * masks[j]).sum(-1)
    ratio = np.where(a > 0, np.exp(np.log(1 + d)), np.exp(d))
    dratio = np.where(a > 0, 1.0, np.exp(d))
    pg = -a * ratio
    active = np.ones(b, bool)
    if clip is not None:
      pg2 = -a * np.clip(ratio, 1 - clip, 1 + clip)
      active = pg >= pg2
      pg = np.maximum(pg, pg2)
      lower = (a < 0) & (-a * dual_clip < pg)
      active &= ~lower
      pg = np.where(lower, -a * dual_clip, pg)
    loss += pg.mean() / n
    scale_sum += np.abs(pg).mean() / n
    grad += (np.where(active, -a * dratio, 0.0) * scale)[:, None] * masks[j] / (b * n)
  return loss, grad, scale_sum


def vrpo_ol_reference(*, theta_new, theta_old, masks, rewards, group, normalize=True):
  """BGPO paper Eq. 6-7 with DARE's ELBO scale: L = −mean_i exp(mean_j d_ij)·A_i."""
  n, b, length = masks.shape
  a = grpo_advantages(rewards, group)
  k = masks.sum(-1)
  scale = (length / k) / (length if normalize else 1.0)
  d = (scale * ((theta_new - theta_old)[None] * masks).sum(-1)).mean(0)
  coef = np.exp(d) * a
  grad = -(coef[None, :, None] * scale[..., None] * masks).sum(0) / (n * b)
  return float(-coef.mean()), grad, float(np.abs(coef).mean())


# -- d1 / wd1 / SPG -------------------------------------------------------------------------------

def d1_reference(*, theta_new, theta_old, theta_ref, cmask, rewards, group, micro, clip_eps=0.5,
                 beta=0.04):
  """diffu-GRPO: per-token clipped ratio + k3 KL, token mean per per-device micro-batch,
  averaged over micro-batches."""
  a = mean_centered(rewards, group)[:, None]
  valid = cmask.astype(bool)
  ratio = np.exp(theta_new - theta_old)
  unclipped, clipped = ratio * a, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a
  per_token_kl = np.exp(theta_ref - theta_new) - (theta_ref - theta_new) - 1
  per_token = -(np.minimum(unclipped, clipped) - beta * per_token_kl)
  d_token = np.where(unclipped <= clipped, -a * ratio, 0.0) + beta * (1 - np.exp(theta_ref - theta_new))
  b = theta_new.shape[0]
  losses, scales, grad = [], [], np.zeros_like(theta_new)
  for k in range(b // micro):
    rows = slice(k * micro, (k + 1) * micro)
    count = valid[rows].sum()
    losses.append(np.where(valid[rows], per_token[rows], 0.0).sum() / count)
    scales.append(np.where(valid[rows], np.abs(per_token[rows]), 0.0).sum() / count)
    grad[rows] = np.where(valid[rows], d_token[rows], 0.0) / count
  return float(np.mean(losses)), grad / (b // micro), float(np.mean(scales))


def wd1_reference(*, theta_new, cmask, rewards, group, micro, pos_only=True):
  """wd1: w⁺ = softmax(A), w⁻ = softmax(−A) over the per-device batch, ℓ = Σ_{≤ EOS} log p,
  loss −Σ w⁺ℓ (+ Σ w⁻ℓ), averaged over micro-batches."""
  a = mean_centered(rewards, group)
  valid = cmask.astype(bool)
  ll = np.where(valid, theta_new, 0.0).sum(-1)
  b = theta_new.shape[0]
  losses, scales, grad = [], [], np.zeros_like(theta_new)
  for k in range(b // micro):
    rows = slice(k * micro, (k + 1) * micro)
    coef = -softmax(a[rows]) + (0.0 if pos_only else softmax(-a[rows]))
    losses.append(float((coef * ll[rows]).sum()))
    scales.append(float(np.abs(coef * ll[rows]).sum()))
    grad[rows] = coef[:, None] * valid[rows]
  return float(np.mean(losses)), grad / (b // micro), float(np.mean(scales))


def spg_reference(*, theta_new, scored, cmask, rewards, group, micro, beta=1.5):
  """SPG (EUBO negatives): ℓ⁺ per-masked-token mean over J draws, EUBO
  (1/β)·mean_{d: P̄_d > 0} log P̄_d with P̄_d = (1/J) Σ_j 1[d∈M_j]·p_d^β/t_j, t_j = |M_j|/|c|;
  loss Σ(−A·ℓ·|c|)/Σ|c| per micro-batch, averaged over micro-batches. scored [J, B, L]."""
  n = scored.shape[0]
  valid = cmask.astype(bool)
  c_len = valid.sum(-1).astype(np.float64)
  a = mean_centered(rewards, group)
  m = scored.sum(-1)
  pos = (np.where(scored, theta_new[None], 0.0).sum(-1) / np.maximum(m, 1)).mean(0)
  d_pos = (scored / np.maximum(m, 1)[..., None]).mean(0)
  t = m / c_len[None]
  pbar = (np.where(scored, np.exp(beta * theta_new)[None], 0.0) / np.maximum(t, 1e-30)[..., None]).mean(0)
  covered = pbar > 0
  count = covered.sum(-1)
  eubo = np.where(covered, np.log(np.where(covered, pbar, 1.0)), 0.0).sum(-1) / (beta * count)
  d_eubo = covered / count[:, None]
  score = np.where(a > 0, pos, eubo)
  d_score = np.where((a > 0)[:, None], d_pos, d_eubo)
  b = theta_new.shape[0]
  losses, scales, grad = [], [], np.zeros_like(theta_new)
  for k in range(b // micro):
    rows = slice(k * micro, (k + 1) * micro)
    total = c_len[rows].sum()
    losses.append(float((-a[rows] * score[rows] * c_len[rows]).sum() / total))
    scales.append(float(np.abs(a[rows] * score[rows] * c_len[rows]).sum() / total))
    grad[rows] = (-a[rows] * c_len[rows])[:, None] * d_score[rows] / total
  return float(np.mean(losses)), grad / (b // micro), float(np.mean(scales))
