"""math-verify under a hard timeout: a persistent worker process that is killed when a call
runs past its limit (math-verify can run forever, e.g. on ``\\boxed{9^{9^{9}}}``).

math-verify's own timeouts use ``signal.alarm`` (main thread only) and cannot interrupt sympy in
C code, so they are disabled inside the worker and the parent enforces the wall-clock limit
(`timeout_pool.TimeoutPool`): past the limit it kills the worker (SIGKILL), answers False and
starts a fresh one. Requests are JSON lines, answers ``1`` / ``0`` lines; the worker runs
``python -I`` (no project code, no ``PYTHON*`` variables) and imports only math-verify; it is a
plain subprocess, not a ``multiprocessing`` one, because it also runs inside the daemonic reward
workers of `reward_pool`, which may not have ``multiprocessing`` children.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Optional

from dmpo_jax.tasks import timeout_pool

# Wall-clock limit of one verify call (parse of both sides + verify), and of the worker start-up
# (importing math-verify and sympy takes seconds).
CALL_TIMEOUT_S = 2.0
STARTUP_TIMEOUT_S = 120.0

# One parsed answer is compared: math-verify's first candidate (the extracted answer; the others
# are alternative readings of it, e.g. its raw string). A prediction that parses to several
# values (a set) where the gold is one value gets no credit.
_WORKER_CODE = r"""
import json, sys
from math_verify import parse, verify
from sympy import FiniteSet
sys.stdout.write("ready\n"); sys.stdout.flush()
def several(value):
  return isinstance(value, FiniteSet) and len(value) > 1
for line in sys.stdin:
  gold, prediction = json.loads(line)
  try:
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + prediction + "}", parsing_timeout=None)
    ok = (bool(g) and bool(p) and not (several(p[0]) and not several(g[0]))
          and bool(verify(g, p[:1], timeout_seconds=None)))
  except Exception:
    ok = False
  sys.stdout.write("1\n" if ok else "0\n"); sys.stdout.flush()
"""


class MathVerifyWorker:
  """One math-verify worker process in a one-worker `timeout_pool.TimeoutPool` (started at the
  first call, replaced after a timeout); ``equal`` is thread-safe (calls are serialised)."""

  def __init__(self, call_timeout_s: float = CALL_TIMEOUT_S,
               startup_timeout_s: float = STARTUP_TIMEOUT_S):
    self.call_timeout_s, self.startup_timeout_s = call_timeout_s, startup_timeout_s
    self._pool: Optional[timeout_pool.TimeoutPool] = None
    self._lock = threading.Lock()

  @property
  def timeouts(self) -> int:
    """Calls killed at ``call_timeout_s``."""
    return self._pool.timeouts if self._pool else 0

  @staticmethod
  def _start(slot: int) -> timeout_pool.CommandWorker:
    del slot
    from dmpo_jax import extras  # pylint: disable=import-outside-toplevel
    extras.require("math_verify", "math-verify equivalence (use_math_verify)")
    return timeout_pool.CommandWorker([sys.executable, "-I", "-c", _WORKER_CODE])

  def equal(self, gold: str, prediction: str) -> bool:
    """math-verify equivalence (gold first); False on a timeout, a crash or no math-verify."""
    with self._lock:
      if self._pool is None:
        self._pool = timeout_pool.TimeoutPool(self._start, 1, start_now=False,
                                              startup_timeout_s=self.startup_timeout_s)
      self._pool.startup_timeout_s = self.startup_timeout_s
      request = (json.dumps([str(gold), str(prediction)]) + "\n").encode()
      try:
        (result,) = self._pool.run([request], self.call_timeout_s)
      except timeout_pool.WorkerStartError:
        return False
      return result == (timeout_pool.OK, b"1\n")

  def close(self) -> None:
    with self._lock:
      if self._pool is not None:
        self._pool.close()


_WORKER: Optional[MathVerifyWorker] = None


def shared_worker() -> MathVerifyWorker:
  """This process's worker (created on first use)."""
  global _WORKER  # pylint: disable=global-statement
  if _WORKER is None:
    _WORKER = MathVerifyWorker()
  return _WORKER
