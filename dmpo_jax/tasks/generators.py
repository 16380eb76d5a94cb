"""Offline generators for Countdown (3 numbers) and 4x4 Sudoku (`docs/tasks.md` §4.6, §5.5).

* Countdown: numbers and targets in the value ranges of d1's ``countdown_cd3_test.jsonl`` (numbers
  1-100, targets 1-100); only solvable instances are kept (every expression over the three numbers
  with ``+ - * /``, each number once, all bracketings, exact ``Fraction`` arithmetic); de-duplicated
  by (sorted numbers, target); split train/test by instance with a fixed seed.
* Sudoku: all 288 valid 4x4 grids are enumerated; puzzles are made by removing cells and kept only
  when the solution is unique; the split is by **solution grid** (200 train grids / 88 test grids
  by default, as SPG does), so no test solution appears in training.
"""

from __future__ import annotations

import functools
import itertools
import random
from fractions import Fraction
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

Example = Dict[str, object]

COUNTDOWN_NUMBER_RANGE = (1, 100)
COUNTDOWN_TARGET_RANGE = (1, 100)


def _combine(a: Fraction, b: Fraction) -> Set[Fraction]:
  values = {a + b, a - b, b - a, a * b}
  if b != 0:
    values.add(a / b)
  if a != 0:
    values.add(b / a)
  return values


def reachable_values(numbers: Sequence[int]) -> FrozenSet[Fraction]:
  """Every value of an expression using each number exactly once with ``+ - * /`` and any
  bracketing (exact rationals; division by zero excluded)."""
  return _reachable(tuple(sorted(Fraction(n) for n in numbers)))


@functools.lru_cache(maxsize=None)
def _reachable(numbers: Tuple[Fraction, ...]) -> FrozenSet[Fraction]:
  if len(numbers) == 1:
    return frozenset(numbers)
  values: Set[Fraction] = set()
  indices = range(len(numbers))
  # Split into two non-empty groups (each unordered pair of groups once is enough since _combine
  # is symmetric up to the order of operands).
  for size in range(1, len(numbers) // 2 + 1):
    for left in itertools.combinations(indices, size):
      right = tuple(i for i in indices if i not in left)
      for a in _reachable(tuple(numbers[i] for i in left)):
        for b in _reachable(tuple(numbers[i] for i in right)):
          values |= _combine(a, b)
  return frozenset(values)


def is_solvable(numbers: Sequence[int], target: int) -> bool:
  return Fraction(target) in reachable_values(numbers)


def generate_countdown(count: int, seed: int = 0,
                       number_range: Tuple[int, int] = COUNTDOWN_NUMBER_RANGE,
                       target_range: Tuple[int, int] = COUNTDOWN_TARGET_RANGE) -> List[Example]:
  """``count`` distinct solvable instances ``{"numbers": [a, b, c], "target": t}``."""
  rng = random.Random(seed)
  seen: Set[Tuple[Tuple[int, ...], int]] = set()
  out: List[Example] = []
  attempts = 0
  while len(out) < count:
    attempts += 1
    if attempts > 200 * count + 1000:
      raise RuntimeError(f"could not draw {count} distinct solvable countdown instances")
    numbers = [rng.randint(*number_range) for _ in range(3)]
    reachable = sorted(v for v in reachable_values(numbers)
                       if v.denominator == 1 and target_range[0] <= v <= target_range[1])
    if not reachable:
      continue
    target = int(rng.choice(reachable))
    key = (tuple(sorted(numbers)), target)
    if key in seen:
      continue
    seen.add(key)
    out.append({"numbers": numbers, "target": target})
  return out


def countdown_split(num_train: int = 20000, num_test: int = 500, seed: int = 0
                    ) -> Tuple[List[Example], List[Example]]:
  """Disjoint train/test sets (distinct (sorted numbers, target) keys) with a fixed seed."""
  instances = generate_countdown(num_train + num_test, seed=seed)
  return instances[:num_train], instances[num_train:]


def all_sudoku_grids() -> List[str]:
  """The 288 valid 4x4 grids as 16-character row-major strings."""
  grids = []
  rows = list(itertools.permutations("1234"))
  for r0, r1, r2, r3 in itertools.product(rows, repeat=4):
    grid = (r0, r1, r2, r3)
    if any(len({grid[r][c] for r in range(4)}) != 4 for c in range(4)):
      continue
    boxes_ok = all(len({grid[r][c] for r in (br, br + 1) for c in (bc, bc + 1)}) == 4
                   for br in (0, 2) for bc in (0, 2))
    if boxes_ok:
      grids.append("".join("".join(row) for row in grid))
  return grids


_PEERS = [sorted({j for j in range(16) if j != i and (j // 4 == i // 4 or j % 4 == i % 4 or
                  (j // 8 == i // 8 and (j % 4) // 2 == (i % 4) // 2))}) for i in range(16)]


def count_solutions(puzzle: str, limit: int = 2) -> int:
  """Number of completions of ``puzzle`` ('0' = empty), counted up to ``limit`` (backtracking)."""
  cells = list(puzzle)
  for i, c in enumerate(cells):
    if c != "0" and any(cells[j] == c for j in _PEERS[i]):
      return 0

  def search() -> int:
    try:
      empty = cells.index("0")
    except ValueError:
      return 1
    total = 0
    used = {cells[j] for j in _PEERS[empty]}
    for digit in "1234":
      if digit not in used:
        cells[empty] = digit
        total += search()
        cells[empty] = "0"
        if total >= limit:
          break
    return total

  return search()


def make_puzzle(solution: str, num_empty: int, rng: random.Random, max_tries: int = 200
                ) -> Optional[str]:
  """A puzzle with ``num_empty`` blanks whose only solution is ``solution`` (None if not found)."""
  for _ in range(max_tries):
    blanks = set(rng.sample(range(16), num_empty))
    puzzle = "".join("0" if i in blanks else c for i, c in enumerate(solution))
    if count_solutions(puzzle) == 1:
      return puzzle
  return None


def sudoku_split(num_train_grids: int = 200, puzzles_per_train_grid: int = 100,
                 puzzles_per_test_grid: int = 6, empty_range: Tuple[int, int] = (8, 8),
                 seed: int = 0) -> Tuple[List[Example], List[Example]]:
  """Train/test puzzles split by solution grid; distinct puzzles, each with a unique solution.

  The default of 8 blanks matches every puzzle of d1's test file (SPG's has 7-12).
  """
  rng = random.Random(seed)
  grids = all_sudoku_grids()
  rng.shuffle(grids)
  if not 0 < num_train_grids < len(grids):
    raise ValueError(f"num_train_grids must be in 1..{len(grids) - 1}, got {num_train_grids}")

  def puzzles_for(grid_list: Sequence[str], per_grid: int) -> List[Example]:
    out, seen = [], set()
    for grid in grid_list:
      made = 0
      for _ in range(per_grid * 4):
        if made == per_grid:
          break
        puzzle = make_puzzle(grid, rng.randint(*empty_range), rng)
        if puzzle is None or puzzle in seen:
          continue
        seen.add(puzzle)
        out.append({"puzzle": puzzle, "solution": grid})
        made += 1
    rng.shuffle(out)
    return out

  return (puzzles_for(grids[:num_train_grids], puzzles_per_train_grid),
          puzzles_for(grids[num_train_grids:], puzzles_per_test_grid))
