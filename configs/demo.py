"""The built-in demo: no download, 2 CPU cores, a few minutes.

The tiny model (byte tokenizer) first learns to sort 4 digits by masked-diffusion SFT on *mixed*
demonstrations (30 % ascending, 70 % descending), so after the warm-up it can sort but greedily
answers in the majority (descending) order. RL with the reward "digits in ascending order" then
moves it: held-out accuracy (disjoint digit strings) is measured right after the warm-up
(step 0 in metrics.jsonl) and at the end of RL.

  python launch/train.py --config=configs/demo.py --workdir=runs/demo
  python launch/train.py --config=configs/demo.py --workdir=runs/demo_dmpo --config.objective=dmpo
"""

from configs import base


def get_config():
  config = base.get_config()
  config.seed = 0
  config.objective = "bgpo"
  config.model.preset = "tiny"
  config.model.remat = False
  config.tokenizer = "byte"
  config.task.name = "digit_sort"
  config.task.prompt_length = 5          # "3142="
  config.task.reward_workers = 0         # the sort reward is trivial: no worker processes
  config.num_steps = 60
  config.prompts_per_step = 16
  config.group_size = 8
  config.updates_per_rollout = 1

  config.rollout.gen_length = 5          # 4 digits + EOS
  config.rollout.block_length = 5
  config.rollout.steps = 5
  config.rollout.temperature = 1.0

  config.sft.num_steps = 600
  config.sft.batch_size = 128
  config.sft.learning_rate = 3e-3
  config.sft.ascending_fraction = 0.3

  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.99
  config.optimizer.max_grad_norm = 1.0

  config.eval.every_steps = 10
  config.eval.num_examples = 256
  config.eval.gen_length = 5
  config.eval.block_length = 5
  config.eval.steps = 5
  config.eval.batch_size = 128

  config.checkpoint.every_steps = 20
  config.checkpoint.max_to_keep = 2

  config.bgpo.num_mc = 4
  config.dmpo.alpha = 0.1
  return config
