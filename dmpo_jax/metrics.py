"""Metric writers, progress bar, phase timers and throughput (`docs/architecture.md` §8).

`MetricWriter` fans each ``write(step, {name: scalar})`` out to
  (a) ``<workdir>/metrics.jsonl``: always; one JSON object per call, ``{"step": int, name: float}``,
      flushed and fsynced so a crash loses nothing already written;
  (b) TensorBoard event files under ``<workdir>/tensorboard`` (the ``tensorboard`` package's own
      `EventFileWriter` and protos; no TensorFlow needed), when ``tensorboard=True`` and the
      package (the ``tensorboard`` extra) is installed (a warning naming the install otherwise);
  (c) Weights & Biases when ``wandb=True`` and the ``wandb`` package is importable (a warning and
      no W&B otherwise).
Only the process with ``process_index == 0`` writes anything (multi-host runs).

On resume (``resume_step=s``) lines with ``step > s`` are dropped from metrics.jsonl (they belong
to steps that will be recomputed) and a TensorBoard ``SessionLog.START`` at ``s`` tells
TensorBoard to hide the orphaned points after ``s``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import jax
import numpy as np

from dmpo_jax import extras

PathLike = Union[str, os.PathLike]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Scalars and the JSONL file
# ------------------------------------------------------------------------------------------------

def _to_scalar(name: str, value: Any) -> float:
  """Python / numpy / 0-d jax value -> float; anything else is an error naming the metric."""
  if isinstance(value, (bool, np.bool_)):
    return float(value)
  if isinstance(value, numbers.Number):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if np.size(value) != 1:
      raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {np.shape(value)}")
    return float(np.asarray(value).reshape(()))
  raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")


def _parse_jsonl(path: pathlib.Path) -> tuple[list[dict], int]:
  """Parsed lines of a metrics.jsonl and the number of unreadable lines (e.g. a torn last line)."""
  records, bad = [], 0
  with open(path, "r", encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        bad += 1
        continue
      records.append(record)
  return records, bad


def read_metrics(path: PathLike) -> list[dict]:
  """Reads metrics.jsonl (a file or a workdir holding one) -> one dict per step, ascending.

  Several lines for the same step (e.g. train metrics and eval metrics written separately) are
  merged; for a key present twice the later line wins. Unreadable lines are skipped.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"Metrics file {path} not found")
  records, bad = _parse_jsonl(path)
  if bad:
    _log.warning("%s: skipped %d unreadable line(s)", path, bad)
  merged: dict[int, dict] = {}
  for record in records:
    merged.setdefault(record["step"], {"step": record["step"]}).update(record)
  return [merged[step] for step in sorted(merged)]


# ------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------

class _TensorBoardWriter:
  """Scalar/text summaries through `tensorboard.summary.writer.event_file_writer`."""

  def __init__(self, logdir: pathlib.Path, resume_step: Optional[int]):
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._tensor_pb2, self._tensor_shape_pb2 = tensor_pb2, tensor_shape_pb2
    logdir.mkdir(parents=True, exist_ok=True)
    self._writer = EventFileWriter(str(logdir), max_queue_size=100, flush_secs=30)
    if resume_step is not None:
      # TensorBoard drops points written before this START marker whose step is >= the marker's
      # step (event_accumulator._Purge keeps step < marker), i.e. all steps > resume_step.
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(resume_step) + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in values.items()])
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def text(self, step: int, tag: str, text: str) -> None:
    tensor = self._tensor_pb2.TensorProto(
        dtype=7,  # DT_STRING
        string_val=[text.encode("utf-8")],
        tensor_shape=self._tensor_shape_pb2.TensorShapeProto())
    metadata = self._summary_pb2.SummaryMetadata(
        plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)])
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


# ------------------------------------------------------------------------------------------------
# MetricWriter
# ------------------------------------------------------------------------------------------------

class MetricWriter:
  """JSONL (+ TensorBoard, + W&B) metric sink; writes only on ``process_index == 0``.

  Args:
    workdir: run folder (created). metrics.jsonl and tensorboard/ live here.
    process_index: `jax.process_index()` of the caller; non-zero processes write nothing.
    resume_step: when resuming from a checkpoint at this step, drops metrics.jsonl lines with a
      larger step (-1: a fresh start that drops every earlier line). None keeps the file as it
      is (torn lines are still removed) and appends.
    tensorboard: also write TensorBoard event files.
    wandb: also log to Weights & Biases (skipped with a warning when `wandb` is not installed).
    wandb_project, wandb_run_name: W&B project and display name.
    config: run configuration (JSON-able dict): logged as TensorBoard text and W&B config.
  """

  def __init__(self, workdir: PathLike, *, process_index: int = 0, resume_step: Optional[int] = None,
               tensorboard: bool = True, wandb: bool = False, wandb_project: Optional[str] = None,
               wandb_run_name: Optional[str] = None, config: Optional[Mapping[str, Any]] = None):
    self.workdir = pathlib.Path(workdir)
    self.process_index = int(process_index)
    self.is_writer = self.process_index == 0
    self.path = self.workdir / METRICS_FILE
    self._file = None
    self._tensorboard: Optional[_TensorBoardWriter] = None
    self._wandb_run = None
    if not self.is_writer:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._prepare_jsonl(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard and not extras.available("tensorboard"):
      _log.warning("TensorBoard event files are off: the `tensorboard` package is not installed "
                   "(%s); metrics go to %s", extras.install_command("tensorboard"), self.path)
      tensorboard = False
    if tensorboard:
      self._tensorboard = _TensorBoardWriter(self.workdir / TENSORBOARD_DIR, resume_step)
      if config is not None:
        self._tensorboard.text(0 if resume_step is None else max(int(resume_step), 0), "config",
                               "```\n" + json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n```")
    if wandb:
      self._wandb_run = self._init_wandb(wandb_project, wandb_run_name, config)

  def _prepare_jsonl(self, resume_step: Optional[int]) -> None:
    if not self.path.exists():
      return
    records, bad = _parse_jsonl(self.path)
    kept = records if resume_step is None else [r for r in records if r["step"] <= resume_step]
    if bad == 0 and len(kept) == len(records):
      return
    _log.info("%s: keeping %d of %d lines (resume_step=%s, %d unreadable)", self.path, len(kept),
              len(records) + bad, resume_step, bad)
    tmp = self.path.with_name(self.path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def _init_wandb(self, project, run_name, config):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      _log.warning("wandb logging was requested but the `wandb` package is not installed; "
                   "metrics go to metrics.jsonl and TensorBoard only")
      return None
    id_file = self.workdir / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project=project, name=run_name, id=run_id, resume="allow",
                     dir=str(self.workdir), config=dict(config) if config is not None else None)
    if run_id is None and getattr(run, "id", None):
      id_file.write_text(str(run.id))
    return run

  @property
  def wandb_enabled(self) -> bool:
    return self._wandb_run is not None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes scalar metrics for ``step``; values may be Python, numpy or 0-d jax scalars.

    Pass host values (``jax.device_get`` the whole dict once) to avoid one device sync per value.
    """
    if not self.is_writer:
      return
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"step must be an int, got {type(step).__name__}")
    step = int(step)
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step number; rename the metric")
    values = {str(name): _to_scalar(str(name), value) for name, value in metrics.items()}
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._tensorboard is not None:
      self._tensorboard.scalars(step, values)
    if self._wandb_run is not None:
      self._wandb_run.log(values, step=step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Free text (samples, config) to TensorBoard's text tab (and W&B); not to metrics.jsonl."""
    if not self.is_writer:
      return
    if self._tensorboard is not None:
      self._tensorboard.text(int(step), tag, text)
    if self._wandb_run is not None:
      self._wandb_run.log({tag: text}, step=int(step))

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    if self._wandb_run is not None:
      self._wandb_run.finish()
      self._wandb_run = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Progress and timing
# ------------------------------------------------------------------------------------------------

class ProgressBar:
  """Progress over training steps with rate and ETA: a tqdm bar on a terminal, plain log lines
  without one.

  ``disable=None`` (auto): a bar when stderr is a terminal; otherwise (log file, ``nohup``, pod
  job) the bar is off and `update` logs a plain line (logger ``dmpo_jax.progress``, INFO) every
  ``log_every_steps`` steps (``unit``s) or ``log_every_seconds`` seconds, and at the last one::

    bgpo RL step 20/60 (33%) | reward 0.53 | acc 75 | rollout 0.09s (21%) prepare 0.06s
    update 0.28s | 0.43 s/step | ETA 0:00:17

  ``disable=True`` (or a process > 0) shows nothing; ``disable=False`` forces the bar.
  ``initial`` is the resumed step, so rate and ETA count only this run's steps.
  """

  def __init__(self, total: int, *, initial: int = 0, desc: str = "train", disable: Optional[bool] = None,
               process_index: int = 0, postfix_keys: Optional[tuple[str, ...]] = None,
               log_every_steps: int = 10, log_every_seconds: float = 60.0, unit: str = "step",
               clock: Callable[[], float] = time.monotonic):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    self.plain = disable is None and process_index == 0 and not sys.stderr.isatty()
    if disable is None:
      disable = process_index != 0 or not sys.stderr.isatty()
    self.postfix_keys = postfix_keys
    self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                     dynamic_ncols=True)
    self.disabled = bool(disable)
    self.total, self.initial, self.desc, self.unit = total, initial, desc, unit
    self.log_every_steps, self.log_every_seconds = max(1, int(log_every_steps)), log_every_seconds
    self._clock = clock
    self._start = clock()
    self._last_line_time, self._last_line_step = self._start, initial
    self._step = initial

  def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None,
             phases: Optional[Mapping[str, float]] = None) -> None:
    """Moves to ``step`` (absolute) and shows ``metrics`` (restricted to postfix_keys); plain
    lines also show ``phases`` (seconds of this step per phase)."""
    self._step = step
    shown = {}
    if metrics:
      keys = self.postfix_keys if self.postfix_keys is not None else tuple(metrics)
      shown = {k: _to_scalar(k, metrics[k]) for k in keys if k in metrics}
    if self.plain:
      now = self._clock()
      if (step - self._last_line_step >= self.log_every_steps or step >= self.total
          or now - self._last_line_time >= self.log_every_seconds):
        logging.getLogger("dmpo_jax.progress").info("%s", self.line(step, shown, phases, now))
        self._last_line_time, self._last_line_step = now, step
    if self.disabled:
      return
    if shown:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
    self._bar.update(step - self._bar.n)

  def line(self, step: int, metrics: Mapping[str, float], phases: Optional[Mapping[str, float]],
           now: float) -> str:
    """The plain progress line (see the class docstring)."""
    parts = [f"{self.desc} {self.unit} {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
    if phases:
      # The rollout's share of the RL step, evaluation excluded (as the `time/rollout_share` metric).
      total = sum(seconds for name, seconds in phases.items() if name != "eval")
      times = []
      for name, seconds in phases.items():
        share = f" ({100 * seconds / total:.0f}%)" if name == "rollout" and total > 0 else ""
        times.append(f"{name} {seconds:.2f}s{share}")
      parts.append(" ".join(times))
    done = step - self.initial
    if done > 0:
      per_step = (now - self._start) / done
      eta = int(round(per_step * max(self.total - step, 0)))
      parts.append(f"{per_step:.3g} s/{self.unit} | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    return " | ".join(parts)

  @property
  def n(self) -> int:
    return int(self._step)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PhaseTimer:
  """Accumulates wall time per named phase (rollout, reward, train, eval, ...).

  JAX dispatch is asynchronous: block on the phase's outputs (``jax.block_until_ready``) inside
  the ``with`` block, or the time lands in whichever later phase first waits on them.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self.totals: dict[str, float] = {}
    self.counts: dict[str, int] = {}

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = self._clock()
    try:
      yield
    finally:
      elapsed = self._clock() - start
      self.totals[name] = self.totals.get(name, 0.0) + elapsed
      self.counts[name] = self.counts.get(name, 0) + 1

  def metrics(self, prefix: str = "time/", reset: bool = True) -> dict[str, float]:
    """{prefix + phase: seconds accumulated since the last reset}; resets by default."""
    out = {f"{prefix}{name}": seconds for name, seconds in self.totals.items()}
    if reset:
      self.reset()
    return out

  def reset(self) -> None:
    self.totals.clear()
    self.counts.clear()


# ------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------

def tokens_per_second(num_tokens: float, seconds: float) -> float:
  """Throughput num_tokens / seconds (``seconds`` must be positive)."""
  if not seconds > 0:
    raise ValueError(f"seconds must be positive to compute a throughput, got {seconds}")
  return float(num_tokens) / float(seconds)
