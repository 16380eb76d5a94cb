"""`timeout_pool.TimeoutPool`, the one pool behind `RewardPool` and `MathVerifyWorker`: a request
past its limit is answered TIMEOUT and its worker killed and replaced, a dying worker is answered
DIED, a stop answer lets the calls in flight finish, a worker that does not start is an error,
and no answer carries over to a later request. The limit is a wall-clock limit by design: the
tests check that it fired (counters, killed processes), with wall-clock backstops far above it."""

import os
import sys
import time

import pytest

from dmpo_jax.tasks import timeout_pool

# Echoes each request line; "sleep S" sleeps first, "exit" dies with code 3, "twice" answers two
# lines, "pid" answers its process id.
ECHO = r"""
import os, sys, time
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
  request = line.strip()
  if request.startswith("sleep"):
    time.sleep(float(request.split()[1]))
  if request == "exit":
    os._exit(3)
  answer = str(os.getpid()) if request == "pid" else request
  sys.stdout.write(("extra\n" if request == "twice" else "") + answer + "\n"); sys.stdout.flush()
"""


def echo_worker(slot, code=ECHO):
  del slot
  return timeout_pool.CommandWorker([sys.executable, "-I", "-c", code])


def lines(*requests):
  return [(r + "\n").encode() for r in requests]


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
    return f.read().split(")")[-1].split()[0] != "Z"


def test_a_stuck_request_times_out_and_its_worker_is_replaced():
  pool = timeout_pool.TimeoutPool(echo_worker, 1)
  try:
    ((_, pid),) = pool.run(lines("pid"), timeout_s=60.0)
    start = time.monotonic()
    results = pool.run(lines("a", "sleep 60", "b"), timeout_s=1.0)
    assert time.monotonic() - start < 30.0  # backstop only: the counters show the limit fired
    assert results == [("ok", b"a\n"), ("timeout", None), ("ok", b"b\n")]
    assert pool.timeouts == 1 and pool.replaced_workers == 1
    assert pool.last_failures == [(1, "timeout", None)]
    assert not alive(int(pid))  # killed, not left sleeping
    ((_, new_pid),) = pool.run(lines("pid"), timeout_s=60.0)
    assert new_pid != pid and pool.last_failures == []
  finally:
    pool.close()


def test_requests_spread_over_workers_keep_their_order():
  pool = timeout_pool.TimeoutPool(echo_worker, 3)
  try:
    requests = [f"sleep 0.{i % 3}" if i % 2 else str(i) for i in range(12)]
    assert pool.run(lines(*requests), timeout_s=60.0) == [("ok", (r + "\n").encode())
                                                         for r in requests]
  finally:
    pool.close()


def test_a_dying_worker_is_answered_died_and_replaced():
  pool = timeout_pool.TimeoutPool(echo_worker, 1)
  try:
    assert pool.run(lines("a", "exit", "b"), timeout_s=60.0) == [
        ("ok", b"a\n"), ("died", 3), ("ok", b"b\n")]
    assert pool.timeouts == 0 and pool.replaced_workers == 1
    assert pool.last_failures == [(1, "died", 3)]
  finally:
    pool.close()


def test_a_stop_answer_lets_the_calls_in_flight_finish():
  """"stop" stops new requests; the slow call in flight on the other worker still answers (its
  worker is not killed); the requests not started stay None."""
  pool = timeout_pool.TimeoutPool(echo_worker, 2)
  try:
    pool.run(lines("warm", "warm"), timeout_s=60.0)  # both workers ready
    results = pool.run(lines("sleep 1", "stop", "x", "y"), timeout_s=60.0,
                       stop_on=lambda answer: answer == b"stop\n")
    assert results == [("ok", b"sleep 1\n"), ("ok", b"stop\n"), None, None]
    assert pool.replaced_workers == 0
  finally:
    pool.close()


def test_no_answer_carries_over_to_a_later_request():
  pool = timeout_pool.TimeoutPool(echo_worker, 1)
  try:
    assert pool.run(lines("twice"), timeout_s=60.0) == [("ok", b"extra\ntwice\n")]
    assert pool.run(lines("next"), timeout_s=60.0) == [("ok", b"next\n")]
  finally:
    pool.close()


@pytest.mark.parametrize("code, why", [
    ("import sys; sys.exit(5)", "exited before it was ready"),
    ("print('hello')", "first message"),
    ("import time; time.sleep(60)", "not ready within 1 s"),
])
def test_a_worker_that_does_not_start_is_an_error(code, why):
  pool = timeout_pool.TimeoutPool(lambda slot: echo_worker(slot, code), 1, start_now=False,
                                  startup_timeout_s=1.0)
  try:
    start = time.monotonic()
    with pytest.raises(timeout_pool.WorkerStartError, match=why) as error:
      pool.run(lines("a"), timeout_s=60.0)
    assert time.monotonic() - start < 30.0
    if why.startswith("exited"):
      assert error.value.exit_code == 5
  finally:
    pool.close()


def test_close_ends_the_workers_and_a_later_run_starts_new_ones():
  pool = timeout_pool.TimeoutPool(echo_worker, 1)
  ((_, pid),) = pool.run(lines("pid"), timeout_s=60.0)
  pool.close()
  assert not alive(int(pid))
  try:
    ((_, new_pid),) = pool.run(lines("pid"), timeout_s=60.0)
    assert new_pid != pid
  finally:
    pool.close()
