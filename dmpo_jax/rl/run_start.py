"""How a training run starts in its workdir: finished, fresh, resumed, or refused with one line
(and the one-line report of a save that failed).

A run is finished (`finished_step`) when its last checkpoint is at ``num_steps`` and its final
model is complete (`final_model.is_complete`).

A fresh start records its config in ``run_config.json`` (`workdir.write_run_config`); every
checkpoint also holds the config it was saved with (a workdir of an older version has only
that). A later start of the same workdir (`plan`):

* with a checkpoint: resumes, unless the config differs from the recorded one in a *structural*
  key (`STRUCTURAL_KEYS`: what fixes the model, its trainable state, the tokenizer and the batch
  shapes, so a checkpoint of one cannot continue under the other). Then it stops with one line
  listing the differing keys; ``--overwrite`` discards the workdir's run and starts from scratch;
* without a checkpoint but with metric rows (the earlier start stopped before its first
  checkpoint, e.g. interrupted during a compile): starts from scratch, replacing those rows,
  when the config is the recorded one (the same command; logging options aside). Any other
  config is refused (the rows may belong to another run) unless ``--overwrite``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from dmpo_jax import checkpointing, errors, metrics as metrics_lib, workdir as workdir_lib
from dmpo_jax.rl import final_model

_log = logging.getLogger("dmpo_jax.train")

# Keys a resume must keep: the model and its trainable state (objective, weights, LoRA, dtypes
# of the stored state), the tokenizer, and the shapes of a step's batch.
STRUCTURAL_KEYS = (
    "objective", "model.preset", "model.checkpoint", "model.init", "model.param_dtype",
    "model.lora_rank", "model.lora_alpha", "model.lora_targets", "tokenizer",
    "optimizer.state_dtype", "optimizer.master_weights", "task.name", "task.prompt_length",
    "rollout.gen_length", "prompts_per_step", "group_size", "minibatches_per_rollout")
# Keys that only change what is logged: a restart of the same command may differ in them.
LOGGING_KEYS = ("progress_bar", "log_every_steps", "log_every_seconds", "wandb")
# What a run writes into its workdir (removed by `discard`).
RUN_OUTPUTS = ("checkpoints", "reference_model", "final_model", metrics_lib.METRICS_FILE,
               metrics_lib.TENSORBOARD_DIR, metrics_lib.WANDB_RUN_ID_FILE, "curves.png",
               workdir_lib.RUN_CONFIG_FILE)

FRESH, RESUME = "fresh", "resume"


class WorkdirError(errors.UserError, ValueError):
  """The workdir holds a run that this config cannot continue (the message says why and how)."""


def _has_metric_rows(workdir: pathlib.Path) -> bool:
  path = workdir / metrics_lib.METRICS_FILE
  return path.is_file() and bool(path.read_text(errors="replace").strip())


def plan(workdir: pathlib.Path, config_json: Mapping[str, Any], overwrite: bool) -> str:
  """`FRESH` or `RESUME` for ``config_json`` (the config as JSON) in ``workdir``; `discard`s the
  earlier run when ``overwrite`` is needed and given; raises `WorkdirError` otherwise."""
  workdir = pathlib.Path(workdir)
  steps = checkpointing.TrainCheckpointer.steps_in(workdir / "checkpoints")
  has_checkpoint = bool(steps)
  recorded = workdir_lib.read_run_config(workdir)
  if recorded is None and has_checkpoint:
    recorded = checkpoint_config(workdir / "checkpoints", steps[-1])
  fresh_hint = ("use another --workdir, or pass --overwrite to discard this workdir's checkpoints, "
                "metrics and final model and start from scratch")
  if has_checkpoint:
    differences = ([] if recorded is None else
                   workdir_lib.config_differences(recorded, config_json, STRUCTURAL_KEYS))
    if not differences:
      return RESUME
    if overwrite:
      discard(workdir)
      return FRESH
    raise WorkdirError(f"{workdir} holds checkpoints of a run that differs in structural key(s) "
                       f"{'; '.join(differences)}: a resume needs the same values; {fresh_hint}")
  if not _has_metric_rows(workdir):
    return FRESH
  differences = (None if recorded is None else
                 workdir_lib.config_differences(recorded, config_json, ignore=LOGGING_KEYS))
  if differences == []:
    _log.warning("%s: the earlier start of this run stopped before its first checkpoint: starting "
                 "from scratch (its metric rows are replaced)", workdir)
    return FRESH
  if overwrite:
    discard(workdir)
    return FRESH
  metrics_file = workdir / metrics_lib.METRICS_FILE
  what = (f"of a run with another config ({'; '.join(differences[:5])}"
          f"{' ...' if len(differences) > 5 else ''})" if differences else "of an earlier run")
  raise WorkdirError(f"{metrics_file} holds metrics {what} but {workdir / 'checkpoints'} has no "
                     "checkpoint to resume from; pass --overwrite to start from scratch (its rows "
                     "are discarded) or use another --workdir")


def checkpoint_config(directory: pathlib.Path, step: int):
  """The config saved with a checkpoint step (as JSON values), or None when it has none."""
  ckpt = checkpointing.TrainCheckpointer(directory, create=False)
  try:
    saved = ckpt.metadata(step).get("config")
  except checkpointing.CheckpointIntegrityError:
    return None  # a damaged step: the restore reports it (or falls back to an older one)
  finally:
    ckpt.close()
  try:
    return json.loads(saved) if isinstance(saved, str) else None
  except ValueError:
    return None


def discard(workdir: pathlib.Path) -> None:
  """Removes an earlier run's outputs (`RUN_OUTPUTS`) from ``workdir``; other files stay."""
  workdir = pathlib.Path(workdir)
  _log.warning("--overwrite: discarding the earlier run in %s", workdir)
  for name in RUN_OUTPUTS:
    path = workdir / name
    with errors.file_operation("remove the earlier run's", path):
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
    workdir_lib.remove_temporaries(path)


def config_json(config) -> dict:
  """A ConfigDict as plain JSON values (tuples as lists), as `run_config.json` holds it."""
  return json.loads(config.to_json())


def plan_on_every_process(workdir: pathlib.Path, config_json: Mapping[str, Any],
                          overwrite: bool) -> str:
  """`plan` on process 0 (which holds the workdir's lock), followed by every process."""
  start = plan(workdir, config_json, overwrite) if jax.process_index() == 0 else FRESH
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    resume = multihost_utils.broadcast_one_to_all(np.int32(start == RESUME))
    start = RESUME if int(resume) else FRESH
  return start


def finished_step(config, workdir: pathlib.Path) -> Optional[int]:
  """The step of the last checkpoint in ``workdir`` when it is ``config.num_steps`` or later and
  the final model is written and verified (`final_model.is_complete`: the run is finished),
  else None."""
  workdir = pathlib.Path(workdir)
  if (not (workdir / "checkpoints").is_dir()
      or not final_model.is_complete(workdir / final_model.FINAL_MODEL_DIR)):
    return None
  ckpt = checkpointing.TrainCheckpointer(workdir / "checkpoints")
  try:
    step = ckpt.latest_step()
  finally:
    ckpt.close()
  return step if step is not None and step >= config.num_steps else None


def last_checkpoint_note(ckpt: checkpointing.TrainCheckpointer) -> str:
  """What a failed save leaves: the last complete checkpoint (for the one-line error)."""
  latest = ckpt.latest_step()
  return ("no checkpoint was completed" if latest is None else
          f"the last complete checkpoint, step {latest}, is intact")


def is_storage_failure(error: BaseException) -> bool:
  """A failed file write: a `errors.Fault`, or an error carrying an operating-system error."""
  return isinstance(error, errors.Fault) or workdir_lib.os_error_of(error) is not None


def close_after_run(ckpt: checkpointing.TrainCheckpointer, closers: Sequence[Callable[[], Any]],
                    failure: Optional[BaseException]) -> None:
  """After the loop: waits for the pending save, closes the checkpointer, then ``closers``;
  raises the first error unless ``failure`` (the loop's exception) is already on its way.

  After a failed file write the checkpointer is left as it is: closing it stops its event loop
  under writes still in flight, whose callbacks then print tracebacks; the process ends right
  after the one-line error instead (an `errors.Fault`, printed by the CLI layer). The failed
  save's partial step is removed.
  """
  error = None
  storage = failure is not None and is_storage_failure(failure)
  if not storage:
    try:
      ckpt.wait_until_finished()
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      error, storage = e, is_storage_failure(e)
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      error = error or e
      _log.debug("while closing after the run: %s", e)
  if storage and jax.process_index() == 0:
    workdir_lib.remove_incomplete_checkpoints(ckpt.directory)
  if error is not None and failure is None:
    raise error
