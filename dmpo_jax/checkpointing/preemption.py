"""Preemption: SIGTERM (and optionally other signals) turned into a stop flag the training loop
polls, agreed across JAX processes.

Hand-written because a signal to this process is not seen by orbax's `reached_preemption` (JAX's
preemption sync point exists only with the distributed coordination service, and single-process
runs are killed by the scheduler's SIGTERM); `TrainCheckpointer.reached_preemption` covers that
service's notices.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Iterable

import jax
import numpy as np

_log = logging.getLogger(__name__)


class PreemptionHandler:
  """Turns SIGTERM (and optionally other signals) into a flag the training loop polls.

  The handler only sets a flag; the loop calls `should_stop()` once per step and, when it is
  True, saves a checkpoint (``force=True``), waits for it and exits. A second delivery of the same
  signal hands it to the previous handler (e.g. the default SIGTERM action kills the process), so
  a stuck job can still be killed. With several JAX processes `should_stop()` is a collective
  (any process signalled -> all stop at the same step); call it at the same point on every process.

  Use as a context manager (restores the previous handlers on exit) or `install()`/`uninstall()`.
  Signal handlers can only be installed from the main thread.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self.signals = tuple(signals)
    self._received: dict[int, int] = {}
    self._previous: dict[int, Any] = {}
    self._stop_requested = False
    self._installed = False

  def _handle(self, signum, frame) -> None:
    self._received[signum] = self._received.get(signum, 0) + 1
    if self._stop_requested and self._received[signum] > 1:
      previous = self._previous.get(signum, signal.SIG_DFL)
      _log.warning("Signal %d received again: passing it to the previous handler", signum)
      self.uninstall()
      if callable(previous):
        previous(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    _log.warning("Signal %d received: the training loop will checkpoint and stop", signum)
    self._stop_requested = True

  def install(self) -> "PreemptionHandler":
    if self._installed:
      return self
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler.install() must be called from the main thread "
                         "(Python only delivers signals there)")
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    self._installed = True
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were active before `install()`."""
    if not self._installed:
      return
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
    self._installed = False

  def request_stop(self) -> None:
    """Sets the flag by hand (e.g. a wall-clock budget ran out)."""
    self._stop_requested = True

  @property
  def stop_requested(self) -> bool:
    """This process's flag (no cross-process agreement)."""
    return self._stop_requested

  def should_stop(self) -> bool:
    """Whether the loop should checkpoint and exit now (agreed across JAX processes)."""
    if jax.process_count() == 1:
      return self._stop_requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(self._stop_requested, dtype=np.int32))
    return bool(np.any(flags))

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
