"""CPU time of `dmpo_jax.sandbox.remove_tree` on what a program can leave in its host folder.

Trees: ``flat`` (N empty sub-folders), ``deep`` (a chain of N nested folders, deeper than
PATH_MAX for N >= 2,100), ``files`` (N empty files). CPU seconds of the calling thread
(``time.thread_time``: user + system, not inflated by other jobs). Prints one JSON object.

  python benchmarks/remove_tree.py [--sizes=5000,20000,100000] [--root=/dev/shm]
"""

import argparse
import json
import os
import tempfile
import time

from dmpo_jax import sandbox


def make(root, shape, count):
  path = tempfile.mkdtemp(prefix=f"tree_{shape}_", dir=root)
  fd = os.open(path, os.O_RDONLY)
  for i in range(count):
    if shape == "files":
      os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    elif shape == "flat":
      os.mkdir(f"d{i}", dir_fd=fd)
    else:
      os.mkdir("d", dir_fd=fd)
      child = os.open("d", os.O_RDONLY, dir_fd=fd)
      os.close(fd)
      fd = child
  os.close(fd)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", default="5000,20000,100000")
  parser.add_argument("--root", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
  args = parser.parse_args()
  out = {"root": args.root, "cpu_seconds": {}}
  for shape in ("flat", "deep", "files"):
    for count in (int(s) for s in args.sizes.split(",")):
      path = make(args.root, shape, count)
      start = time.thread_time()
      gone = sandbox.remove_tree(path)
      out["cpu_seconds"][f"{shape}_{count}"] = round(time.thread_time() - start, 3)
      assert gone and not os.path.exists(path), path
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
