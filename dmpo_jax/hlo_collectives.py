"""The one reader of XLA's optimized HLO text: instructions, loop trip counts and collectives.

Used by `benchmarks/memory.py` (collectives and the full-batch check, `docs/scaling.md` §5) and
`benchmarks/hlo_cost.py` (FLOPs / HBM bytes / ICI bytes of the step-time model,
`docs/performance.md` §2), so both count the same collectives with the same bytes and the same
loop trip counts.

* `parse_module(text)`: every computation's instructions (name, shape, opcode, operands,
  attributes), and the entry computation.
* `trip_count(computations, caller, loop)`: a while loop's trip count from XLA's
  ``known_trip_count``, else from its condition ``i < N`` (``i <= N``, ``N > i``, ``N >= i``;
  a compare fused alone counts too) with the counter's start read from the loop's initial tuple
  (through copies; 0 when the initial value is not a tuple in the caller, as for a loop whose
  state arrives whole through a parameter). A loop whose count is not in the program (the MC
  loop, whose count goes through an optimization barrier on purpose; the sampler's block loop,
  which can stop early) gives None: each caller supplies its own count for those.
* `collective(inst, shapes, computation, executions, num_devices)`: one all-gather /
  all-reduce / reduce-scatter / all-to-all / collective-permute (synchronous or ``*-start``)
  with the arrays it takes and gives and the size of its device groups.
  ``payload_bytes``: the larger side on one device (an all-gather's gathered output, a
  reduce-scatter's full input, an all-reduce's buffer). ``ici_bytes``: what one device sends with
  a ring / bidirectional algorithm over a group of n: all-gather and reduce-scatter (n−1)/n of the
  full array, all-reduce 2(n−1)/n of it, all-to-all (n−1)/n of the operand, a permute the operand.
* `collectives(text)`: every collective of a module with how many times it runs per program
  execution (trip counts of the loops around it multiplied; every branch of a conditional counts
  as run).
* `full_batch_arrays`: the layout bug batch-split FSDP must not have: a collective over a
  floating-point array of rank ≥ 3 whose leading dimension is the global row count (activations
  of every row on every device), or the flattened [rows · tokens, ...] form of one. Integer arrays
  are token ids, not activations (XLA's embedding-gradient scatter may gather every row's ids).

XLA's own cost analysis reports no collective traffic and counts each loop body once, hence this
reader.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                  "ragged-all-to-all", "collective-broadcast")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
               "u32": 4, "s64": 8, "u64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8,
               "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
               "f8e4m3b11fnuz": 1, "token": 0}

_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")
_STARTS_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%[\w.\-]+\s+=\s")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                      r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_COUNTER_FIRST = {"LT": 0, "LE": 1}    # i < N, i <= N
_BOUND_FIRST = {"GT": 0, "GE": 1}      # N > i, N >= i

Array = tuple[str, tuple[int, ...]]


# -- instructions --------------------------------------------------------------------------------
@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool = False
  args: str = ""       # the text inside the opcode's parentheses (a constant's literal)

  def attr(self, key: str) -> Optional[str]:
    match = re.search(rf"\b{key}=(%?[\w.\-]+)", self.attrs)
    return match.group(1).lstrip("%") if match else None


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def parse_instruction(line: str) -> Optional[Instruction]:
  line = line.strip()
  root = line.startswith("ROOT ")
  if root:
    line = line[5:]
  if not line.startswith("%") or " = " not in line:
    return None
  name, rest = line[1:].split(" = ", 1)
  end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.index("(")
  opcode = rest[:paren]
  close = _balanced(rest, paren)
  operands = _NAME.findall(rest[paren + 1:close - 1])
  return Instruction(name, shape, opcode, operands, rest[close:], root, rest[paren + 1:close - 1])


Module = dict[str, dict[str, Instruction]]


def parse_module(text: str) -> tuple[Module, str]:
  """({computation name: {instruction name: Instruction}}, entry computation name). An
  instruction may span lines (a Pallas kernel's custom call carries a multi-line backend
  config): a line that neither starts an instruction nor closes the computation (a lone ``}``)
  continues the previous one."""
  computations: Module = {}
  entry, current, pending = None, None, []

  def flush():
    inst = parse_instruction("\n".join(pending)) if pending else None
    if inst is not None:
      computations[current][inst.name] = inst
    pending.clear()

  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = {}
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.rstrip() == "}":
      flush()
      current = None
    elif _STARTS_INSTRUCTION.match(line):
      flush()
      pending.append(line)
    elif pending:
      pending.append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def arrays(shape: str) -> tuple[Array, ...]:
  """(dtype, dims) of every array of an HLO shape (array or tuple)."""
  return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
               for dtype, dims, _ in _ARRAY.findall(shape) if dtype in DTYPE_BYTES)


def shape_bytes(shape: str, skip_memory_space: bool = True) -> float:
  """Bytes of an HLO shape (array or tuple); arrays in a non-default memory space (``S(n)`` in
  the layout, TPU VMEM) count 0 when ``skip_memory_space``."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      continue
    if skip_memory_space and layout and re.search(r"S\(\d+\)", layout):
      continue
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def callees(inst: Instruction) -> list[str]:
  """The computations an instruction calls (fusion / call / while / conditional / reducer)."""
  names = _CALLEES.findall(inst.attrs)
  for group in _BRANCHES.findall(inst.attrs):
    names += _NAME.findall(group) or re.findall(r"([\w.\-]+)", group)
  return names


# -- loop trip counts ----------------------------------------------------------------------------
def _constant(inst: Optional[Instruction]) -> Optional[int]:
  """The integer literal of a scalar ``constant(7)`` (None otherwise)."""
  if inst is None or inst.opcode != "constant":
    return None
  return int(inst.args) if re.fullmatch(r"-?\d+", inst.args.strip()) else None


def trip_count(computations: Module, caller: dict[str, Instruction],
               loop: Instruction) -> tuple[Optional[int], str]:
  """(trip count, "xla" | "condition") of a while instruction of ``caller``; (None, "") when
  the program does not give it (module docstring)."""
  known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', loop.attrs)
  if known:
    return int(known.group(1)), "xla"
  cond = computations.get(loop.attr("condition") or "", {})
  root = next((c for c in cond.values() if c.root), None)
  operands = list(root.operands[:2]) if root is not None else []
  if root is not None and root.opcode == "fusion":  # a compare fused with nothing else
    body = computations.get(root.attr("calls") or "", {})
    inner = next((c for c in body.values() if c.root), None)
    params = {c.name: int(c.args) for c in body.values() if c.opcode == "parameter"}
    if inner is None or inner.opcode != "compare" or not all(o in params for o in inner.operands):
      return None, ""
    root, operands = inner, [root.operands[params[o]] for o in inner.operands[:2]]
  if root is None or root.opcode != "compare" or len(operands) != 2:
    return None, ""
  direction = root.attr("direction") or ""
  if direction in _COUNTER_FIRST:
    counter, bound, extra = cond.get(operands[0]), cond.get(operands[1]), _COUNTER_FIRST[direction]
  elif direction in _BOUND_FIRST:
    bound, counter, extra = cond.get(operands[0]), cond.get(operands[1]), _BOUND_FIRST[direction]
  else:
    return None, ""
  limit = _constant(bound)
  if limit is None or counter is None or counter.opcode != "get-tuple-element":
    return None, ""
  start = _initial_value(caller, loop, int(counter.attr("index") or -1))
  return (None, "") if start is None else (max(0, limit + extra - start), "condition")


def _initial_value(caller: dict[str, Instruction], loop: Instruction,
                   index: int) -> Optional[int]:
  """Element ``index`` of the loop's initial tuple when it is a constant (through copies); 0
  when the initial value is not a tuple built in ``caller``; None when it is not a constant."""
  init = caller.get(loop.operands[0]) if loop.operands else None
  if init is None or init.opcode != "tuple":
    return 0
  if not 0 <= index < len(init.operands):
    return None
  start = caller.get(init.operands[index])
  while start is not None and start.opcode == "copy":
    start = caller.get(start.operands[0])
  return _constant(start)


# -- collectives ---------------------------------------------------------------------------------
def group_size(inst: Instruction, num_devices: int) -> int:
  """Devices per replica group of a collective (all devices when the groups are empty)."""
  attrs = inst.attrs
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if mesh:  # replica_groups=mesh['x'=4,'y'=2] {'x'}
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    named = re.findall(r"'([^']+)'", mesh.group(2))
    return math.prod(int(sizes[n]) for n in named) if named else num_devices
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if iota:  # replica_groups=[groups,size]<=[...]
    return int(iota.group(2))
  explicit = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
  if explicit:
    return len([x for x in explicit.group(1).strip("{}").split(",") if x.strip()])
  if re.search(r"source_target_pairs=\{", attrs):
    return 2
  return num_devices


def collective_kind(opcode: str) -> Optional[str]:
  """"all-gather" for ``all-gather`` / ``all-gather-start``; None for ``-done`` and the rest."""
  base = opcode.removesuffix("-start")
  return base if base in COLLECTIVE_OPS and not opcode.endswith("-done") else None


def _bytes(items: Sequence[Array]) -> float:
  return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in items)


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
  group_size: int = 0              # devices per group (0: not read)

  @property
  def operand_bytes(self) -> float:
    return _bytes(self.operands)

  @property
  def payload_bytes(self) -> float:
    """Bytes of the larger side (inputs or outputs) on one device, for one execution."""
    return max(_bytes(self.operands), _bytes(self.results))

  @property
  def total_bytes(self) -> float:
    return self.payload_bytes * self.executions

  @property
  def ici_bytes(self) -> float:
    """Bytes one device sends for one execution (ring / bidirectional; module docstring)."""
    n, operand = self.group_size, self.operand_bytes
    if n <= 0:
      raise ValueError(f"collective {self.name}: group size unknown (give num_devices)")
    if self.opcode in ("all-gather", "reduce-scatter"):
      full = operand * n if self.opcode == "all-gather" else operand
      return full * (n - 1) / n
    if self.opcode == "all-reduce":
      return 2.0 * operand * (n - 1) / n
    if self.opcode in ("all-to-all", "ragged-all-to-all"):
      return operand * (n - 1) / n
    return operand


def collective(inst: Instruction, caller: dict[str, Instruction], computation: str,
               executions: int = 1, num_devices: int = 0) -> Collective:
  """The `Collective` of a collective instruction of ``caller`` (see `collective_kind`)."""
  kind = collective_kind(inst.opcode)
  if kind is None:
    raise ValueError(f"{inst.name}: {inst.opcode} is not a collective")
  operands = tuple(a for o in inst.operands if o in caller for a in arrays(caller[o].shape))
  results = arrays(inst.shape)
  if (inst.opcode.endswith("-start") and results[:len(operands)] == operands
      and len(results) > len(operands)):
    results = results[len(operands):]  # async start: (inputs, outputs[, scratch]) tuples
  groups = re.search(r"replica_groups=(mesh\[[^\]]*\]\s*\{[^}]*\}|\[[^\]]*\]<=\[[^\]]*\]|"
                     r"\{(?:\{[^}]*\},?)*\})", inst.attrs)
  return Collective(inst.name, kind, computation, operands, results, executions,
                    groups.group(1) if groups else "", group_size(inst, num_devices))


def executions(computations: Module, entry: str, unknown_trip_count: int = 1) -> dict[str, int]:
  """Times each computation runs per execution of ``entry``: the trip counts of the loops
  around it multiplied (``unknown_trip_count`` for a loop without one); every branch of a
  conditional counts as run."""
  calls: dict[str, list[tuple[str, int]]] = {}
  for name, body in computations.items():
    edges = calls.setdefault(name, [])
    for inst in body.values():
      factor = 1
      if inst.opcode == "while":
        trips, _ = trip_count(computations, body, inst)
        factor = unknown_trip_count if trips is None else trips
      edges += [(callee, factor) for callee in callees(inst)]
  order, seen = [], {entry}
  stack = [(entry, iter(calls.get(entry, ())))]
  while stack:  # iterative post-order DFS
    top, children = stack[-1]
    for child, _ in children:
      if child not in seen:
        seen.add(child)
        stack.append((child, iter(calls.get(child, ()))))
        break
    else:
      order.append(top)
      stack.pop()
  counts = {name: 0 for name in order}
  counts[entry] = 1
  for node in reversed(order):  # callers before callees
    for child, factor in calls.get(node, ()):
      counts[child] = counts.get(child, 0) + counts[node] * factor
  return counts


def collectives(hlo_text: str, unknown_trip_count: int = 1,
                num_devices: int = 0) -> list[Collective]:
  """Every collective of an optimized HLO module (``compiled.as_text()``), with how many times
  it runs (`executions`); ``num_devices`` sizes groups the HLO leaves empty (all devices)."""
  computations, entry = parse_module(hlo_text)
  runs = executions(computations, entry, unknown_trip_count)
  return [collective(inst, body, name, runs.get(name, 0), num_devices)
          for name, body in computations.items() for inst in body.values()
          if collective_kind(inst.opcode)]


def total_bytes(items: list[Collective]) -> float:
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


def summary(items: list[Collective]) -> dict[str, dict[str, float]]:
  """{opcode: {"count": instructions, "executions": runs, "bytes": Σ payload × runs}}."""
  out: dict[str, dict[str, float]] = {}
  for c in items:
    entry = out.setdefault(c.opcode, {"count": 0, "executions": 0, "bytes": 0})
    entry["count"] += 1
    entry["executions"] += c.executions
    entry["bytes"] += c.total_bytes
  return out
