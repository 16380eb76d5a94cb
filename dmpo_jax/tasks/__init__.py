"""Benchmarks: datasets, prompts, rewards, evaluation scorers and the code sandbox (`docs/tasks.md`).

Importing the package registers every task; look one up with :func:`get_task`.
"""

from dmpo_jax.tasks.base import (DEFAULT_REWARD_STYLE, REASONING_PREFILL, REWARD_STYLES, BadRow,
                                 PromptSpec, RowTable, Task, get_task, map_rows, read_records,
                                 read_rows, select_subset, task_names)
from dmpo_jax.tasks import gsm8k, math_task, countdown, sudoku, code_tasks, digit_sort  # noqa: F401  (registration)

__all__ = ["DEFAULT_REWARD_STYLE", "REASONING_PREFILL", "REWARD_STYLES", "BadRow", "PromptSpec",
           "RowTable", "Task", "get_task", "map_rows", "read_records", "read_rows", "select_subset",
           "task_names"]
