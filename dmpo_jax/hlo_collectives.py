"""The collectives of a compiled XLA program, read from its optimized HLO text.

`collectives(compiled.as_text())` lists every all-gather / all-reduce / reduce-scatter /
all-to-all / collective-permute (synchronous or ``*-start``) with the array shapes it takes and
gives, the computation it sits in and how many times it runs per program execution: the product
of the trip counts of the while loops around it (XLA's ``known_trip_count``, else read from a loop
condition of the form ``counter < constant``, as JAX's scans and XLA's windowed einsums have; a
loop whose count is not in the program, such as the MC-sample loop whose trip count goes through
an optimization barrier, counts ``unknown_trip_count`` times).

``payload_bytes`` of a collective is the larger of what it takes and what it gives on one device
(an all-gather's gathered output, a reduce-scatter's full input, an all-reduce's buffer): the
bytes it moves up to the ring factor (n − 1) / n. XLA's own cost analysis does not report
collective traffic, hence this reader.

`full_batch_arrays` finds the layout bug batch-split FSDP must not have: a collective over a
floating-point array of rank ≥ 3 whose leading dimension is the global row count (activations of
every row on every device), or the flattened [rows · tokens, ...] form of one. Integer arrays are
token ids, not activations: XLA's embedding-gradient scatter may gather every row's ids (rows ×
tokens int32) to let each device add into its own slice of the table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                  "ragged-all-to-all", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                      r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"constant\((-?\d+)\)")
_COMPARE = re.compile(r"compare\(%([\w.\-]+),\s*%([\w.\-]+)\),\s*direction=(\w+)")

Array = tuple[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the optimized HLO."""
  name: str
  opcode: str                      # e.g. "all-gather" (a "-start" suffix is dropped)
  computation: str
  operands: tuple[Array, ...]      # (dtype, dims) of each input array
  results: tuple[Array, ...]       # (dtype, dims) of each output array
  executions: int                  # times it runs per program execution
  replica_groups: str

  @property
  def payload_bytes(self) -> int:
    """Bytes of the larger side (inputs or outputs) on one device, for one execution."""
    return max(_bytes(self.operands), _bytes(self.results))

  @property
  def total_bytes(self) -> int:
    return self.payload_bytes * self.executions


def _bytes(arrays) -> int:
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in arrays)


def _arrays(shape_text: str) -> tuple[Array, ...]:
  return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
               for dtype, dims in _ARRAY.findall(shape_text))


def _split_shape(rest: str) -> tuple[str, str]:
  """'<shape> opcode(...)...' -> (shape text, text after the shape); tuple shapes nest."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, after = rest.partition(" ")
  return shape, after


def _operand_names(after_opcode: str) -> list[str]:
  """Names inside the opcode's parentheses (up to the matching one)."""
  depth, out = 0, []
  for i, ch in enumerate(after_opcode):
    if ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
      if depth == 0:
        out = re.findall(r"%([\w.\-]+)", after_opcode[:i])
        break
  return out


def collectives(hlo_text: str, unknown_trip_count: int = 1) -> list[Collective]:
  """Every collective of an optimized HLO module (``compiled.as_text()``), with how many times
  it runs (nested while-loop trip counts multiplied; ``unknown_trip_count`` for loops XLA gives
  no count)."""
  shapes: dict[str, str] = {}
  found = []  # (computation, name, opcode, shape text, operand names, attributes)
  calls: dict[str, list[tuple[str, Optional[int], Optional[str]]]] = {}
  constants: dict[str, int] = {}   # scalar integer constants by instruction name
  roots: dict[str, str] = {}       # computation -> its ROOT instruction text
  entry: Optional[str] = None
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      calls.setdefault(current, [])
      if header.group(1):
        entry = current
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name = match.group(1)
    shape, after = _split_shape(line[match.end():])
    shapes[name] = shape
    opcode = after.split("(", 1)[0].strip()
    if line.lstrip().startswith("ROOT"):
      roots[current] = after
    constant = _CONSTANT.match(after)
    if opcode == "constant" and constant and "[]" in shape:
      constants[name] = int(constant.group(1))
    trip, condition = None, None
    if opcode == "while":
      known = _TRIP_COUNT.search(after)
      trip = int(known.group(1)) if known else None
      condition = _CONDITION.search(after).group(1) if _CONDITION.search(after) else None
    callees = [c for _, c in _CALLEES.findall(after)]
    for group in _BRANCHES.findall(after):
      callees += re.findall(r"%?([\w.\-]+)", group)
    for callee in callees:
      calls[current].append((callee, trip, condition if opcode == "while" else None))
    base = opcode.removesuffix("-start")
    if base in COLLECTIVE_OPS and not opcode.endswith("-done"):
      groups = re.search(r"replica_groups=([^,]*\}|\[[^\]]*\][^,]*|\{[^}]*\})", after)
      found.append((current, name, base, opcode, shape, _operand_names(after[len(opcode):]),
                    groups.group(1) if groups else ""))
  def factor(trip, condition):
    if trip is not None:
      return trip
    if condition is None:
      return 1
    counted = _trip_from_condition(roots.get(condition, ""), constants)
    return unknown_trip_count if counted is None else counted

  executions = _executions({c: [(callee, factor(t, cond)) for callee, t, cond in edges]
                            for c, edges in calls.items()}, entry)
  out = []
  for computation, name, base, opcode, shape, operand_names, groups in found:
    operands = tuple(a for n in operand_names for a in _arrays(shapes.get(n, "")))
    results = _arrays(shape)
    if opcode.endswith("-start") and results[:len(operands)] == operands and len(results) > len(operands):
      results = results[len(operands):]  # async start: (inputs, outputs[, scratch]) tuples
    out.append(Collective(name, base, computation, operands, results,
                          executions.get(computation, 0), groups))
  return out


def _trip_from_condition(root: str, constants: dict[str, int]) -> Optional[int]:
  """N for a loop condition ``i < N`` / ``i <= N - 1`` / ``N > i`` with a constant N (the
  counter starting at 0, as in JAX's scans and XLA's windowed einsum loops); else None."""
  match = _COMPARE.search(root)
  if not match:
    return None
  lhs, rhs, direction = match.groups()
  if rhs in constants and direction in ("LT", "LE"):
    return constants[rhs] + (direction == "LE")
  if lhs in constants and direction in ("GT", "GE"):
    return constants[lhs] + (direction == "GE")
  return None


def _executions(calls: dict[str, list[tuple[str, int]]], entry: Optional[str]) -> dict[str, int]:
  """Times each computation runs per execution of ``entry`` (call graph in topological order)."""
  if entry is None:
    return {}
  order, seen = [], set()

  def visit(node):  # iterative post-order DFS
    stack = [(node, iter(calls.get(node, ())))]
    seen.add(node)
    while stack:
      top, children = stack[-1]
      for child, _ in children:
        if child not in seen:
          seen.add(child)
          stack.append((child, iter(calls.get(child, ()))))
          break
      else:
        order.append(top)
        stack.pop()

  visit(entry)
  counts = {name: 0 for name in order}
  counts[entry] = 1
  for node in reversed(order):  # callers before callees
    for child, factor in calls.get(node, ()):
      counts[child] = counts.get(child, 0) + counts[node] * factor
  return counts


def total_bytes(items: list[Collective]) -> int:
  """Σ payload bytes × executions."""
  return sum(c.total_bytes for c in items)


def full_batch_arrays(items: list[Collective], rows: int, tokens: Optional[int] = None,
                      weight_shapes: Sequence[Sequence[int]] = ()
                      ) -> list[tuple[Collective, Array]]:
  """Collectives that carry a floating-point array of every row: rank ≥ 3 with ``rows`` leading,
  or (with ``tokens``) a leading dimension of rows · tokens (the flattened form). Arrays shaped
  like a weight (``weight_shapes``, e.g. a [d_model, heads, head_dim] slice when d_model = rows)
  and integer arrays (token ids) are not activations and are skipped."""
  skip = {tuple(s) for s in weight_shapes}
  hits = []
  for c in items:
    for array in c.operands + c.results:
      dtype, dims = array
      if dims in skip or not dtype.startswith(("f", "bf")):
        continue
      if (len(dims) >= 3 and dims[0] == rows) or (tokens and dims and dims[0] == rows * tokens):
        hits.append((c, array))
        break
  return hits


def summary(items: list[Collective]) -> dict[str, dict[str, int]]:
  """{opcode: {"count": instructions, "executions": runs, "bytes": Σ payload × runs}}."""
  out: dict[str, dict[str, int]] = {}
  for c in items:
    entry = out.setdefault(c.opcode, {"count": 0, "executions": 0, "bytes": 0})
    entry["count"] += 1
    entry["executions"] += c.executions
    entry["bytes"] += c.total_bytes
  return out
