"""Task interface, registry and dataset-file readers (`docs/tasks.md` §0-§1).

A :class:`Task` bundles, for one benchmark,

* loaders that turn a local file (JSONL, JSONL.gz, JSON, CSV, parquet) or a Hugging Face dataset
  name into a list of *normalised examples* (plain dicts with the task's reference fields),
* the training prompt and the evaluation prompt (chat messages plus an assistant prefill),
* the training reward functions for a ``reward_style`` (weights 1 each, summed),
* the evaluation scorer (one dict per completion with a ``score``) and its summary.

Reward functions are plain module-level functions (or ``functools.partial`` of them) with the
signature ``reward(completion: str, example: dict) -> float`` so they pickle into process pools.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

Example = Dict[str, Any]
RewardFn = Callable[[str, Example], float]
Messages = List[Dict[str, str]]

# `docs/tasks.md` §9: "d1" (original d1 / wd1), "dmpo" (DMPO code), "spg" (SPG's xmlcount tweak),
# "fixed" (default for new runs; quirks removed).
REWARD_STYLES = ("d1", "dmpo", "spg", "fixed")
DEFAULT_REWARD_STYLE = "fixed"

# Evaluation scorers: "fixed" (default; quirks fixed) or "d1" (d1's eval/parse_and_get_acc.py row
# for row, `dmpo_jax.tasks.d1_eval`; gsm8k, math, countdown and sudoku only).
EVAL_STYLES = ("fixed", "d1")
DEFAULT_EVAL_STYLE = "fixed"
D1_EVAL_TASKS = ("gsm8k", "math", "countdown", "sudoku")

# `docs/tasks.md` §1: every d1-lineage evaluation prompt is pre-filled with this string.
REASONING_PREFILL = "<reasoning>"

# `docs/tasks.md` §1: d1's format instruction used by all training prompts except Sudoku.
_log = logging.getLogger(__name__)

SYSTEM_PROMPT = ("\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n"
                 "<answer>\n...\n</answer>\n")


def check_reward_style(style: str) -> str:
  if style not in REWARD_STYLES:
    raise ValueError(f"reward_style must be one of {REWARD_STYLES}, got {style!r}")
  return style


# Environment variable naming the data folder that `launch/prepare_data.py` fills.
DATA_DIR_ENV = "DMPO_JAX_DATA_DIR"
# Default data folder when neither an argument nor the environment variable names one.
DEFAULT_DATA_DIR = pathlib.Path("~/.cache/dmpo_jax/data")


def check_eval_style(style: str, task_name: Optional[str] = None) -> str:
  if style not in EVAL_STYLES:
    raise ValueError(f"eval_style must be one of {EVAL_STYLES}, got {style!r}")
  if style == "d1" and task_name is not None and task_name not in D1_EVAL_TASKS:
    raise ValueError(f"eval_style='d1' exists for {D1_EVAL_TASKS}, not for task {task_name!r}")
  return style


def data_dir_from_env(data_dir: Optional[os.PathLike] = None) -> pathlib.Path:
  """The data folder: the argument, else ``$DMPO_JAX_DATA_DIR``, else ``~/.cache/dmpo_jax/data``."""
  if data_dir is not None and str(data_dir):
    return pathlib.Path(data_dir).expanduser()
  if os.environ.get(DATA_DIR_ENV):
    return pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser()
  return DEFAULT_DATA_DIR.expanduser()


def default_data_file(task: str, relative_path: str, data_dir: Optional[os.PathLike] = None
                      ) -> str:
  """``<data folder>/<relative_path>``; a clear error naming the fix when the file is missing.

  The files are written by ``python launch/prepare_data.py --task=<task>`` (README, "Weights and
  data"; docs/tasks.md §0).
  """
  folder = data_dir_from_env(data_dir)
  path = folder / relative_path
  if not path.is_file():
    raise FileNotFoundError(
        f"{task}: dataset file {path} not found. Run `python launch/prepare_data.py --task={task} "
        f"--out={folder}` to download it, or point ${DATA_DIR_ENV} (or --data_dir) at a folder "
        f"that holds {relative_path}")
  return str(path)


# Rows nested deeper than this are refused (a row is a flat record; deep nesting only serves to
# exhaust the recursion limit of later code).
MAX_ROW_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class BadRow:
  """A row that cannot be used: its 0-based position among the file's rows (blank lines not
  counted), its 1-based line in a JSONL file (None for other formats) and what is wrong."""
  index: int
  line: Optional[int]
  reason: str

  def describe(self) -> str:
    where = f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")
    return f"{where}: {self.reason}"

  def to_json(self) -> Dict[str, Any]:
    return {"index": self.index, **({"line": self.line} if self.line is not None else {}),
            "skipped": self.reason}


@dataclasses.dataclass
class RowTable:
  """What `read_rows` read: ``rows`` as (index, row) pairs of usable rows, ``bad`` the others."""
  source: str
  rows: List[Tuple[int, Example]]
  bad: List[BadRow]

  @property
  def num_rows(self) -> int:
    return len(self.rows) + len(self.bad)


def check_row(row: Any) -> Optional[str]:
  """Why ``row`` is unusable (None when it is fine): it must be a JSON object whose strings are
  valid Unicode (no lone surrogates, e.g. from a ``"\\ud800"`` escape), whose numbers are finite
  (Python's JSON reader accepts ``NaN`` and ``Infinity``) and which is nested at most
  `MAX_ROW_DEPTH` levels. Checked without recursion."""
  if not isinstance(row, dict):
    shown = repr(row)[:40]
    return f"expected a JSON object, got {type(row).__name__} {shown}"
  stack = [((), row, 1)]
  while stack:
    path, value, depth = stack.pop()
    name = ".".join(str(p) for p in path) or "<row>"
    if depth > MAX_ROW_DEPTH:
      return f"nested deeper than {MAX_ROW_DEPTH} levels (at {name!r})"
    if isinstance(value, dict):
      for key, item in value.items():
        if isinstance(key, str) and not _is_valid_unicode(key):
          return f"a field name under {name!r} is not valid Unicode (lone surrogate)"
        stack.append((path + (key,), item, depth + 1))
    elif isinstance(value, (list, tuple)):
      stack.extend((path + (i,), item, depth + 1) for i, item in enumerate(value))
    elif isinstance(value, str) and not _is_valid_unicode(value):
      return f"field {name!r} is not valid Unicode (lone surrogate)"
    elif isinstance(value, float) and not math.isfinite(value):
      return f"field {name!r} is {value} (not a finite number)"
  return None


def _is_valid_unicode(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _parse_jsonl_line(raw: bytes) -> Tuple[Any, Optional[str]]:
  """(value, None) or (None, reason) for one JSONL line."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, f"binary data: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
  try:
    return json.loads(text), None
  except RecursionError:
    return None, f"JSON nested too deeply to parse (more than {MAX_ROW_DEPTH} levels allowed)"
  except ValueError as e:
    return None, f"not valid JSON: {e}"


UTF8_BOM = b"\xef\xbb\xbf"


def _read_file_records(path: pathlib.Path) -> Tuple[List[Tuple[int, Optional[int], Any]], List[BadRow]]:
  """(index, line, value) of every record of a local file, plus the lines that do not parse.
  Text may start with a UTF-8 byte-order mark and use CRLF line ends (files saved on Windows)."""
  name = path.name.lower()
  if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
    opener = gzip.open if name.endswith(".gz") else open
    records, bad = [], []
    with opener(path, "rb") as f:
      for line_number, raw in enumerate(f, 1):
        if line_number == 1 and raw.startswith(UTF8_BOM):
          raw = raw[len(UTF8_BOM):]
        if not raw.strip():
          continue
        index = len(records) + len(bad)
        value, reason = _parse_jsonl_line(raw.strip())
        if reason is None:
          records.append((index, line_number, value))
        else:
          bad.append(BadRow(index, line_number, reason))
    return records, bad
  try:
    if name.endswith(".json"):
      with open(path, encoding="utf-8-sig") as f:
        data = json.load(f)
      if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
      if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    elif name.endswith(".csv"):
      with open(path, newline="", encoding="utf-8-sig") as f:
        data = list(csv.DictReader(f))
    elif name.endswith(".parquet"):
      try:
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
      data = pq.read_table(path).to_pylist()
    else:
      raise ValueError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .csv, "
                       ".parquet)")
  except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
    # One document: a parse failure cannot be narrowed to a row.
    raise ValueError(f"{path}: cannot be parsed: {type(e).__name__}: {str(e)[:200]}") from e
  return [(i, None, row) for i, row in enumerate(data)], []


def read_rows(source: os.PathLike | str, split: Optional[str] = None,
              hf_config: Optional[str] = None) -> RowTable:
  """Reads rows from a local file or, when ``source`` is no existing path, a HF dataset name,
  checking each on its own: unusable rows (binary data, broken JSON, a lone surrogate, a value
  that is no JSON object, deep nesting, a non-finite number; `check_row`) are returned in
  ``bad`` with the reason instead of failing the file. Loaders and launch/score.py use this.

  Local formats by suffix: ``.jsonl`` / ``.jsonl.gz`` (one object a line), ``.json`` (an array of
  objects, or an object ``{"data": [...]}``), ``.csv`` (header row), ``.parquet`` (needs pyarrow).
  A Hugging Face name (e.g. ``openai/gsm8k``) needs the `datasets` package and network access;
  ``split`` and ``hf_config`` are passed to ``datasets.load_dataset``.
  """
  path = pathlib.Path(source)
  if path.is_file():
    records, bad = _read_file_records(path)
  elif path.exists():
    raise ValueError(f"{path} is not a file")
  elif "/" not in str(source) or str(source).startswith((".", "/")):
    raise FileNotFoundError(f"dataset file {source} not found (and it is no Hugging Face name)")
  else:
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"{source!r} is no local file; loading it from the Hugging Face hub needs "
                        "the `datasets` package and network access") from e
    dataset = datasets.load_dataset(str(source), hf_config, split=split or "train")
    records, bad = [(i, None, dict(row)) for i, row in enumerate(dataset)], []
  rows = []
  for index, line, value in records:
    reason = check_row(value)
    if reason is None:
      rows.append((index, value))
    else:
      bad.append(BadRow(index, line, reason))
  bad.sort(key=lambda b: b.index)
  return RowTable(str(source), rows, bad)


def map_rows(rows: Sequence[Tuple[int, Example]], fn: Callable[[int, Example], Any]
             ) -> Tuple[List[Tuple[int, Any]], List[BadRow]]:
  """``fn(index, row)`` for each (index, row) pair, one row at a time: a KeyError, ValueError or
  TypeError skips that row, recorded as a `BadRow` with the reason. Returns ((index, result)
  pairs, bad rows)."""
  done, bad = [], []
  for index, row in rows:
    try:
      done.append((index, fn(index, row)))
    except (KeyError, ValueError, TypeError) as e:
      message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError quotes its text
      bad.append(BadRow(index, None, f"{type(e).__name__}: {message}"))
  return done, bad


def read_records(source: os.PathLike | str, split: Optional[str] = None,
                 hf_config: Optional[str] = None) -> List[Example]:
  """All rows of ``source`` (`read_rows`); the first unusable row is a ValueError naming it."""
  table = read_rows(source, split=split, hf_config=hf_config)
  if table.bad:
    raise ValueError(f"{source}: {table.bad[0].describe()}")
  return [row for _, row in table.rows]


def require_fields(rows: Sequence[Example], fields: Sequence[str], source: Any) -> None:
  """Raises a clear error when a row misses one of ``fields``."""
  if not rows:
    raise ValueError(f"{source}: no rows")
  for index, row in enumerate(rows):
    missing = [f for f in fields if f not in row]
    if missing:
      raise KeyError(f"{source}: row {index} lacks field(s) {missing}; has {sorted(row)}")


def user_message(content: str) -> Messages:
  return [{"role": "user", "content": content}]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """Chat messages and the assistant-turn prefill appended after the generation prompt."""
  messages: Messages
  prefill: str = ""


class RunData(NamedTuple):
  """The examples of one training run: RL prompts, SFT warm-up examples (empty without a
  warm-up) and the held-out evaluation set."""
  train: List[Example]
  warmup: List[Example]
  held_out: List[Example]


class Task:
  """Base class of every benchmark. Subclasses set ``name`` and implement the abstract methods;
  the hooks (`configure`, `run_data`, `demonstration`, `solved_reward`, `use_chat_template`)
  carry what a task changes in a training run."""

  name: str = ""
  # Reference fields a scoring row must hold (launch/score.py).
  reference_fields: Tuple[str, ...] = ()
  # Where the published protocol gets the evaluation set (`docs/tasks.md` §7).
  default_eval_size: Optional[int] = None
  # A reward at or above this counts as a solved prompt (the training metric ``reward/accuracy``).
  solved_reward: float = 1.0
  # Prompts through the tokenizer's chat template (False: user content + prefill as raw text).
  use_chat_template: bool = True

  # ---- a training run (`dmpo_jax.rl.trainer.Trainer`)
  def configure(self, config: Any) -> None:
    """Applies the run config's task-specific settings to this task (default: none)."""

  def run_data(self, config: Any) -> RunData:
    """The examples of a training run with config ``config`` (``task.train_source`` /
    ``task.eval_source``, empty: the task's default files); the warm-up trains on the RL prompts
    when ``sft.num_steps`` is set."""
    train = self.load_train(config.task.train_source or None)
    held_out = self.load_eval(config.task.eval_source or None)
    return RunData(train, train if config.sft.num_steps else [], held_out)

  def demonstration(self, example: Example) -> str:
    """The SFT warm-up target of ``example`` (default: its reference ``answer``)."""
    return example.get("answer", "")

  # ---- data
  def load_train(self, source: Optional[str] = None, data_dir: Optional[os.PathLike] = None
                 ) -> List[Example]:
    raise NotImplementedError

  def load_eval(self, source: Optional[str] = None, data_dir: Optional[os.PathLike] = None
                ) -> List[Example]:
    raise NotImplementedError

  def normalize(self, row: Example) -> Example:
    """Maps a raw row (any supported source format) to the task's normalised example."""
    raise NotImplementedError

  def load_rows(self, source: str, split: Optional[str] = None, hf_config: Optional[str] = None,
                *, strict: bool = False) -> List[Example]:
    """Normalised examples of ``source`` (`read_rows`). A row that cannot be read or normalised
    is skipped with a warning naming it and the reason (``strict``: a ValueError instead); a
    file without a single usable row is an error."""
    table = read_rows(source, split=split, hf_config=hf_config)
    normalized, bad = map_rows(table.rows, lambda _, row: self.normalize(row))
    out = [example for _, example in normalized]
    bad = sorted(table.bad + bad, key=lambda b: b.index)
    if bad and (strict or not out):
      raise ValueError(f"{source}: {len(bad)} of {table.num_rows} row(s) unusable; first: "
                       f"{bad[0].describe()}" if table.num_rows else f"{source}: no rows")
    if not table.num_rows:
      raise ValueError(f"{source}: no rows")
    if bad:
      _log.warning("%s: skipped %d of %d row(s): %s%s", source, len(bad), table.num_rows,
                   "; ".join(b.describe() for b in bad[:5]), " ..." if len(bad) > 5 else "")
    return out

  # ---- prompts
  def train_prompt(self, example: Example) -> PromptSpec:
    raise NotImplementedError

  def eval_prompt(self, example: Example) -> PromptSpec:
    raise NotImplementedError

  # ---- rewards and scoring
  def reward_functions(self, style: str = DEFAULT_REWARD_STYLE, **options: Any
                       ) -> List[Tuple[str, RewardFn]]:
    raise NotImplementedError

  def score(self, completion: str, example: Example, **options: Any) -> Dict[str, Any]:
    """Evaluation scorer: a dict with at least ``score`` (float) and ``correct`` (bool)."""
    raise NotImplementedError

  def score_many(self, completions: Sequence[str], examples: Sequence[Example], **options: Any
                 ) -> List[Dict[str, Any]]:
    return [self.score(c, e, **options) for c, e in zip(completions, examples)]

  def summarize(self, scores: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Accuracy = mean of ``correct`` over all rows (in %), as the papers report it."""
    n = len(scores)
    correct = sum(bool(s["correct"]) for s in scores)
    return {"task": self.name, "num_examples": n, "num_correct": correct,
            "accuracy": 100.0 * correct / n if n else 0.0}

  def total_reward(self, completion: str, example: Example, style: str = DEFAULT_REWARD_STYLE
                   ) -> float:
    return float(sum(fn(completion, example) for _, fn in self.reward_functions(style)))


_REGISTRY: Dict[str, Task] = {}


def register(task: Task) -> Task:
  if not task.name:
    raise ValueError(f"{type(task).__name__} has no name")
  _REGISTRY[task.name] = task
  return task


def get_task(name: str) -> Task:
  # Importing the package registers all tasks.
  import dmpo_jax.tasks  # pylint: disable=import-outside-toplevel,unused-import
  if name not in _REGISTRY:
    raise KeyError(f"unknown task {name!r}; known: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def task_names() -> List[str]:
  import dmpo_jax.tasks  # pylint: disable=import-outside-toplevel,unused-import
  return sorted(_REGISTRY)


def select_subset(rows: Sequence[Example], size: Optional[int], seed: int = 42) -> List[Example]:
  """d1's evaluation subset: ``np.random.seed(seed); np.random.choice(len, size, replace=False)``.

  With ``size`` None or >= len(rows) the rows are returned unchanged (the published protocol
  uses all rows of GSM8K, MATH500 and the 256-row countdown file in file order for accuracy).
  """
  if size is None or size >= len(rows):
    return list(rows)
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(seed)
  indices = rng.choice(len(rows), size, replace=False)
  return [rows[int(i)] for i in indices]
