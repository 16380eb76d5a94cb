"""What checkpoint integrity costs the training loop: save-call latency, background time and
restore time of `TrainCheckpointer`; prints one JSON object.

  python benchmarks/checkpoint_integrity.py [--preset=llada_1b] [--n_layers=2] [--moments] \
      [--repeats=3] [--workdir=/tmp/ckpt_bench]

Builds a train-state-like pytree with the preset's parameter shapes and dtype (random bits;
``--n_layers`` keeps the embedding and head at full size and scales the stack, 16 = all of
llada_1b; ``--moments`` adds Adam's mu and nu of the same shapes), then times, median of
``--repeats``:

* ``save_call_s``: `TrainCheckpointer.save` until it returns: what the training step waits for
  (orbax's device-to-host copy, plus anything the save computes on the calling thread);
* ``save_total_s``: `save` + `wait_until_finished` (the background write and commit);
* ``restore_s``: `TrainCheckpointer.restore` into the state's shardings;
* ``integrity_save_s`` / ``integrity_restore_s``: the time spent inside the integrity functions
  during the save (wherever they run: the calling thread or orbax's commit thread) and the
  restore. The script wraps whichever of `checkpointing.integrity.digest_files` / `verify_files`,
  `file_digests.digest_files` / `verify_files` and `checkpointing.array_checksums` the installed
  package has, so
  the same script measures any revision of the package (``integrity`` names what it found).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dmpo_jax import checkpointing  # noqa: E402
from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.hf_io import abstract_model  # noqa: E402


def random_state(preset: str, n_layers: int, moments: bool, seed: int = 0) -> dict:
  config = get_preset(preset, n_layers=n_layers)
  _, abstract = abstract_model(config)
  rng = np.random.default_rng(seed)

  def fill(x):
    raw = rng.integers(0, 2**16, size=x.shape, dtype=np.uint16)
    return jax.numpy.asarray(raw.view(jax.numpy.bfloat16).astype(x.dtype))

  params = jax.tree.map(fill, abstract.to_pure_dict())
  state = {"params": params, "step": jax.numpy.int32(1)}
  if moments:
    state["mu"] = jax.tree.map(fill, abstract.to_pure_dict())
    state["nu"] = jax.tree.map(fill, abstract.to_pure_dict())
  return state


class IntegrityTimer:
  """Wraps the package's integrity functions (module attributes, so calls from any thread go
  through the wrapper) and adds up the seconds spent in them."""

  CANDIDATES = (("dmpo_jax.checkpointing.integrity", "digest_files"),
                ("dmpo_jax.checkpointing.integrity", "verify_files"),
                ("dmpo_jax.file_digests", "digest_files"), ("dmpo_jax.file_digests", "verify_files"),
                ("dmpo_jax.checkpointing", "array_checksums"))

  def __init__(self):
    self.seconds = 0.0
    self.found = []
    for module_name, name in self.CANDIDATES:
      try:
        module = __import__(module_name, fromlist=[name])
      except ImportError:
        continue
      if hasattr(module, name):
        setattr(module, name, self._timed(getattr(module, name)))
        self.found.append(f"{module_name.split('.')[-1]}.{name}")

  def _timed(self, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.seconds += time.perf_counter() - start
    return timed

  def take(self) -> float:
    seconds, self.seconds = self.seconds, 0.0
    return seconds


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--preset", default="llada_1b")
  parser.add_argument("--n_layers", type=int, default=2)
  parser.add_argument("--moments", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", default="/tmp/dmpo_jax_checkpoint_bench")
  args = parser.parse_args(argv)

  timer = IntegrityTimer()
  state = random_state(args.preset, args.n_layers, args.moments)
  jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  times = {k: [] for k in ("save_call_s", "save_total_s", "restore_s", "integrity_save_s",
                           "integrity_restore_s")}
  for repeat in range(args.repeats):
    shutil.rmtree(args.workdir, ignore_errors=True)
    with checkpointing.TrainCheckpointer(args.workdir, max_to_keep=1) as checkpointer:
      timer.take()
      start = time.perf_counter()
      checkpointer.save(repeat + 1, state, force=True)
      times["save_call_s"].append(time.perf_counter() - start)
      checkpointer.wait_until_finished()
      times["save_total_s"].append(time.perf_counter() - start)
      times["integrity_save_s"].append(timer.take())
      start = time.perf_counter()
      restored = checkpointer.restore(abstract_state=state).state
      jax.block_until_ready(restored)
      times["restore_s"].append(time.perf_counter() - start)
      times["integrity_restore_s"].append(timer.take())
    del restored
  shutil.rmtree(args.workdir, ignore_errors=True)
  med = {name: statistics.median(values) for name, values in times.items()}
  result = {
      "preset": args.preset, "n_layers": args.n_layers, "moments": args.moments,
      "arrays": len(jax.tree.leaves(state)), "gigabytes": nbytes / 1e9,
      "backend": jax.default_backend(), "devices": jax.device_count(), "repeats": args.repeats,
      "integrity": timer.found, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
      **med,
  }
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
