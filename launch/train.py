"""Trains a masked diffusion LLM with RL (DMPO, BGPO or a baseline).

  python launch/train.py --config=configs/bgpo_math.py --workdir=runs/bgpo_math \
      --config.model.checkpoint=/models/LLaDA-8B-Instruct [--config.optimizer.learning_rate=1e-6 ...]

Any config field can be overridden with --config.KEY=VALUE (e.g. --config.dmpo.alpha=0.05).
Re-running the same command resumes from the latest checkpoint (or starts again when it was
stopped before its first one); a finished run says so and exits 0. One run at a time per
--workdir. Ctrl-C stops cleanly (exit 130), saving a checkpoint once an RL step is done; SIGTERM
(preemption) saves and exits 0. A preset other than `tiny` needs --config.model.checkpoint (or
--config.model.init=random).
The built-in demo (no download, 2 CPU cores, a few minutes):

  python launch/train.py --config=configs/demo.py --workdir=runs/demo
"""

import json
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dmpo_jax import cli  # noqa: E402

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file; override fields with --config.KEY=VALUE.",
    flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, plots).",
                               flag_values=FLAGS)
_PLOT = flags.DEFINE_bool("plot", True, "Draw reward/accuracy curves to WORKDIR/curves.png at the end.",
                          flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host TPU/GPU pods).",
                                 flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Start from scratch where --workdir holds a run this config cannot "
    "continue (checkpoints that differ in a structural key such as the objective, the model or "
    "LoRA, or metrics of another config without a checkpoint): its checkpoints, metrics and "
    "final model are discarded. Without it such a workdir is an error; a workdir this config "
    "can resume is always resumed.", flag_values=FLAGS)
_FALLBACK = flags.DEFINE_bool(
    "fallback_to_previous_checkpoint", False, "If the latest checkpoint fails its checksums, "
    "resume from the newest intact one (the damaged steps are renamed corrupt-<step>); without "
    "it the damage is an error.", flag_values=FLAGS)
# With --distributed on Cloud TPU / SLURM these are detected; set them for other clusters or for
# several processes on one machine (CPU collectives go through gloo).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (--distributed).",
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed).",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--distributed).",
                                   flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def _run():
  config = _CONFIG.value
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU arrays
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from dmpo_jax.rl import loop  # pylint: disable=import-outside-toplevel
  from dmpo_jax import checkpointing  # pylint: disable=import-outside-toplevel
  try:
    results = loop.train(config, _WORKDIR.value, overwrite=_OVERWRITE.value,
                         fallback_to_previous_checkpoint=_FALLBACK.value)
  except checkpointing.CheckpointIntegrityError as e:
    raise cli.UserError(f"{e} (--fallback_to_previous_checkpoint resumes from the newest intact "
                        "checkpoint)") from e
  stopped = "interrupted_at" in results or "preempted_at" in results
  if _PLOT.value and jax.process_index() == 0 and "finished" not in results and not stopped:
    from launch import plot  # pylint: disable=import-outside-toplevel
    try:
      out = plot.plot_curves(pathlib.Path(_WORKDIR.value), pathlib.Path(_WORKDIR.value) / "curves.png")
      results["plot"] = str(out.absolute())
    except (ValueError, OSError, cli.UserError) as e:
      logging.warning("no plot: %s", e)
  print(json.dumps(results, indent=2, default=float))
  if "interrupted_at" in results:
    print(f"error: interrupted by Ctrl-C (SIGINT) at step {results['interrupted_at']}: checkpoint "
          "saved; re-run the same command to resume", file=sys.stderr)
    return cli.EXIT_INTERRUPTED
  return 0


def main(argv=None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
