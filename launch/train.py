"""Trains a masked diffusion LLM with RL (DMPO, BGPO or a baseline).

  python launch/train.py --config=configs/bgpo_math.py --workdir=runs/bgpo_math \
      [--config.optimizer.learning_rate=1e-6 ...]

Re-running with the same --workdir resumes from the latest checkpoint. The built-in demo
(no download, 2 CPU cores, a few minutes):

  python launch/train.py --config=configs/demo.py --workdir=runs/demo
"""

import json
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, plots).")
_PLOT = flags.DEFINE_bool("plot", True, "Draw reward/accuracy curves to WORKDIR/curves.png at the end.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host TPU/GPU pods).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Start from scratch in a --workdir that holds metrics but no checkpoint "
    "(its metrics.jsonl rows are discarded); without it such a workdir is an error.")
_FALLBACK = flags.DEFINE_bool(
    "fallback_to_previous_checkpoint", False, "If the latest checkpoint fails its checksums, "
    "resume from the newest intact one (the damaged steps are renamed corrupt-<step>); without "
    "it the damage is an error.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  logging.getLogger("dmpo_jax").setLevel(logging.INFO)
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  try:
    results = loop.train(config, _WORKDIR.value, overwrite=_OVERWRITE.value,
                         fallback_to_previous_checkpoint=_FALLBACK.value)
  except loop.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _PLOT.value and jax.process_index() == 0:
    from launch import plot  # pylint: disable=import-outside-toplevel
    try:
      out = plot.plot_curves(pathlib.Path(_WORKDIR.value), pathlib.Path(_WORKDIR.value) / "curves.png")
      results["plot"] = str(out)
    except (ValueError, FileNotFoundError) as e:
      logging.warning("no plot: %s", e)
  print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
  app.run(main)
