"""Time and host memory of writing and reading a HF folder (`hf_io.save_pretrained` /
`hf_io.load_pretrained`); prints one JSON object.

  python benchmarks/hf_io_time.py [--preset=llada_1b] [--n_layers=4] [--max_shard_size=500MB] \
      [--workdir=/tmp/dmpo_jax_hf_bench]

A model with the preset's shapes and bf16 weights (random finite values) is written with
`save_pretrained` (``save_s``), then read back in a fresh process with `load_pretrained` onto one
device (``load_s``); ``load_peak_rss_mib`` is that process's peak resident memory and
``model_mib`` the weights' size, so their difference is what loading costs beyond the model.
``save_peak_rss_mib`` is the writing process's peak (model + what the writer holds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dmpo_jax.models.config import get_preset  # noqa: E402
from dmpo_jax.models.hf_io import abstract_model, load_pretrained, save_pretrained  # noqa: E402


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(folder: str) -> dict:
  start = time.perf_counter()
  model, _ = load_pretrained(folder)
  jax.block_until_ready(nnx.state(model))
  return {"load_s": time.perf_counter() - start, "load_peak_rss_mib": _peak_rss_mib()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--preset", default="llada_1b")
  parser.add_argument("--n_layers", type=int, default=4)
  parser.add_argument("--max_shard_size", default="500MB")
  parser.add_argument("--workdir", default="/tmp/dmpo_jax_hf_bench")
  parser.add_argument("--load_only", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.load_only:
    return _load(args.load_only)

  config = get_preset(args.preset, n_layers=args.n_layers, param_dtype="bfloat16", dtype="bfloat16")
  graphdef, state = abstract_model(config)
  rng = np.random.default_rng(0)
  state.replace_by_pure_dict(jax.tree.map(
      # Random bits with the top exponent bit cleared: finite values (the loader refuses NaN/Inf).
      lambda x: jax.numpy.asarray((rng.integers(0, 2**16, x.shape, np.uint16) & 0xBFFF)
                                  .view(jax.numpy.bfloat16)),
      state.to_pure_dict()))
  model = nnx.merge(graphdef, state)
  model_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  shutil.rmtree(args.workdir, ignore_errors=True)
  start = time.perf_counter()
  save_pretrained(model, args.workdir, max_shard_size=args.max_shard_size)
  result = {"preset": args.preset, "n_layers": args.n_layers, "max_shard_size": args.max_shard_size,
            "model_mib": round(model_mib, 1), "save_s": time.perf_counter() - start,
            "save_peak_rss_mib": _peak_rss_mib()}
  loaded = subprocess.run([sys.executable, os.path.abspath(__file__), f"--load_only={args.workdir}"],
                          capture_output=True, text=True, check=True)
  result.update(json.loads(loaded.stdout.strip().splitlines()[-1]))
  shutil.rmtree(args.workdir, ignore_errors=True)
  return result


if __name__ == "__main__":
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in main().items()}))
