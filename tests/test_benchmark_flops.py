"""The update FLOP counts of `benchmarks/train_step.py` against hand counts (the MFU it reports)."""

import pathlib
import sys

from dmpo_jax.models.config import get_preset
from dmpo_jax.rl import registry

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import MC_FIELD, step_model_flops  # noqa: E402
from train_step import lora_update_flops  # noqa: E402


def test_lora_update_flops_give_the_frozen_base_no_weight_gradient():
  # tiny: d=64, 2 layers, 4 heads x 16, kv 2 x 16, mlp 128 (hand-counted below).
  config = get_preset("tiny", lora_rank=4, lora_targets=("q_proj", "ff_out"))
  d, layers, f, vocab, t, batch = 64, 2, 128, config.vocab_size, 48, 3
  assert (config.d_model, config.n_layers, config.mlp_hidden_size) == (d, layers, f)
  matmul = layers * (d * 4 * 16 + 2 * d * 2 * 16 + d * 4 * 16 + 3 * d * f) + vocab * d  # + head
  attention = 4 * layers * 4 * 16 * t
  adapters = layers * 4 * ((d + 4 * 16) + (f + d))  # q_proj: d -> 4x16, ff_out: f -> d
  assert config.num_lora_params() == adapters
  ocfg = registry.get_objective("bgpo").make_config({"num_mc": 2})  # 2 grad passes, no no-grad
  per_pass = 2 * matmul + 2 * matmul + 3 * attention + 6 * adapters
  assert lora_update_flops(config, "bgpo", ocfg, batch, t) == 2 * batch * t * per_pass
  full = step_model_flops(config, "bgpo", ocfg, batch, t)
  assert full == 2 * batch * t * 3 * (2 * matmul + attention)
  assert lora_update_flops(config, "bgpo", ocfg, batch, t) < full
  # DMPO with the model baseline adds no-grad forwards: 2·N + A + 2·N_lora each.
  dmpo = registry.get_objective("dmpo").make_config({"baseline": "model"})
  no_grad_total = lora_update_flops(config, "dmpo", dmpo, batch, t) - getattr(dmpo, MC_FIELD["dmpo"]) * batch * t * per_pass
  assert no_grad_total % (batch * t * (2 * matmul + attention + 2 * adapters)) == 0
  assert no_grad_total > 0
