"""Host <-> device copies per RL step of the trainer; prints one JSON object.

  python benchmarks/host_transfers.py [--steps=4] [--objective=dmpo] [--updates_per_rollout=2] \
      [--minibatches_per_rollout=1]

Runs the demo config at test size (tiny model, 4 prompts x 4 completions, no warm-up, no eval,
no checkpoint before the last step) and counts, for every RL step after the first (the first
compiles), between two consecutive ``metrics.jsonl`` rows:

* ``device_to_host``: values copied from the devices to the host. Every such copy goes through
  ``jax.Array._value`` (``np.asarray``, ``jax.device_get``, ``float``, ``tolist``), which the script
  wraps; on CPU, `jax.transfer_guard` does not see these copies, so this counts them directly;
* ``host_to_device``: transfers reported by ``jax.transfer_guard_host_to_device("log_explicit")``
  (explicit ``device_put`` and implicit ones such as a Python scalar passed to a jitted function),
  read from the log lines on stderr. Some log lines do not name the array
  (``host_to_device_unsized``); ``host_to_device_bytes`` adds up the others;

``device_to_host_bytes`` is the bytes copied. It uses only `loop.train` and `metrics.MetricWriter`, so the same script
measures any revision of the package (run it from that revision's checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import array as array_lib  # noqa: E402

from configs import demo  # noqa: E402
from dmpo_jax import metrics as metrics_lib  # noqa: E402
from dmpo_jax.rl import loop  # noqa: E402

MARK = "HOST_TRANSFERS_STEP_MARK"
_H2D = re.compile(r"host-to-device transfer:(?: aval=ShapedArray\((\w+)\[([\d,]*)\])?")


def _bytes(dtype: str, dims: str) -> int:
  size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
  return size * np.dtype("bool" if dtype == "bool" else jax.numpy.dtype(dtype)).itemsize


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--objective", default="dmpo")
  parser.add_argument("--updates_per_rollout", type=int, default=2)
  parser.add_argument("--minibatches_per_rollout", type=int, default=1)
  args = parser.parse_args(argv)

  config = demo.get_config()
  overrides = {"objective": args.objective, "sft.num_steps": 0, "num_steps": args.steps,
               "prompts_per_step": 4, "group_size": 4, "updates_per_rollout": args.updates_per_rollout,
               "minibatches_per_rollout": args.minibatches_per_rollout, "eval.every_steps": 0,
               "eval.num_examples": 16, "eval.batch_size": 16, "checkpoint.every_steps": 10**6,
               "progress_bar": False}
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value

  d2h = []  # (bytes,) per copy, in order
  value = array_lib.ArrayImpl._value

  def counted(self):
    if self._npy_value is None:
      d2h.append(self.nbytes)
    return value.fget(self)

  marks = {}
  write = metrics_lib.MetricWriter.write

  def marking(self, step, metrics):
    marks[step] = len(d2h)
    os.write(2, f"{MARK} {step}\n".encode())
    return write(self, step, metrics)

  array_lib.ArrayImpl._value = property(counted)
  metrics_lib.MetricWriter.write = marking
  with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryFile("w+b") as log:
    saved_stderr = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
      with jax.transfer_guard_host_to_device("log_explicit"):
        loop.train(config, workdir)
    finally:
      os.dup2(saved_stderr, 2)
      os.close(saved_stderr)
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()

  h2d_by_step, current = {}, None
  for line in lines:
    if line.startswith(MARK):
      current = int(line.split()[1])
      h2d_by_step[current] = []
    elif current is not None and (match := _H2D.search(line)):
      h2d_by_step[current].append(None if match.group(1) is None else _bytes(*match.groups()))
  steps = []
  for step in range(2, args.steps + 1):
    # The copies of step n happen between row n - 1 and row n; the host-to-device log lines of
    # step n follow the mark of row n - 1.
    copies = d2h[marks[step - 1]:marks[step]]
    uploads = h2d_by_step.get(step - 1, [])
    steps.append({"step": step, "device_to_host": len(copies), "device_to_host_bytes": sum(copies),
                  "host_to_device": len(uploads),
                  "host_to_device_bytes": sum(b for b in uploads if b is not None),
                  "host_to_device_unsized": sum(b is None for b in uploads)})
  result = {"objective": args.objective, "updates_per_rollout": args.updates_per_rollout,
            "minibatches_per_rollout": args.minibatches_per_rollout,
            "rows": config.prompts_per_step * config.group_size,
            "tokens_per_row": config.task.prompt_length + config.rollout.gen_length,
            "devices": jax.device_count(), "backend": jax.default_backend(), "per_step": steps}
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
