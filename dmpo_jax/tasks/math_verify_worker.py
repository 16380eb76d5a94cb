"""math-verify under a hard timeout: a persistent worker process that is killed when a call
runs past its limit (math-verify can run forever, e.g. on ``\\boxed{9^{9^{9}}}``).

math-verify's own timeouts use ``signal.alarm`` (main thread only) and cannot interrupt sympy in
C code, so they are disabled inside the worker and the parent enforces the wall-clock limit: it
waits on the worker's stdout with ``select`` and, past the limit, kills the worker (SIGKILL) and
answers False. The next call starts a fresh worker. Requests and answers are JSON lines; the
worker runs ``python -I`` and imports only math-verify.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Optional

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
  """One math-verify worker process; ``equal`` is thread-safe (calls are serialised)."""

  def __init__(self, call_timeout_s: float = CALL_TIMEOUT_S,
               startup_timeout_s: float = STARTUP_TIMEOUT_S):
    self.call_timeout_s, self.startup_timeout_s = call_timeout_s, startup_timeout_s
    self._process: Optional[subprocess.Popen] = None
    self._lock = threading.Lock()
    self.timeouts = 0

  def _read_line(self, timeout_s: float) -> Optional[bytes]:
    stdout = self._process.stdout
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([stdout], [], [], remaining)[0]:
        return None
      chunk = os.read(stdout.fileno(), 64)
      if not chunk:
        return None
      line += chunk
    return line

  def _start(self) -> bool:
    from dmpo_jax import extras  # pylint: disable=import-outside-toplevel
    extras.require("math_verify", "math-verify equivalence (use_math_verify)")
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-I", "-c", _WORKER_CODE], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if self._read_line(self.startup_timeout_s) != b"ready\n":
      self.close()
      return False
    return True

  def equal(self, gold: str, prediction: str) -> bool:
    """math-verify equivalence (gold first); False on a timeout, a crash or no math-verify."""
    with self._lock:
      if self._process is None or self._process.poll() is not None:
        if not self._start():
          return False
      request = json.dumps([str(gold), str(prediction)]) + "\n"
      try:
        self._process.stdin.write(request.encode())
        self._process.stdin.flush()
      except (BrokenPipeError, OSError):
        self.close()
        return False
      answer = self._read_line(self.call_timeout_s)
      if answer is None:
        self.timeouts += 1
        self.close()
        return False
      return answer == b"1\n"

  def close(self) -> None:
    if self._process is not None:
      if self._process.poll() is None:
        self._process.kill()
      self._process.wait()
      for stream in (self._process.stdin, self._process.stdout):
        try:
          stream.close()
        except OSError:
          pass
      self._process = None


_WORKER: Optional[MathVerifyWorker] = None


def shared_worker() -> MathVerifyWorker:
  """This process's worker (created on first use)."""
  global _WORKER  # pylint: disable=global-statement
  if _WORKER is None:
    _WORKER = MathVerifyWorker()
  return _WORKER
