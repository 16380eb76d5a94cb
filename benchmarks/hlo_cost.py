"""Per-device cost of an optimized HLO module, with loop trip counts: matmul FLOPs, HBM bytes and
collective bytes (`docs/performance.md` §2 describes the method).

XLA's ``cost_analysis()`` counts every while-loop body once, so a program whose work sits in a
layer scan inside an MC-sample loop inside a denoising loop is undercounted by the product of the
trip counts. This module reads the optimized HLO text (``compiled.as_text()``), walks the call
graph from the entry computation and multiplies each computation's cost by the number of times
it runs. Parsing, loop trip counts and collective bytes come from the one HLO reader,
`dmpo_jax.hlo_collectives` (also behind `benchmarks/memory.py`); this module adds FLOPs and HBM
bytes and the aggregation:

* while loops: the trip count XLA recorded (``known_trip_count`` in the backend config), else the
  induction-variable pattern (condition ``i < c`` with ``i`` starting at a constant;
  `hlo_collectives.trip_count`), else the caller's ``unknown_trip_counts`` (loops whose length is data-dependent or hidden on purpose:
  the MC-sample loop behind its optimization barrier, the block loop with early stop), given by
  nesting level among such loops; a loop without one raises `UnknownTripCount`;
* conditionals: the most expensive branch (an upper bound); calls and fusions: once per call.

What is counted, per device (HLO after SPMD partitioning is one device's program):

* ``flops``: 2·(output elements)·(contracted elements) of every ``dot`` and ``convolution``
  (TPU lowers matmuls to convolutions), inside fusions too. Elementwise work is not counted,
  nor is the work inside hand-written kernels (Pallas / Mosaic, Triton, cuDNN attention:
  ``kernel_calls`` counts their calls, the other custom calls are XLA's own bookkeeping).
* ``hbm_bytes``: bytes read and written by every top-level instruction (fusions at their
  boundary), as XLA's cost model does: a fusion parameter that is only sliced inside counts
  the slices, an in-place dynamic-update-slice counts its update, and operands in another memory
  space (TPU VMEM, layout ``S(1)``) count nothing. Buffers that live in on-chip memory across
  instructions are still counted, so this is an upper estimate of HBM traffic.
* collectives (``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all``,
  ``collective-permute``, sync or async): count, operand bytes and the bytes each device
  sends over ICI with a ring / bidirectional algorithm in a group of n devices
  (`hlo_collectives.Collective.ici_bytes`): all-gather and reduce-scatter (n−1)/n of the full
  array, all-reduce 2(n−1)/n of it, all-to-all (n−1)/n of the operand, collective-permute the
  operand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The HLO reader (instructions, loop trip counts, collectives) is the library's, shared with
# `benchmarks/memory.py`; re-exported here under the names this module has always had.
from dmpo_jax.hlo_collectives import (  # noqa: E402  pylint: disable=unused-import
    DTYPE_BYTES, Instruction, group_size, parse_instruction, parse_module, shape_bytes)
from dmpo_jax import hlo_collectives  # noqa: E402

# custom_call_target prefixes of hand-written kernels, whose FLOPs the HLO does not show.
KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "__gpu$xla.gpu.triton", "__cudnn$fmha")
COLLECTIVES = hlo_collectives.COLLECTIVE_OPS
# Instructions that move no data themselves (their operands / called computations are counted).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
               "iota", "add-dependency", "domain", "async-done", "async-update", "copy-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
               "recv-done"}
_SLICES = {"dynamic-slice", "slice", "gather"}
_NAME = re.compile(r"%([\w.\-]+)")


class UnknownTripCount(ValueError):
  """A while loop whose trip count is neither in the HLO nor given by the caller."""


def _dims(shape: str) -> list[int]:
  arrays = hlo_collectives.arrays(shape)
  return list(arrays[0][1]) if arrays else []


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  hbm_bytes: float = 0.0
  kernel_calls: float = 0.0
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  def add(self, other: "Cost", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.hbm_bytes += times * other.hbm_bytes
    self.kernel_calls += times * other.kernel_calls
    for kind, values in other.collectives.items():
      mine = self.collectives.setdefault(kind, {"count": 0.0, "operand_bytes": 0.0, "ici_bytes": 0.0})
      for key, value in values.items():
        mine[key] += times * value

  @property
  def collective_operand_bytes(self) -> float:
    return sum(v["operand_bytes"] for v in self.collectives.values())

  @property
  def ici_bytes(self) -> float:
    return sum(v["ici_bytes"] for v in self.collectives.values())

  def as_dict(self) -> dict:
    return {"flops": self.flops, "hbm_bytes": self.hbm_bytes, "ici_bytes": self.ici_bytes,
            "collective_operand_bytes": self.collective_operand_bytes,
            "kernel_calls": self.kernel_calls,
            "collectives": {k: dict(v) for k, v in sorted(self.collectives.items())}}


class ModuleCost:
  """Walks a parsed module (see the module docstring); `total()` is the entry's `Cost`."""

  def __init__(self, text: str, num_devices: int,
               unknown_trip_counts: Sequence[int] = ()):
    self.computations, self.entry = parse_module(text)
    self.num_devices = num_devices
    self.unknown_trip_counts = list(unknown_trip_counts)
    self.loops: list[dict] = []   # every while loop: name, trip count, where it came from

  # -- per instruction --------------------------------------------------------------------------
  def _shape(self, comp: dict[str, Instruction], name: str) -> str:
    inst = comp.get(name)
    return inst.shape if inst is not None else ""

  def _matmul_flops(self, comp, inst: Instruction) -> float:
    out = math.prod(_dims(inst.shape))
    if inst.opcode == "dot":
      lhs = _dims(self._shape(comp, inst.operands[0]))
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
      dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
      return 2.0 * out * math.prod(lhs[d] for d in dims)
    return _convolution_flops(inst, _dims(self._shape(comp, inst.operands[0])),
                              _dims(self._shape(comp, inst.operands[1])), _dims(inst.shape))

  def _collective(self, comp, inst: Instruction, cost: Cost) -> None:
    c = hlo_collectives.collective(inst, comp, "", 1, self.num_devices)
    values = cost.collectives.setdefault(c.opcode,
                                         {"count": 0.0, "operand_bytes": 0.0, "ici_bytes": 0.0})
    values["count"] += 1
    values["operand_bytes"] += c.operand_bytes
    values["ici_bytes"] += c.ici_bytes

  def _traffic(self, comp, inst: Instruction) -> float:
    """HBM bytes of one top-level instruction (module docstring)."""
    if inst.opcode in _NO_TRAFFIC or inst.opcode.endswith("-done"):
      return 0.0
    if inst.opcode == "custom-call" and "AllocateBuffer" in inst.attrs:
      return 0.0
    if inst.opcode == "fusion":
      return self._fusion_traffic(comp, inst)
    if inst.opcode == "dynamic-update-slice":
      return 2.0 * shape_bytes(self._shape(comp, inst.operands[1]))
    if inst.opcode in _SLICES:
      return 2.0 * shape_bytes(inst.shape)
    reads = sum(shape_bytes(self._shape(comp, o)) for o in inst.operands)
    return reads + shape_bytes(inst.shape)

  def _fusion_traffic(self, comp, inst: Instruction) -> float:
    body = self.computations.get(inst.attr("calls") or "", {})
    users: dict[str, list[Instruction]] = {}
    for child in body.values():
      for operand in child.operands:
        users.setdefault(operand, []).append(child)
    reads = 0.0
    for name, param in ((n, c) for n, c in body.items() if c.opcode == "parameter"):
      consumers = self._through_bitcasts(name, users)
      sliced = self._sliced_bytes(name, body, users)
      if sliced is not None:
        reads += sliced
      elif consumers and all(c.opcode == "dynamic-update-slice" and c.operands[0] in
                             self._aliases(name, users) for c in consumers):
        continue  # the buffer updated in place is not read
      else:
        reads += shape_bytes(param.shape)
    root = next((c for c in body.values() if c.root), None)
    outputs = [root] if root is None or root.opcode != "tuple" else [body.get(o) for o in root.operands]
    writes = 0.0
    for out in outputs:
      while out is not None and out.opcode == "bitcast":
        out = body.get(out.operands[0])
      if out is not None and out.opcode == "dynamic-update-slice":
        writes += shape_bytes(body[out.operands[1]].shape) if out.operands[1] in body else 0.0
      elif out is not None:
        writes += shape_bytes(out.shape)
    if root is None:
      writes = shape_bytes(inst.shape)
    return reads + writes

  def _sliced_bytes(self, name: str, body, users) -> Optional[float]:
    """Bytes read of fusion parameter ``name`` when every use slices it (directly, through
    bitcasts, or inside a nested fusion that only slices it: XLA fuses a layer's
    dynamic-slice of the stacked weights into the matmul fusion that way); else None."""
    aliases = self._aliases(name, users)
    consumers = [u for a in aliases for u in users.get(a, []) if u.opcode != "bitcast"]
    total = 0.0
    for c in consumers:
      if c.opcode in _SLICES and c.operands[0] in aliases:
        total += shape_bytes(c.shape)
        continue
      inner = self.computations.get(c.attr("calls") or "", {}) if c.opcode == "fusion" else {}
      params = [p for p in inner.values() if p.opcode == "parameter"]
      positions = [i for i, o in enumerate(c.operands) if o in aliases]
      if not inner or not positions:
        return None
      inner_users: dict[str, list[Instruction]] = {}
      for child in inner.values():
        for operand in child.operands:
          inner_users.setdefault(operand, []).append(child)
      for i in positions:
        param = next((p for p in params if p.args.strip() == str(i)), None)
        part = None if param is None else self._sliced_bytes(param.name, inner, inner_users)
        if part is None:
          return None
        total += part
    return total if consumers else None

  def _aliases(self, name: str, users) -> set[str]:
    """``name`` and the bitcasts of it (transitively)."""
    names, frontier = {name}, [name]
    while frontier:
      for user in users.get(frontier.pop(), []):
        if user.opcode == "bitcast" and user.name not in names:
          names.add(user.name)
          frontier.append(user.name)
    return names

  def _through_bitcasts(self, name: str, users) -> list[Instruction]:
    aliases = self._aliases(name, users)
    return [u for a in aliases for u in users.get(a, []) if u.opcode != "bitcast"]

  # -- per computation ---------------------------------------------------------------------------
  def _trip_count(self, comp, inst: Instruction, depth: int) -> tuple[float, str]:
    trips, source = hlo_collectives.trip_count(self.computations, comp, inst)
    if trips is not None:
      return float(trips), source
    if depth < len(self.unknown_trip_counts):
      return float(self.unknown_trip_counts[depth]), "given"
    where = re.search(r'op_name="([^"]*)"', inst.attrs)
    raise UnknownTripCount(
        f"while loop {inst.name} ({where.group(1) if where else 'no op_name'}) at unknown-loop "
        f"depth {depth} has no trip count in the HLO; give unknown_trip_counts (got "
        f"{self.unknown_trip_counts})")

  def cost_of(self, name: str, depth: int = 0, top_level: bool = True) -> Cost:
    comp = self.computations[name]
    cost = Cost()
    for inst in comp.values():
      op = inst.opcode
      if op in ("dot", "convolution"):
        cost.flops += self._matmul_flops(comp, inst)
      if hlo_collectives.collective_kind(op):
        self._collective(comp, inst, cost)
      target = re.search(r'custom_call_target="([^"]*)"', inst.attrs) if op == "custom-call" else None
      if target and target.group(1).startswith(KERNEL_TARGETS):
        cost.kernel_calls += 1
      if top_level:
        cost.hbm_bytes += self._traffic(comp, inst)
      if op == "while":
        trips, source = self._trip_count(comp, inst, depth)
        nested = depth + (source == "given")
        self.loops.append({"loop": inst.name, "trip_count": trips, "source": source,
                           "op_name": (re.search(r'op_name="([^"]*)"', inst.attrs) or [None, ""])[1]})
        body = self.cost_of(inst.attr("body"), nested)
        body.add(self.cost_of(inst.attr("condition"), nested))
        cost.add(body, trips)
      elif op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
        names = (_NAME.findall(branches.group(1)) if branches else
                 [inst.attr("true_computation"), inst.attr("false_computation")])
        costs = [self.cost_of(b, depth) for b in names if b]
        if costs:
          cost.add(max(costs, key=lambda c: (c.flops, c.hbm_bytes)))
      elif op in ("call", "async-start") or (op == "fusion" and inst.attr("calls")):
        callee = inst.attr("to_apply") or inst.attr("calls")
        if callee in self.computations:
          # A fusion's inside is on-chip: its FLOPs and collectives count, its bytes do not.
          cost.add(self.cost_of(callee, depth, top_level=top_level and op != "fusion"))
    return cost

  def total(self) -> Cost:
    self.loops = []
    return self.cost_of(self.entry)


def _window(attrs: str, rank: int) -> list[dict[str, tuple[int, ...]]]:
  """Per spatial dimension: size, stride, padding (low, high), lhs and rhs dilation."""
  body = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(re.findall(r"(\w+)=(\S+)", body.group(1))) if body else {}
  def per_dim(key, default):
    if key not in fields:
      return [default] * rank
    return [tuple(int(x) for x in part.split("_")) if "_" in part else int(part)
            for part in fields[key].split("x")]
  return [{"stride": st, "pad": pad, "lhs_dilate": ld, "rhs_dilate": rd}
          for st, pad, ld, rd in zip(per_dim("stride", 1), per_dim("pad", (0, 0)),
                                     per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1))]


def _convolution_flops(inst: Instruction, lhs: list[int], rhs: list[int], out: list[int]) -> float:
  """2 · output batch · output features · input features per group · Π over spatial dims of the
  (output position, window tap) pairs that land on an input element, as XLA's cost model
  counts a convolution. TPU writes batched matmuls (attention's batch and head dims) as
  convolutions whose windows, strides and dilations make each output touch one input position
  per such dim: counting taps, not window sizes, keeps those at their matmul FLOPs."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
  if not labels:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  if (len(lhs_l), len(rhs_l), len(out_l)) != (len(lhs), len(rhs), len(out)):
    return 0.0
  spatial = sorted(c for c in lhs_l if c.isdigit())
  pairs = 1
  for k, (dim, window) in enumerate(zip(spatial, _window(inst.attrs, len(spatial)))):
    size_in, size_out, taps = lhs[lhs_l.index(dim)], out[out_l.index(dim)], rhs[rhs_l.index(dim)]
    position = (np.arange(size_out)[:, None] * window["stride"]
                + np.arange(taps)[None, :] * window["rhs_dilate"] - window["pad"][0])
    valid = ((position >= 0) & (position <= (size_in - 1) * window["lhs_dilate"])
             & (position % window["lhs_dilate"] == 0))
    pairs *= int(valid.sum())
  return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs


def module_cost(text: str, num_devices: int, unknown_trip_counts: Sequence[int] = ()) -> dict:
  """`ModuleCost(...).total()` as a dict, with the loops found (name, trip count, source)."""
  walker = ModuleCost(text, num_devices, unknown_trip_counts)
  out = walker.total().as_dict()
  out["loops"] = walker.loops
  return out


if __name__ == "__main__":  # python benchmarks/hlo_cost.py FILE.hlo NUM_DEVICES [TRIPS,...]
  import sys
  trips = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else []
  import gzip
  opener = gzip.open if sys.argv[1].endswith(".gz") else open
  with opener(sys.argv[1], "rt", encoding="utf-8") as f:
    print(json.dumps(module_cost(f.read(), int(sys.argv[2]), trips), indent=1))
