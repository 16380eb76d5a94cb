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
# With --distributed on Cloud TPU / SLURM these are detected; set them for other clusters or for
# several processes on one machine (CPU collectives go through gloo).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (--distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--distributed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  logging.getLogger("dmpo_jax").setLevel(logging.INFO)
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU arrays
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  try:
    results = loop.train(config, _WORKDIR.value)
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
