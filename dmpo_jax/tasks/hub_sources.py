"""Where each benchmark file of the data folder comes from (docs/tasks.md §0).

``launch/prepare_data.py --task=T`` reads every :class:`DataFile` of task T with the Hugging Face
``datasets`` library and writes it under the data folder, in the layout the task loaders read by
default (``base.default_data_file``):

=============================  ===========================================================  =====
file in the data folder        source (hub dataset, config, split; or a raw file URL)       rows
=============================  ===========================================================  =====
gsm8k/train.jsonl              ``openai/gsm8k`` ``main`` train                               7,473
gsm8k/test.jsonl               ``openai/gsm8k`` ``main`` test                                1,319
math/train.jsonl               ``ankner/math-500`` train (d1 / DMPO's MATH training split)
math500/test.jsonl             ``HuggingFaceH4/MATH-500`` test                               500
countdown/train.jsonl          ``Jiayi-Pan/Countdown-Tasks-3to4`` train, 3-number rows only
countdown/cd3_test.jsonl       d1's ``dataset/countdown_cd3_test.jsonl`` (GitHub)            256
sudoku/d1_4x4_test.csv         d1's ``dataset/4x4_test_sudoku.csv`` (GitHub)                 500
sudoku/spg_4x4_test.csv        SPG's ``dataset/test_sudoku_split_new.csv`` (GitHub)          256
mbpp/sanitized-mbpp.json       ``google-research-datasets/mbpp`` ``sanitized``, all splits   427
humaneval/test.jsonl           ``openai/openai_humaneval`` test                              164
=============================  ===========================================================  =====

Each file keeps its source's columns; the task's ``normalize`` maps them (docs/tasks.md §2-§6).
The 4x4 Sudoku and Countdown *training* sets default to the offline generators
(``generators.sudoku_split`` / ``countdown_split``); ``countdown/train.jsonl`` is the hub set for
``--config.task.train_source``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

_D1_RAW = "https://raw.githubusercontent.com/dllm-reasoning/d1/main/dataset/"
_SPG_RAW = "https://raw.githubusercontent.com/facebookresearch/SPG/main/dataset/"


@dataclasses.dataclass(frozen=True)
class DataFile:
  """One file of the data folder and its source.

  Attributes:
    path: the file, relative to the data folder; its suffix (.jsonl, .json, .csv) sets the format.
    source: a hub dataset id (``owner/name``) or an ``https://`` URL of a raw file.
    config: the hub config (a sub-folder of the hub repository), or None.
    splits: hub splits concatenated in this order (a URL file is one split).
    num_numbers: keep only rows whose ``nums`` list has this many entries (Countdown).
    sort_key: sort the rows by this column (MBPP: ``task_id``).
    string_columns: CSV columns read as text (Sudoku grids start with ``0``).
  """
  path: str
  source: str
  config: Optional[str] = None
  splits: Tuple[str, ...] = ("train",)
  num_numbers: Optional[int] = None
  sort_key: Optional[str] = None
  string_columns: Tuple[str, ...] = ()

  @property
  def is_url(self) -> bool:
    return self.source.startswith(("https://", "http://"))


DATA_FILES: Dict[str, Tuple[DataFile, ...]] = {
    "gsm8k": (
        DataFile("gsm8k/train.jsonl", "openai/gsm8k", "main", ("train",)),
        DataFile("gsm8k/test.jsonl", "openai/gsm8k", "main", ("test",)),
    ),
    "math": (
        DataFile("math/train.jsonl", "ankner/math-500", None, ("train",)),
        DataFile("math500/test.jsonl", "HuggingFaceH4/MATH-500", None, ("test",)),
    ),
    "countdown": (
        DataFile("countdown/train.jsonl", "Jiayi-Pan/Countdown-Tasks-3to4", None, ("train",),
                 num_numbers=3),
        DataFile("countdown/cd3_test.jsonl", _D1_RAW + "countdown_cd3_test.jsonl"),
    ),
    "sudoku": (
        DataFile("sudoku/d1_4x4_test.csv", _D1_RAW + "4x4_test_sudoku.csv",
                 string_columns=("Puzzle", "Solution")),
        DataFile("sudoku/spg_4x4_test.csv", _SPG_RAW + "test_sudoku_split_new.csv",
                 string_columns=("Puzzle", "Solution")),
    ),
    "mbpp": (
        DataFile("mbpp/sanitized-mbpp.json", "google-research-datasets/mbpp", "sanitized",
                 ("prompt", "train", "validation", "test"), sort_key="task_id"),
    ),
    "humaneval": (
        DataFile("humaneval/test.jsonl", "openai/openai_humaneval", None, ("test",)),
    ),
}


def data_files(task: str) -> Tuple[DataFile, ...]:
  if task not in DATA_FILES:
    raise KeyError(f"prepare_data knows no task {task!r}; known: {sorted(DATA_FILES)}")
  return DATA_FILES[task]
