"""Plots training reward and held-out accuracy from a run's metrics.jsonl.

  python launch/plot.py --workdir=DIR [--output=FILE.png]

Reads ``DIR/metrics.jsonl`` (written by `dmpo_jax.metrics.MetricWriter`) and draws
  * ``reward/mean`` vs step, with a ± ``reward/std`` band when present;
  * ``eval/accuracy`` vs step (held-out accuracy);
one panel per available curve. Default output: ``DIR/curves.png``.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional, Sequence

from absl import flags

try:
  from dmpo_jax import cli, extras, workdir as workdir_lib
except ImportError:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from dmpo_jax import cli, extras, workdir as workdir_lib
from dmpo_jax.metrics import METRICS_FILE, read_metrics

REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
EVAL_ACCURACY = "eval/accuracy"


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  steps = [r["step"] for r in records if key in r]
  return steps, [float(r[key]) for r in records if key in r]


def plot_curves(workdir: pathlib.Path, output: Optional[pathlib.Path] = None) -> pathlib.Path:
  """Writes the PNG and returns its path; raises if the file or all curve keys are missing (or
  matplotlib, the ``plot`` extra, is not installed: `extras.MissingExtra`)."""
  extras.require("matplotlib", "drawing the curves (launch/plot.py)")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"{workdir} is a file, not the folder of a training run")
  metrics_path = workdir / METRICS_FILE
  if not metrics_path.is_file():
    raise FileNotFoundError(f"{metrics_path} not found: is --workdir the folder of a training run?")
  records = read_metrics(metrics_path)
  has_reward = any(REWARD_MEAN in r for r in records)
  has_accuracy = any(EVAL_ACCURACY in r for r in records)
  if not (has_reward or has_accuracy):
    keys = sorted({k for r in records for k in r} - {"step"})
    raise ValueError(f"{metrics_path} has none of the plotted keys {REWARD_MEAN!r}, "
                     f"{EVAL_ACCURACY!r}; keys present: {keys}")

  panels = [name for name, present in (("reward", has_reward), ("accuracy", has_accuracy)) if present]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel == "reward":
      steps, mean = _series(records, REWARD_MEAN)
      ax.plot(steps, mean, color="tab:blue", label="reward (mean)")
      with_std = [r for r in records if REWARD_MEAN in r and REWARD_STD in r]
      if with_std:
        s = [r["step"] for r in with_std]
        m = [float(r[REWARD_MEAN]) for r in with_std]
        d = [float(r[REWARD_STD]) for r in with_std]
        ax.fill_between(s, [a - b for a, b in zip(m, d)], [a + b for a, b in zip(m, d)],
                        color="tab:blue", alpha=0.2, label="± std")
      ax.set_ylabel("reward")
      ax.set_title("Training reward")
    else:
      steps, accuracy = _series(records, EVAL_ACCURACY)
      ax.plot(steps, accuracy, marker="o", color="tab:green", label="held-out accuracy")
      ax.set_ylabel("accuracy")
      ax.set_title("Held-out accuracy")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
  fig.suptitle(str(workdir.name))
  fig.tight_layout()
  output = pathlib.Path(output) if output is not None else workdir / "curves.png"
  # A temporary file, then a rename: a failed write (full disk) leaves no partial PNG.
  temporary = output.with_name(f".{output.name}{workdir_lib.TEMPORARY_MARKER}-{os.getpid()}.png")
  try:
    with cli.file_operation("write the plot", output):
      output.parent.mkdir(parents=True, exist_ok=True)
      fig.savefig(temporary, dpi=100)
      os.replace(temporary, output)
  finally:
    plt.close(fig)
    if temporary.exists():
      temporary.unlink()
  return output


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "run folder with metrics.jsonl", flag_values=FLAGS)
flags.DEFINE_string("output", None, "PNG path (default: WORKDIR/curves.png)", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir"], flag_values=FLAGS)


def _run() -> int:
  with cli.user_input(f"--workdir={FLAGS.workdir}", FileNotFoundError, NotADirectoryError,
                      ValueError):
    path = plot_curves(pathlib.Path(FLAGS.workdir), FLAGS.output and pathlib.Path(FLAGS.output))
  print(path)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
