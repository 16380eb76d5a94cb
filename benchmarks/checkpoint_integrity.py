"""Cost of checkpoint checksums (`dmpo_jax.checkpointing.array_checksums`) against the save and
restore they protect; prints one JSON object.

  python benchmarks/checkpoint_integrity.py [--preset=llada_1b] [--n_layers=2] [--moments] \
      [--repeats=3] [--workdir=/tmp/ckpt_bench]

Builds a train-state-like pytree with the preset's parameter shapes and dtype (random bits;
``--n_layers`` keeps the embedding and head at full size and scales the stack, 16 = all of
llada_1b; ``--moments`` adds Adam's mu and nu of the same shapes), then times, median of
``--repeats``:

* ``checksum_s``: `array_checksums` of the state (what `TrainCheckpointer.save` adds, on the
  calling thread, before the asynchronous write starts);
* ``save_s``: `TrainCheckpointer.save` + `wait_until_finished` (includes the checksum);
* ``restore_s``: `TrainCheckpointer.restore` (includes ``verify_s``, the checksum of the restored
  arrays and the comparison).

``save_overhead`` = checksum_s / (save_s - checksum_s) and ``restore_overhead`` = verify_s /
(restore_s - verify_s): the relative cost over a save / restore without checksums.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--preset", default="llada_1b")
  parser.add_argument("--n_layers", type=int, default=2)
  parser.add_argument("--moments", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", default="/tmp/dmpo_jax_checkpoint_bench")
  args = parser.parse_args(argv)

  state = random_state(args.preset, args.n_layers, args.moments)
  jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  checkpointing.array_checksums(state)  # compile once
  checksum_s, save_s, restore_s, verify_s = [], [], [], []
  for repeat in range(args.repeats):
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    checkpointing.array_checksums(state)
    checksum_s.append(time.perf_counter() - start)
    with checkpointing.TrainCheckpointer(args.workdir, max_to_keep=1) as checkpointer:
      start = time.perf_counter()
      checkpointer.save(repeat + 1, state, force=True)
      checkpointer.wait_until_finished()
      save_s.append(time.perf_counter() - start)
      start = time.perf_counter()
      restored = checkpointer.restore(abstract_state=state).state
      jax.block_until_ready(restored)
      restore_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    checkpointing.array_checksums(restored)
    verify_s.append(time.perf_counter() - start)
    del restored
  shutil.rmtree(args.workdir, ignore_errors=True)
  med = {name: statistics.median(values) for name, values in
         (("checksum_s", checksum_s), ("save_s", save_s), ("restore_s", restore_s),
          ("verify_s", verify_s))}
  result = {
      "preset": args.preset, "n_layers": args.n_layers, "moments": args.moments,
      "arrays": len(jax.tree.leaves(state)), "gigabytes": nbytes / 1e9,
      "backend": jax.default_backend(), "devices": jax.device_count(), "repeats": args.repeats,
      **med,
      "checksum_gb_per_s": nbytes / 1e9 / med["checksum_s"],
      "save_overhead": med["checksum_s"] / (med["save_s"] - med["checksum_s"]),
      "restore_overhead": med["verify_s"] / (med["restore_s"] - med["verify_s"]),
  }
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
