"""``--config.profile_steps=a,b``: a `jax.profiler` trace of RL steps a to b (`docs/architecture.md`
§8).

Steps are numbered as the rows of ``metrics.jsonl`` (step 1 is the first RL step). The trace starts
before step a's prompts are encoded and stops at the end of step b, after its metrics are on the
host and its checkpoint (if any) is started, so its device work is inside the trace; each step is
a `jax.profiler.StepTraceAnnotation` named ``rl_step``. It is written under ``<workdir>/profile``
(``profile/process_<i>`` with several processes):

* ``plugins/profile/<run>/<host>.xplane.pb``, which TensorBoard's profile plugin opens
  (``tensorboard --logdir=<workdir>/profile``, ``pip install tensorboard-plugin-profile``);
* ``plugins/profile/<run>/perfetto_trace.json.gz``, which https://ui.perfetto.dev opens.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Optional

import jax

PROFILE_DIR = "profile"
STEP_NAME = "rl_step"


def parse_steps(value: str) -> Optional[tuple[int, int]]:
  """``""`` -> None (off); ``"a,b"`` -> (a, b) with 1 <= a <= b; ``"a"`` -> (a, a). Raises
  ValueError naming the problem."""
  if not isinstance(value, str):
    raise ValueError(f"profile_steps={value!r} must be a string 'a,b' (or '' for no trace)")
  text = value.strip()
  if not text:
    return None
  parts = [p.strip() for p in text.split(",")]
  if len(parts) > 2 or not all(p.isdigit() for p in parts):
    raise ValueError(f"profile_steps={value!r} must be 'a,b': the first and last RL step to trace")
  first, last = int(parts[0]), int(parts[-1])
  if not 1 <= first <= last:
    raise ValueError(f"profile_steps={value!r} needs 1 <= a <= b (steps are numbered from 1)")
  return first, last


def config_errors(value: str, num_steps: int) -> list[str]:
  """The problems of a ``profile_steps`` config value, as `loop.validate_config` lists them."""
  try:
    steps = parse_steps(value)
  except ValueError as e:
    return [str(e)]
  if steps is not None and steps[1] > num_steps:
    return [f"profile_steps={value!r} ends after the last step num_steps={num_steps}"]
  return []


class StepProfiler:
  """Starts the trace at the first profiled step, annotates each step, stops after the last.

  The loop calls ``start_step(n)`` first thing in RL step n and ``end_step(n)`` last (after its
  checkpoint), and `close` when it ends (also inside the profiled range)."""

  def __init__(self, value: str, workdir: pathlib.Path):
    self.steps = parse_steps(value)
    self.logdir = pathlib.Path(workdir) / PROFILE_DIR
    if jax.process_count() > 1:
      self.logdir = self.logdir / f"process_{jax.process_index()}"
    self.active = False
    self._annotation: Optional[contextlib.AbstractContextManager] = None

  def _profiled(self, number: int) -> bool:
    return self.steps is not None and self.steps[0] <= number <= self.steps[1]

  def start_step(self, number: int) -> None:
    """RL step ``number`` (1-based, as in metrics.jsonl) begins."""
    if not self._profiled(number):
      return
    if not self.active:
      self.logdir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
      self.active = True
    self._annotation = jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=number)
    self._annotation.__enter__()

  def end_step(self, number: int) -> None:
    """RL step ``number`` is done (its metrics are on the host)."""
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self.active and number >= self.steps[1]:
      self.close()

  def close(self) -> None:
    """Stops a running trace."""
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
