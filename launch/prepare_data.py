"""Downloads the benchmark files of one or more tasks into the data folder.

  pip install -e ".[data]"
  python launch/prepare_data.py --task=all [--out=~/.cache/dmpo_jax/data]
  python launch/prepare_data.py --task=gsm8k,math --out=/data/dmpo_jax

The files come from the Hugging Face hub (and, for the d1 / SPG test files, GitHub), read with the
`datasets` library; `dmpo_jax/tasks/hub_sources.py` lists each file and its source. They are
written in the layout the task loaders read by default: point ``$DMPO_JAX_DATA_DIR`` (or
``--data_dir`` of `launch/eval.py`) at ``--out``. Every written file is read back through its
task's loader before it replaces an older copy.

Offline: ``--mirror=DIR`` reads a hub dataset ``owner/name`` from the folder ``DIR/owner/name``
(a copy of the hub repository: its README.md, whose YAML header maps configs and splits to files,
and data files such as ``main/train-00000-of-00001.parquet``) and a URL ``https://host/path`` from
the file ``DIR/host/path``.
"""

import csv
import json
import os
import pathlib
import sys
import tempfile
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from dmpo_jax import cli, extras  # noqa: E402
from dmpo_jax.tasks import base, hub_sources  # noqa: E402

FLAGS = flags.FlagValues()
_TASK = flags.DEFINE_list("task", None, "Tasks to prepare (comma-separated), or 'all'; known: "
                          + ", ".join(sorted(hub_sources.DATA_FILES)) + ".", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Data folder to write (default: $DMPO_JAX_DATA_DIR, else "
                           "~/.cache/dmpo_jax/data).", flag_values=FLAGS)
_MIRROR = flags.DEFINE_string("mirror", None, "Local folder holding copies of the hub "
                              "repositories and raw files (offline use; see the module doc).",
                              flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Download files that already exist again.",
                               flag_values=FLAGS)


class PrepareError(cli.UserError):
  """A user-facing problem (unknown task, missing mirror file, bad rows): one line, exit 2."""


def _load_split(datasets_module, spec: hub_sources.DataFile, split: str,
                mirror: Optional[pathlib.Path]):
  """One split of ``spec`` as a `datasets.Dataset`, from the hub / URL or from the mirror."""
  load_dataset = datasets_module.load_dataset
  csv_options: Dict[str, Any] = {}
  if spec.string_columns:
    csv_options["converters"] = {column: str for column in spec.string_columns}
  if spec.is_url:
    builder = "csv" if spec.source.endswith(".csv") else "json"
    location = spec.source
    if mirror is not None:
      local = mirror / spec.source.split("://", 1)[1]
      if not local.is_file():
        raise PrepareError(f"mirror file {local} not found (mirror of {spec.source})")
      location = str(local)
    return load_dataset(builder, data_files=location, split="train", **csv_options)
  if mirror is None:
    return load_dataset(spec.source, spec.config, split=split, **csv_options)
  folder = mirror / spec.source
  if not folder.is_dir():
    raise PrepareError(f"mirror folder {folder} not found (mirror of hub dataset {spec.source})")
  return load_dataset(str(folder), spec.config, split=split, **csv_options)


def fetch_rows(spec: hub_sources.DataFile, mirror: Optional[pathlib.Path] = None
               ) -> List[Dict[str, Any]]:
  """The rows of one data file: its splits concatenated, filtered and sorted as ``spec`` says."""
  extras.require("datasets", "launch/prepare_data.py")
  import datasets  # pylint: disable=import-outside-toplevel
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  rows: List[Dict[str, Any]] = []
  for split in spec.splits:
    try:
      dataset = _load_split(datasets, spec, split, mirror)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
      cause = e.__cause__ or e
      raise PrepareError(f"{spec.source}: cannot load split {split!r} for {spec.path}: "
                         f"{type(cause).__name__}: {cause}") from e
    rows.extend(dict(row) for row in dataset)
  if spec.num_numbers is not None:
    rows = [row for row in rows if len(row["nums"]) == spec.num_numbers]
  if spec.sort_key is not None:
    rows.sort(key=lambda row: row[spec.sort_key])
  if not rows:
    raise PrepareError(f"{spec.source}: no rows for {spec.path}")
  return rows


def write_rows(rows: List[Dict[str, Any]], path: pathlib.Path) -> None:
  """Writes ``rows`` in the format ``path``'s suffix names (.jsonl, .json array, .csv)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    if path.name.endswith(".jsonl"):
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.name.endswith(".json"):
      json.dump(rows, f, ensure_ascii=False)
    elif path.name.endswith(".csv"):
      writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
      writer.writeheader()
      writer.writerows(rows)
    else:
      raise PrepareError(f"{path}: unsupported output format")


def prepare_file(task: str, spec: hub_sources.DataFile, out: pathlib.Path,
                 mirror: Optional[pathlib.Path] = None, overwrite: bool = False) -> Dict[str, Any]:
  """Downloads one file, checks it with the task's loader, and moves it into place."""
  target = out / spec.path
  if target.is_file() and not overwrite:
    return {"task": task, "file": str(target), "status": "exists (use --overwrite to refresh)"}
  rows = fetch_rows(spec, mirror)
  with cli.file_operation("create the data folder", target.parent):
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp_", suffix=target.name)
  os.close(handle)
  try:
    with cli.file_operation("write", target):
      write_rows(rows, pathlib.Path(temporary))
    try:  # The task's loader must read the file back (fields, grids, answers).
      examples = base.get_task(task).load_rows(temporary)
    except (KeyError, ValueError) as e:
      raise PrepareError(f"{spec.source} does not give valid {task} rows: {e}") from e
    with cli.file_operation("write", target):
      os.replace(temporary, target)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return {"task": task, "file": str(target), "rows": len(examples), "source": spec.source}


def prepare(tasks: List[str], out: pathlib.Path, mirror: Optional[pathlib.Path] = None,
            overwrite: bool = False) -> List[Dict[str, Any]]:
  if tasks == ["all"]:
    tasks = sorted(hub_sources.DATA_FILES)
  unknown = [t for t in tasks if t not in hub_sources.DATA_FILES]
  if unknown:
    raise PrepareError(f"unknown task(s) {unknown}; known: {sorted(hub_sources.DATA_FILES)} or 'all'")
  return [prepare_file(task, spec, out, mirror, overwrite)
          for task in tasks for spec in hub_sources.data_files(task)]


def _run() -> int:
  cli.check(bool(_TASK.value), f"--task is required (one or more of "
            f"{sorted(hub_sources.DATA_FILES)}, or all)")
  out = base.data_dir_from_env(_OUT.value)
  cli.check(not out.exists() or out.is_dir(), f"--out {out} is a file, not a folder")
  mirror = pathlib.Path(_MIRROR.value).expanduser() if _MIRROR.value else None
  results = prepare(_TASK.value, out, mirror, _OVERWRITE.value)
  for result in results:
    print(json.dumps(result))
  print(f"data folder: {out}  (set DMPO_JAX_DATA_DIR={out} if it is not the default)",
        file=sys.stderr)
  return 0


def main(argv=None) -> int:
  return cli.run_main(_run, FLAGS, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
