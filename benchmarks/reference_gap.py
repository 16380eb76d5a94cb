"""The measured difference between each reference-behaviour option and the library default, as
JSON (the numbers of `docs/algorithms.md` §6).

  python benchmarks/reference_gap.py [--gen_length=32] [--seed=0]

On the `tiny` transformer (random weights, fp32) and one prompt-major batch of 2 prompts x G = 16
completions (left-padded prompts of 6 to 12 tokens, completions with early, late and no EOS,
rewards in {0, 0.5, 1, 2, 2.5}), each option is run through the registry's prepare + grads next to
its default and reported as |Δloss| (with the default's |loss|) and max|Δgrad| / max|grad|.
Padding: the max |Δ log p| over real completion positions between one unpadded row (what the
references compute, one prompt per device batch) and the same row in the padded batch, with and
without the key-padding mask.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402  pylint: disable=wrong-import-position

from dmpo_jax.models.config import get_preset  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.models.transformer import create_model, split_model  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.rl import advantages as adv  # noqa: E402  pylint: disable=wrong-import-position
from dmpo_jax.rl import reference_rules, registry, scoring  # noqa: E402  pylint: disable=wrong-import-position

PROMPTS, GROUP, MICRO = 2, 16, 8


def make_batch(gen_length: int, seed: int, eos: int, pad: int) -> dict:
  rng = np.random.default_rng(seed)
  b = PROMPTS * GROUP
  prompt_len = 12
  seq = rng.integers(0, 256, (b, prompt_len + gen_length)).astype(np.int32)
  attn = np.ones(seq.shape, bool)
  for p in range(PROMPTS):
    n = int(rng.integers(6, prompt_len + 1))
    rows = slice(p * GROUP, (p + 1) * GROUP)
    seq[rows, :prompt_len] = rng.integers(0, 256, prompt_len)
    seq[rows, :prompt_len - n] = pad
    attn[rows, :prompt_len - n] = False
  for i in range(b):
    if i % 3 == 0:
      seq[i, prompt_len + int(rng.integers(1, gen_length // 2)):] = eos
    elif i % 3 == 1:
      seq[i, prompt_len + int(rng.integers(gen_length // 2, gen_length)):] = eos
  prompt = np.zeros(seq.shape, bool)
  prompt[:, :prompt_len] = True
  return {"sequences": seq, "attention_mask": attn, "prompt_mask": prompt, "completion_mask": ~prompt,
          "rewards": rng.choice([0.0, 0.5, 1.0, 2.0, 2.5], b).astype(np.float32),
          "group_ids": np.repeat(np.arange(PROMPTS), GROUP).astype(np.int32),
          "example_ids": np.arange(b, dtype=np.int32)}


class Runner:
  def __init__(self, gen_length: int, seed: int):
    self.config = get_preset("tiny")
    self.graphdef, self.old = split_model(create_model(self.config, seed))
    self.ref = split_model(create_model(self.config, seed + 1))[1]
    self.new = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(seed + 7), p.shape),
                            self.old)
    self.batch = jax.tree.map(jnp.asarray, make_batch(gen_length, seed, self.config.eos_token_id,
                                                      self.config.pad_token_id))
    self.keys = scoring.make_keys(jax.random.key(seed), 3, 5, 1)

  def run(self, name, on_policy=False, **overrides):
    obj = registry.get_objective(name)
    cfg = obj.make_config(overrides)
    prepare = jax.jit(obj.prepare, static_argnums=(0, 5))
    grads_fn = jax.jit(obj.grads, static_argnums=(0, 5))
    params = self.new if not on_policy else self.old
    aux = prepare(self.graphdef, self.old, self.ref, self.batch, self.keys, cfg)
    grads, out = grads_fn(self.graphdef, params, self.batch, aux, self.keys, cfg)
    flat = np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(grads)])
    return float(out.loss), flat, aux

  def gap(self, name, default, option, on_policy=False):
    loss_a, grad_a, _ = self.run(name, on_policy, **default)
    loss_b, grad_b, _ = self.run(name, on_policy, **option)
    return {"loss_default": loss_a, "loss_option": loss_b, "abs_loss_diff": abs(loss_a - loss_b),
            "max_grad_diff": float(np.abs(grad_a - grad_b).max()),
            "max_abs_grad_default": float(np.abs(grad_a).max()),
            "grad_ratio_option_over_default": float(np.linalg.norm(grad_b) / np.linalg.norm(grad_a))}

  def padding(self):
    """max |Δ log p| at real completion positions, unpadded row vs padded batch row."""
    b = self.batch
    row = 0
    start = int(np.argmax(np.asarray(b["attention_mask"][row])))
    seq = b["sequences"][row:row + 1, start:]
    out = {}
    for mask_on in (True, False):
      model = nnx.merge(self.graphdef, self.old)
      model.config = self.config.replace(use_key_padding_mask=mask_on)
      alone = np.asarray(model.token_log_probs(seq, seq, None))[0]
      padded = np.asarray(model.token_log_probs(b["sequences"], b["sequences"],
                                                b["attention_mask"]))[row, start:]
      comp = np.asarray(b["completion_mask"][row, start:])
      out["key_padding_mask" if mask_on else "attend_to_padding"] = float(
          np.abs(alone - padded)[comp].max())
    out["pad_tokens_in_row"] = start
    return out


def ess_solvers(seed: int) -> dict:
  """Coefficients of the two ESS solvers on saturated and unsaturated groups of 16."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, rewards in (("one_best_reward", [2.0] + [0.0] * 15),
                        ("spread_rewards", list(rng.choice([0.0, 0.5, 1.0, 2.0], 16)))):
    r = jnp.asarray(rewards, jnp.float32)
    lr = jnp.asarray(rng.normal(0, 0.5, 16), jnp.float32)
    ids = jnp.zeros((16,), jnp.int32)
    for target in (0.5, 0.7):
      raw, _ = adv.dmpo_logits(r, lr, alpha=0.04)
      bis = float(adv.ess_targeted_coeff(raw, ids, target_ess=target)[0])
      lbfgs = float(reference_rules.reference_ess_coeff(lr, r, ids, alpha=0.04, target_ess=target)[0])
      ess = {c: float(adv.normalized_ess(adv.group_softmax(c * raw, ids), ids)[0]) for c in (bis, lbfgs)}
      out[f"{name}/target_{target}"] = {"bisection": bis, "reference": lbfgs,
                                        "ess_bisection": ess[bis], "ess_reference": ess[lbfgs]}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gen_length", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  r = Runner(args.gen_length, args.seed)
  micro = {"reference_micro_batch_size": MICRO}
  scoped = {"baseline_scope": "micro_batch", **micro}
  model_loss = {"baseline": "model", "model_baseline_masks": "loss"}
  no_eos = {"include_eos_padding": False, **micro}
  loss_no_eos = {"loss_include_eos_padding": False, **micro}
  res = {
      "dmpo_group_baseline_scope": r.gap("dmpo", {"baseline": "group", **micro},
                                         {"baseline": "group", **scoped}),
      "dmpo_model_baseline_scope": r.gap(
          "dmpo", {**model_loss, **micro}, {**model_loss, **scoped}),
      "dmpo_alpha_minus_one_group_scope": r.gap(
          "dmpo", {"alpha": -1.0, "baseline": "group", **micro},
          {"alpha": -1.0, "baseline": "group", **scoped}),
      "dmpo_loss_scale": r.gap("dmpo", {}, micro),
      "dmpo_weight_eos_law": r.gap("dmpo", no_eos, {**no_eos, "weight_eos_law": "as_executed"}),
      "dmpo_loss_eos_law": r.gap("dmpo", loss_no_eos, {**loss_no_eos, "loss_eos_law": "as_executed"}),
      "bgpo_normalize_by_length": r.gap("bgpo", {"mode": "on_policy"},
                                        {"mode": "on_policy", "normalize_by_length": True}, on_policy=True),
      "bgpo_dare_clips_off_policy": r.gap(
          "bgpo", {"normalize_by_length": True},
          {"normalize_by_length": True, "clip_eps": 0.2, "dual_clip": 3.0}),
      "bgpo_dare_clips_on_policy": r.gap(
          "bgpo", {"mode": "on_policy", "normalize_by_length": True},
          {"mode": "on_policy", "normalize_by_length": True, "clip_eps": 0.2, "dual_clip": 3.0},
          on_policy=True),
  }
  # log_rnd_omit_eos: per-row ELBO_v (weights) difference between the two laws.
  _, _, aux_t = r.run("dmpo", baseline="model", include_eos_padding=False, **micro)
  _, _, aux_x = r.run("dmpo", baseline="model", include_eos_padding=False,
                      weight_eos_law="as_executed", **micro)
  diff = np.abs(np.asarray(aux_t.per_example["elbo_old"]) - np.asarray(aux_x.per_example["elbo_old"]))
  res["dmpo_weight_eos_law"]["max_row_elbo_diff_nats"] = float(diff.max())
  res["padding"] = r.padding()
  res["ess_solvers"] = ess_solvers(args.seed)
  res["setup"] = {"model": "tiny (random, fp32)", "prompts": PROMPTS, "group": GROUP,
                  "micro_batch": MICRO, "gen_length": args.gen_length, "seed": args.seed,
                  "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                  "jax": jax.__version__}
  print(json.dumps(res, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
