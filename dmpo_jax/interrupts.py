"""Ctrl-C (SIGINT) and SIGTERM during training: exit cleanly, and save when there is progress.

Python's own SIGINT handling raises `KeyboardInterrupt` in the main thread. When that happens
while JAX compiles (XLA compiles on a thread of its own pool while the main thread waits),
the interpreter unwinds and tears down the XLA client; the compile thread then finishes and
dereferences the freed client: a segmentation fault (exit 139) instead of a clean stop. So
during training no exception is raised for a signal. `InterruptHandler` (a
`checkpointing.PreemptionHandler` for SIGINT and SIGTERM) sets the stop flag that the training
loop polls after each step, and a watcher thread reacts at once, even while the main thread
is inside a compile (the C-level signal handler writes the signal number to a pipe,
`signal.set_wakeup_fd`):

* while the run has no progress that a checkpoint would keep (`unsaved_progress` False: before
  the first RL step of this start, during the warm-up, a compile, or after the last save), it
  prints one line and ends the process with `os._exit` (128 + the signal number; no unwinding,
  so no teardown under a running compile). Everything on disk is consistent: checkpoints and
  the final model are written atomically, and a re-run of the same command starts or resumes;
* otherwise it leaves the flag to the loop, which finishes the step, saves a checkpoint, waits
  for it and stops;
* a second signal ends the process at once (the last complete checkpoint stays the latest).

With several JAX processes the first signal only sets the flag (the loop agrees on it
collectively); a second one ends the process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

from dmpo_jax import checkpointing

_log = logging.getLogger(__name__)


def signal_name(signum: int) -> str:
  return {signal.SIGINT: "Ctrl-C (SIGINT)"}.get(signum, signal.Signals(signum).name)


class InterruptHandler(checkpointing.PreemptionHandler):
  """See the module docstring. ``install()`` from the main thread; ``uninstall()`` restores the
  previous handlers and wake-up file descriptor."""

  def __init__(self, multi_process: bool = False):
    super().__init__(signals=(signal.SIGINT, signal.SIGTERM))
    self.multi_process = multi_process
    # True while a stop should save first (set by the training loop).
    self.unsaved_progress = False
    # What the one line says when the process ends without saving (set by the training loop).
    self.exit_note = "nothing to save yet; re-run the same command to start again"
    self.first_signal: Optional[int] = None
    self._pipe: Optional[tuple[int, int]] = None
    self._previous_wakeup_fd = -1
    self._signals_seen = 0

  def _handle(self, signum, frame) -> None:  # main thread, between two bytecodes
    del frame
    self._received[signum] = self._received.get(signum, 0) + 1
    if self.first_signal is None:
      self.first_signal = signum
    self._stop_requested = True

  def install(self) -> "InterruptHandler":
    if self._installed:
      return self
    super().install()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._pipe = (read_fd, write_fd)
    self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                     name="dmpo_jax-interrupts").start()
    return self

  def uninstall(self) -> None:
    if not self._installed:
      return
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    super().uninstall()
    if self._pipe is not None:
      os.close(self._pipe[1])  # the watcher reads end-of-file and returns (it closes its end)
      self._pipe = None

  def _watch(self, read_fd: int) -> None:
    try:
      while True:
        data = os.read(read_fd, 64)
        if not data:
          return
        for signum in data:
          if signum in self.signals:
            self._on_signal(signum)
    finally:
      os.close(read_fd)

  def _on_signal(self, signum: int) -> None:
    self._signals_seen += 1
    if self.first_signal is None:
      self.first_signal = signum
    self._stop_requested = True
    if self._signals_seen > 1:
      self._exit_now(signum, f"{signal_name(signum)} again: stopping without saving; "
                     "the last complete checkpoint is kept, re-run the same command to resume")
    elif not self.unsaved_progress and not self.multi_process:
      self._exit_now(signum, f"interrupted by {signal_name(signum)}: {self.exit_note}")
    else:
      _log.warning("%s: finishing this step, saving a checkpoint and stopping (send it again to "
                   "stop at once without saving)", signal_name(signum))

  @staticmethod
  def _exit_now(signum: int, message: str) -> None:
    # os.write, not sys.stderr: the main thread may hold the stream's lock.
    try:
      os.write(2, f"error: {message}\n".encode("utf-8", "replace"))
    finally:
      os._exit(128 + signum)  # pylint: disable=protected-access
