"""The timeout worker pool: worker processes that answer one request at a time, each request
under a wall-clock limit (`docs/sandbox.md` §5).

A request past its limit is answered `TIMEOUT`, and its worker is killed (with its process group)
and replaced; a worker that dies mid-request is answered `DIED` and replaced. Nothing the worker
does can stretch the limit: the parent waits on the workers' pipes with a deadline and never
reads more than what is there. Used by `reward_pool.RewardPool` (task rewards in spawned
workers) and `math_verify_worker.MathVerifyWorker` (math-verify in an isolated interpreter).
Hand-written because `concurrent.futures.ProcessPoolExecutor` and `multiprocessing.Pool` cannot
kill one stuck call's process and keep the others (the first breaks, the second terminates all).

Standard library only: reward workers import this module.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from multiprocessing import connection as mp_connection
from typing import Any, Callable, List, Optional, Sequence, Tuple

OK, TIMEOUT, DIED = "ok", "timeout", "died"
PARTIAL = object()  # `Worker.receive`: only part of a message has arrived


class WorkerStartError(RuntimeError):
  """A worker exited, or did not say it was ready in time, before its first request."""

  def __init__(self, why: str, exit_code: Optional[int]):
    super().__init__(f"{why} (exit code {exit_code})")
    self.exit_code = exit_code


class Worker:
  """One worker process behind a pipe. Its first message says it is ready; after that it
  answers each request with one message."""

  def waitable(self) -> Any:
    """What `multiprocessing.connection.wait` watches for a message (has ``fileno()``)."""
    raise NotImplementedError

  def send(self, request: Any) -> None:
    raise NotImplementedError

  def receive(self) -> Any:
    """The next message, `PARTIAL` when it is not complete yet; EOFError/OSError when the worker
    is gone. Called only when `waitable` is readable, so it never blocks on a silent worker."""
    raise NotImplementedError

  def is_ready(self, message: Any) -> bool:
    """Whether the first message is the ready signal (otherwise the start failed)."""
    return True

  def exitcode(self) -> Optional[int]:
    raise NotImplementedError

  def kill(self) -> None:
    """SIGKILL to the worker's process group (the worker itself when it has none), then reap."""
    raise NotImplementedError

  def stop(self) -> None:
    """Ends the worker when the pool closes (politely where the protocol allows)."""
    self.kill()


class SpawnedWorker(Worker):
  """A `multiprocessing` ``spawn`` process (safe next to JAX's threads) running
  ``target(connection, *args)``; messages are pickled Python objects; ``None`` asks it to exit."""

  def __init__(self, target: Callable[..., None], args: Tuple[Any, ...]):
    context = multiprocessing.get_context("spawn")
    self.connection, child = context.Pipe()
    self.process = context.Process(target=target, args=(child,) + tuple(args), daemon=True)
    self.process.start()
    child.close()

  def waitable(self) -> Any:
    return self.connection

  def send(self, request: Any) -> None:
    self.connection.send(request)

  def receive(self) -> Any:
    return self.connection.recv()

  def exitcode(self) -> Optional[int]:
    return self.process.exitcode

  def kill(self) -> None:
    try:
      os.killpg(self.process.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
      self.process.kill()
    self.process.join(5)
    self.connection.close()

  def stop(self) -> None:
    if self.process.is_alive():
      try:
        self.connection.send(None)
      except OSError:
        pass
      self.process.join(2)
    if self.process.is_alive():
      self.kill()
    else:
      self.connection.close()


class CommandWorker(Worker):
  """A subprocess (``argv``) speaking newline-terminated byte lines on stdin / stdout; its first
  line must be ``ready_line``. A message is all the bytes sent until one ends with a newline, so
  nothing left over can be read as the answer to a later request. Closing its stdin ends it."""

  def __init__(self, argv: Sequence[str], ready_line: bytes = b"ready\n"):
    self.ready_line = ready_line
    self.process = subprocess.Popen(  # pylint: disable=consider-using-with
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    self._buffer = b""

  def waitable(self) -> Any:
    return self.process.stdout

  def send(self, request: bytes) -> None:
    self.process.stdin.write(request)
    self.process.stdin.flush()

  def receive(self) -> Any:
    chunk = os.read(self.process.stdout.fileno(), 64)
    if not chunk:
      raise EOFError("the worker closed its output")
    self._buffer += chunk
    if not self._buffer.endswith(b"\n"):
      return PARTIAL
    message, self._buffer = self._buffer, b""  # everything sent so far: no answer carries over
    return message

  def is_ready(self, message: Any) -> bool:
    return message == self.ready_line

  def exitcode(self) -> Optional[int]:
    return self.process.poll()

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
    self.process.wait()
    for stream in (self.process.stdin, self.process.stdout):
      try:
        stream.close()
      except OSError:
        pass


class _Slot:
  """A worker, whether it said it is ready, when it started, and its request (index, deadline)."""

  def __init__(self, worker: Worker):
    self.worker, self.ready, self.started = worker, False, time.monotonic()
    self.job: Optional[Tuple[int, float]] = None


class TimeoutPool:
  """``num_workers`` workers from ``start_worker(slot)``; `run` answers requests in parallel,
  each under ``timeout_s``.

  ``start_now``: start the workers here (else at the first `run`, and again after `close`).
  ``startup_timeout_s``: how long a worker may take to say it is ready (None: no limit).
  Counters: ``timeouts`` (requests past their limit), ``replaced_workers``; ``last_failures``:
  (index, `TIMEOUT` / `DIED`, exit code) of the last `run`, in the order they happened.
  """

  def __init__(self, start_worker: Callable[[int], Worker], num_workers: int, *,
               start_now: bool = True, startup_timeout_s: Optional[float] = None):
    if num_workers < 1:
      raise ValueError(f"a timeout pool needs at least one worker, got {num_workers}")
    self._start_worker, self.startup_timeout_s = start_worker, startup_timeout_s
    self._slots: List[Optional[_Slot]] = [None] * num_workers
    self.timeouts = self.replaced_workers = 0
    self.last_failures: List[Tuple[int, str, Optional[int]]] = []
    if start_now:
      self._start_missing()

  def _start_missing(self) -> None:
    for index, slot in enumerate(self._slots):
      if slot is None:
        self._slots[index] = _Slot(self._start_worker(index))

  def _replace(self, index: int) -> Optional[int]:
    """Kills the slot's worker and starts another; the killed worker's exit code."""
    worker = self._slots[index].worker
    worker.kill()
    self._slots[index] = None
    self._slots[index] = _Slot(self._start_worker(index))
    self.replaced_workers += 1
    return worker.exitcode()

  def _start_failed(self, index: int, why: str) -> None:
    worker = self._slots[index].worker
    worker.kill()
    self._slots[index] = None
    raise WorkerStartError(why, worker.exitcode())

  def run(self, requests: Sequence[Any], timeout_s: float,
          stop_on: Callable[[Any], bool] = lambda answer: False) -> List[Optional[Tuple[str, Any]]]:
    """[(OK, answer) | (TIMEOUT, None) | (DIED, exit code) | None] per request, in order.

    An answer for which ``stop_on`` is true stops new requests from starting; the ones in flight
    finish (their workers are not cut off) and the rest stay None.
    """
    self._start_missing()
    results: List[Optional[Tuple[str, Any]]] = [None] * len(requests)
    queue = list(range(len(requests)))[::-1]
    stopped = False
    self.last_failures = []

    def fail(index: int, status: str) -> None:
      job = self._slots[index].job
      exit_code = self._replace(index)
      if job is not None:
        detail = exit_code if status == DIED else None
        results[job[0]] = (status, detail)
        self.last_failures.append((job[0], status, detail))
        self.timeouts += status == TIMEOUT

    for index, slot in enumerate(self._slots):
      if slot.job is not None:  # left by an interrupted run: its answer must not be read as ours
        self._replace(index)
    while True:
      for index, slot in enumerate(list(self._slots)):
        if slot.ready and slot.job is None and queue and not stopped:
          request_index = queue.pop()
          slot.job = (request_index, time.monotonic() + timeout_s)
          try:
            slot.worker.send(requests[request_index])
          except OSError:  # the worker is gone
            fail(index, DIED)
      busy = [slot for slot in self._slots if slot.job is not None]
      if not busy and (stopped or not queue):
        return results
      deadlines = [slot.job[1] for slot in busy]
      if self.startup_timeout_s is not None:
        deadlines += [s.started + self.startup_timeout_s for s in self._slots if not s.ready]
      wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
      readable = mp_connection.wait([slot.worker.waitable() for slot in self._slots], wait_s)
      for index, slot in enumerate(list(self._slots)):
        if slot.worker.waitable() not in readable:
          continue
        try:
          message = slot.worker.receive()
        except (EOFError, OSError):
          if not slot.ready:
            self._start_failed(index, "the worker exited before it was ready")
          fail(index, DIED)
          continue
        if message is PARTIAL:
          continue
        if not slot.ready:
          if not slot.worker.is_ready(message):
            self._start_failed(index, f"the worker's first message was {message!r:.80}")
          slot.ready = True
          continue
        results[slot.job[0]] = (OK, message)
        slot.job = None
        stopped = stopped or bool(stop_on(message))
      now = time.monotonic()
      for index, slot in enumerate(list(self._slots)):
        if slot.job is not None and slot.job[1] <= now:
          fail(index, TIMEOUT)
        elif (not slot.ready and self.startup_timeout_s is not None
              and now - slot.started >= self.startup_timeout_s):
          self._start_failed(index, f"the worker was not ready within {self.startup_timeout_s:g} s")

  def close(self) -> None:
    """Ends every worker; a later `run` starts new ones."""
    for index, slot in enumerate(self._slots):
      if slot is not None:
        slot.worker.stop()
        self._slots[index] = None
