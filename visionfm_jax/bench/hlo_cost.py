"""The kernels of a compiled GPU program, read from its optimised HLO text: what each one is, what it computes and
what it moves.

`compiled.cost_analysis()` is not implemented for a deviceless GPU compile, and XLA's own count takes each while
loop's body once; here every instruction that becomes a kernel is walked from the entry, loop bodies counted by
their `known_trip_count`, and costed from its shapes:

  gemm         cuBLAS / cuBLASLt calls and Triton GEMM fusions: 2 x output elements x contracted size
  attention    cuDNN fused attention: 4 B H T S D forward (QK^T and PV), 2.5x that backward (five products,
               S recomputed); causal halves both
  convolution  cuDNN convolutions: 2 x filter elements x output positions (exact for a patch embedding)
  reduction    a fusion that reduces (norm statistics, softmax sums, gradient sums over the batch)
  elementwise  any other fusion (casts, GELU, adds, optimizer updates)
  copy         data movement alone: copies, transposes, pads, slices, dynamic-(update-)slices, concatenates
  collective   all-gather, reduce-scatter, all-reduce, collective-permute, all-to-all: the payload one device
               sends, with its group size and whether the schedule overlaps it with compute (an async pair with
               kernels between start and done)

Bytes are operands read plus results written, at their HLO sizes, except where a kernel touches part of a
buffer: a dynamic-slice reads its slice, a dynamic-update-slice writes its update in place. Only the schedule's
order is used; nothing here knows a kernel's speed (bench/pricing.py prices them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
}
SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
OPERAND = re.compile(r"%([\w.\-]+)")
FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "add-dependency",
  "iota",
  "all-gather-done",
  "all-reduce-done",
  "collective-permute-done",
  "async-done",
  "async-update",
  "copy-done",
  "send-done",
  "recv-done",
  "domain",
  "get-dimension-size",
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all", "ragged-all-to-all")
COPY_OPS = {
  "copy",
  "copy-start",
  "transpose",
  "pad",
  "slice",
  "dynamic-slice",
  "dynamic-update-slice",
  "concatenate",
  "broadcast",
  "reshape",
  "reverse",
  "gather",
  "scatter",
  "select-and-scatter",
}
# Elementwise maps of one operand that keep its shape: XLA computes them only at the elements a slice of their
# result reads (`_fusion_bytes`).
SLICED_ELEMENTWISE = ("bitcast", "convert", "abs", "negate", "copy")
CLASSES = ("gemm", "attention", "convolution", "reduction", "elementwise", "copy", "collective")


@dataclasses.dataclass
class Kernel:
  """One kernel launch site (`count` launches per step: the product of the trip counts of its loops)."""

  name: str
  kind: str  # one of CLASSES
  flops: float  # per launch
  bytes: float  # per launch
  count: int
  label: str  # the framework op it came from (metadata op_name, shortened), or the step's state it updates
  dtype: str = ""  # gemm / attention: the inputs' element type
  collective: str = ""  # collective: all-gather, reduce-scatter, all-reduce, ...
  group_size: int = 1  # collective: devices in its group
  group_spans_nodes: bool = False
  # collective: the positions (in Program.kernels) of the kernels the schedule runs between its start and done
  overlap: list[int] = dataclasses.field(default_factory=list)
  done: int = -1  # async collective: the position in Program.kernels its done precedes (-1: right after it)
  shape: tuple[int, ...] = ()  # gemm: (M, N, K), the batch dimensions folded into M; (): not known


def gemm_shape(lhs: tuple[int, ...], rhs: tuple[int, ...], lhs_contracting, rhs_contracting, rhs_batch) -> tuple:
  """(M, N, K) of a product of `lhs` and `rhs` over the given dimensions: K the contracted elements, N the rhs's
  free ones, M the lhs's free ones times the batch (cuBLAS runs a batched GEMM's tiles together)."""
  k = math.prod(lhs[int(d)] for d in lhs_contracting)
  n = math.prod(size for d, size in enumerate(rhs) if str(d) not in {str(c) for c in (*rhs_contracting, *rhs_batch)})
  return (math.prod(lhs) // max(k, 1), n, k)


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in SHAPE.finditer(type_text)]


def nbytes(type_text: str) -> float:
  return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes(type_text))


@dataclasses.dataclass
class Instruction:
  name: str
  type: str
  op: str
  operands: list[str]
  attrs: str
  root: bool
  args: str  # the text between the parentheses: operand names, or a parameter's number


def _split_operands(rest: str) -> tuple[str, str]:
  """(operand text, attribute text) of an instruction's text after its opening parenthesis."""
  depth = 1
  for i, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[:i], rest[i + 1 :]
  return rest, ""


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: its instructions in schedule order} and the entry's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    match = INSTRUCTION.match(line) if current is not None else None
    if match:
      operands, attrs = _split_operands(match.group(5))
      current.append(
        Instruction(
          match.group(2),
          match.group(3),
          match.group(4),
          OPERAND.findall(operands),
          attrs,
          bool(match.group(1)),
          operands,
        )
      )
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _attr(attrs: str, key: str) -> str | None:
  match = re.search(rf"\b{key}=[%\"]?([\w.\-$]+)", attrs)
  return match.group(1) if match else None


def _backend_config(attrs: str) -> dict:
  match = re.search(r"backend_config=(\{.*\})(?:, \w+=|$)", attrs)
  if not match:
    return {}
  text = match.group(1)
  depth = 0
  for i, char in enumerate(text):  # the JSON object alone: other attributes may follow it
    depth += {"{": 1, "}": -1}.get(char, 0)
    if depth == 0:
      try:
        return json.loads(text[: i + 1])
      except json.JSONDecodeError:
        return {}
  return {}


def _label(attrs: str) -> str:
  """The framework op a kernel came from: its op_name without jit/autodiff/remat wrappers, 'bwd: ' in front when
  it belongs to the backward pass."""
  match = re.search(r'op_name="([^"]*)"', attrs)
  if not match:
    return ""
  name = match.group(1)
  backward = "transpose(" in name
  parts = [_unwrap(p) for p in name.split("/")]
  parts = [
    p
    for p in parts
    if p and p not in ("train_step", "while", "body", "closed_call", "checkpoint", "rematted_computation", "main")
  ]
  return ("bwd: " if backward else "") + "/".join(parts)


def _flip(direction: str) -> str:
  """The comparison seen from its other operand: N > i is i < N."""
  return {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction, direction)


def _unwrap(part: str) -> str:
  """'transpose(jvp(ViT))' -> 'ViT', 'jit(_pad)' -> '_pad'."""
  while True:
    match = re.fullmatch(r"(?:jvp|transpose|remat|checkpoint|jit|vmap)\((.*)\)", part)
    if not match:
      return part
    part = match.group(1)


def _group(attrs: str, devices_per_node: int) -> tuple[int, bool]:
  """(devices per replica group, whether a group spans nodes) of a collective's `replica_groups`."""
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?", attrs)
  if iota:
    size = int(iota.group(2))
    if iota.group(4):  # transposed iota: members are strided, so a group of more than one spans its stride
      return size, size > 1 and size * _iota_stride(iota) > devices_per_node
    return size, size > devices_per_node
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", attrs)
  if mesh:
    return _mesh_group(mesh.group(1), mesh.group(3), devices_per_node, mesh.group(2))
  if "replica_groups=mesh[" in attrs:
    raise ValueError(f"a collective's mesh replica groups this reader does not know: {attrs[:200]}")
  listed = re.search(r"replica_groups=\{\{([\d,]+)\}", attrs)
  if listed:
    members = [int(d) for d in listed.group(1).split(",")]
    return len(members), len({m // devices_per_node for m in members}) > 1
  pairs = re.search(r"source_target_pairs=\{([^}]*)\}", attrs)
  if pairs:
    ends = [int(d) for d in re.findall(r"\d+", pairs.group(1))]
    return 2, len({e // devices_per_node for e in ends}) > 1
  return 1, False


def _mesh_group(
  axes_text: str, group_axes_text: str, devices_per_node: int, device_ids: str | None = None
) -> tuple[int, bool]:
  """`replica_groups=mesh['a'=16,'b'=1] {'a'}`: the mesh positions (row-major over its axes) that differ only in
  the listed axes form a group; the one holding position 0 says whether groups cross nodes. Position p is device
  p, or with `device_ids=([16,8]T(1,0))` (an iota of those dims, transposed) the p-th of that order."""
  axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", axes_text)]
  grouped = set(re.findall(r"'([^']+)'", group_axes_text))
  strides, stride = {}, 1
  for name, size in reversed(axes):
    strides[name] = stride
    stride *= size
  positions = [0]
  for name, size in axes:
    if name in grouped:
      positions = [m + i * strides[name] for m in positions for i in range(size)]
  order = _device_order(device_ids, stride) if device_ids else None
  members = [order[p] for p in positions] if order else positions
  return len(members), len({m // devices_per_node for m in members}) > 1


def _device_order(device_ids: str, count: int) -> list[int]:
  """The devices of `device_ids=([d0,d1,..]T(p0,p1,..))` in mesh order: iota(count) shaped as dims, transposed."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", device_ids.strip())
  if not iota:
    listed = [int(d) for d in re.findall(r"\d+", device_ids)]
    if len(listed) != count:
      raise ValueError(f"a collective's device_ids this reader does not know: ({device_ids})")
    return listed
  dims = [int(d) for d in iota.group(1).split(",")]
  perm = [int(d) for d in iota.group(2).split(",")] if iota.group(2) else list(range(len(dims)))
  if math.prod(dims) != count or sorted(perm) != list(range(len(dims))):
    raise ValueError(f"device_ids=({device_ids}) do not fit a mesh of {count} devices")
  return np.arange(count).reshape(dims).transpose(perm).ravel().tolist()


def _iota_stride(iota) -> int:
  dims = [int(d) for d in iota.group(3).split(",")]
  order = [int(d) for d in iota.group(5).split(",")]
  inner = order[-1]
  return math.prod(dims[inner + 1 :]) if inner + 1 < len(dims) else 1


class Program:
  """A compiled module's kernels (`kernels`, in schedule order with loop bodies expanded once each)."""

  def __init__(self, hlo_text: str, devices_per_node: int = 8):
    self.computations, self.entry = parse_module(hlo_text)
    self.devices_per_node = devices_per_node
    # instruction names are unique within an HLO module, across its computations
    self._by_name = {i.name: i for computation in self.computations.values() for i in computation}
    self._state_updates = self._state_writers(hlo_text)
    self.kernels: list[Kernel] = []
    self.uncounted_loops: list[str] = []  # while loops whose trip count is neither annotated nor readable
    self._walk(self.entry, 1)

  def total_flops(self) -> float:
    """FLOPs of one step: every kernel's (matrix products; elementwise work is not counted) times its launches."""
    return sum(k.flops * k.count for k in self.kernels)

  # ----------------------------------------------------------------------------------------------- walking

  def _walk(self, computation: str, count: int) -> None:
    pending = {}  # async collective start name -> its Kernel, while its done is not yet reached
    for ins in self.computations[computation]:
      if ins.op == "while":
        self._walk(_attr(ins.attrs, "body"), count * self._trip_count(ins))
        continue
      if ins.op in ("call", "conditional"):
        for callee in re.findall(
          r"(?:to_apply|branch_computations=\{|true_computation|false_computation)=?%?"
          r"([\w.\-]+)",
          ins.attrs,
        ):
          self._walk(callee, count)
        continue
      if ins.op.endswith("-done") or ins.op == "async-done":
        started = pending.pop(ins.operands[0] if ins.operands else "", None)
        if started is not None:
          position, kernel = started
          kernel.overlap = [i for i in range(position + 1, len(self.kernels)) if self.kernels[i].kind != "collective"]
          kernel.done = len(self.kernels)
        continue
      kernel = self._kernel(ins, count)
      if kernel is None:
        continue
      self.kernels.append(kernel)
      if kernel.kind == "collective" and (ins.op.endswith("-start") or ins.op == "async-start"):
        pending[ins.name] = (len(self.kernels) - 1, kernel)

  def _state_writers(self, hlo_text: str) -> dict[str, str]:
    """{entry fusion: 'update: <state parts>'} for each fusion whose results the step writes in place of its
    donated inputs (the module's input_output_alias), the parts read off those inputs' argument paths
    (`state.params['fc']['kernel']` -> `state.params`, `state.health.count` -> `state.health`). A fusion's
    op_name is that of its root, its last op: a whole AdamW update read as a guard's hold (`select_n`) or `add`."""
    header = next((line for line in hlo_text.splitlines() if line.startswith("HloModule")), "")
    alias = re.search(r"input_output_alias=\{((?:\s*\{\d+\}: \(\d+, \{[\d,]*\}(?:, [\w-]+)?\),?)*)", header)
    aliased = dict(re.findall(r"\{(\d+)\}: \((\d+),", alias.group(1))) if alias else {}  # output -> donated input
    entry = self.computations[self.entry]
    root = next((i for i in reversed(entry) if i.root), None)
    if not aliased or root is None or root.op != "tuple":
      return {}
    inputs = {i.args.strip(): i for i in entry if i.op == "parameter"}
    parts: dict[str, set[str]] = {}
    for index, name in enumerate(root.operands):
      donated = inputs.get(aliased.get(str(index), ""))
      path = re.search(r'op_name="(\w+(?:\.\w+)?)', donated.attrs) if donated is not None else None
      writer = self._producer(name)
      if path and writer is not None and writer.op == "fusion":
        parts.setdefault(writer.name, set()).add(path.group(1))
    return {name: "update: " + ", ".join(sorted(paths)) for name, paths in parts.items()}

  def _producer(self, name: str) -> Instruction | None:
    """The instruction that computes `name`, seen through bitcasts and tuples taken apart."""
    ins = self._by_name.get(name)
    while ins is not None and ins.op in ("get-tuple-element", "bitcast"):
      source = self._by_name.get(ins.operands[0])
      if ins.op == "get-tuple-element" and source is not None and source.op == "tuple":
        source = self._by_name.get(source.operands[int(_attr(ins.attrs, "index") or 0)])
      ins = source
    return ins

  def _trip_count(self, loop: Instruction) -> int:
    """XLA's `known_trip_count`, else read off the loop's condition: `i < N` (or <=, >, >=) of a counter against
    a constant, the counter's start taken from the loop's initial tuple (0 when not a constant); XLA leaves the
    annotation off e.g. a loop whose first iteration it peeled. Loops neither gives are counted once and listed
    in `uncounted_loops`."""
    known = _backend_config(loop.attrs).get("known_trip_count", {}).get("n")
    if known is not None:
      return int(known)
    condition = self.computations.get(_attr(loop.attrs, "condition"), [])
    bodies = [condition] + [self.computations.get(_attr(i.attrs, "calls"), []) for i in condition if i.op == "fusion"]
    constants = {i.name: i.args for body in bodies for i in body if i.op == "constant"}
    for compare in (i for body in bodies for i in body if i.op == "compare"):
      direction = re.search(r"direction=(\w+)", compare.attrs)
      bounds = [constants[o] for o in compare.operands if o in constants]
      if direction and len(bounds) == 1 and re.fullmatch(r"-?\d+", bounds[0]):
        start = self._counter_start(loop)
        bound = int(bounds[0])
        trips = {"LT": bound - start, "LE": bound - start + 1, "GT": start - bound, "GE": start - bound + 1}.get(
          direction.group(1) if compare.operands[1] in constants else _flip(direction.group(1))
        )
        if trips and trips > 0:
          return trips
    self.uncounted_loops.append(loop.name)
    return 1

  def _counter_start(self, loop: Instruction) -> int:
    init = self._by_name.get((loop.operands or [""])[0])
    first = self._by_name.get(init.operands[0]) if init is not None and init.op == "tuple" and init.operands else None
    return int(first.args) if first is not None and first.op == "constant" and re.fullmatch(r"-?\d+", first.args) else 0

  def _type(self, name: str) -> str:
    return self._by_name[name].type if name in self._by_name else ""

  # ------------------------------------------------------------------------------------------------ costing

  def _operand_bytes(self, ins: Instruction) -> float:
    return sum(nbytes(self._type(name)) for name in ins.operands)

  def _kernel(self, ins: Instruction, count: int) -> Kernel | None:
    if ins.op in FREE:
      return None
    label = _label(ins.attrs)
    base = ins.op.removesuffix("-start")
    if ins.op == "async-start":
      base = next((c for c in COLLECTIVES if self._calls_collective(ins, c)), "")
    if base in COLLECTIVES:
      return self._collective(ins, base, count, label)
    if ins.op == "custom-call":
      return self._custom_call(ins, count, label)
    if ins.op == "fusion":
      return self._fusion(ins, count, self._state_updates.get(ins.name, label))
    io = self._operand_bytes(ins) + nbytes(ins.type)
    if ins.op == "dot":  # unfused (CPU programs; GPU programs call cuBLAS instead)
      return Kernel(
        ins.name, "gemm", self._dot_flops(ins), io, count, label, dtype=shapes(self._type(ins.operands[0]))[0][0]
      )
    if ins.op == "dynamic-update-slice":
      io = 2 * nbytes(self._type(ins.operands[1]))
    elif ins.op == "dynamic-slice":
      io = 2 * nbytes(ins.type)
    kind = "copy" if ins.op in COPY_OPS else "reduction" if ins.op in ("reduce", "reduce-window") else "elementwise"
    return Kernel(ins.name, kind, 0.0, io, count, label)

  def _calls_collective(self, ins: Instruction, collective: str) -> bool:
    callee = _attr(ins.attrs, "calls")
    return any(i.op == collective for i in self.computations.get(callee, []))

  def _collective(self, ins: Instruction, base: str, count: int, label: str) -> Kernel:
    payload = nbytes(ins.type) if base == "all-gather" else self._operand_bytes(ins)
    if ins.op == "all-gather-start":  # its type is the (operands, results) tuple: the results are gathered
      results = shapes(ins.type)
      payload = sum(DTYPE_BYTES[d] * math.prod(s) for d, s in results[len(results) // 2 :])
    attrs = ins.attrs
    if ins.op == "async-start":
      callee = _attr(ins.attrs, "calls")
      attrs = next((i.attrs for i in self.computations.get(callee, []) if i.op == base), attrs)
    size, spans = _group(attrs, self.devices_per_node)
    return Kernel(
      ins.name, "collective", 0.0, payload, count, label, collective=base, group_size=size, group_spans_nodes=spans
    )

  def _custom_call(self, ins: Instruction, count: int, label: str) -> Kernel:
    target = _attr(ins.attrs, "custom_call_target") or ""
    result = shapes(ins.type)
    io = (
      self._operand_bytes(ins)
      + nbytes(ins.type)
      - sum(DTYPE_BYTES[d] * math.prod(s) for d, s in result if d in ("u8", "s8"))
    )  # scratch workspaces
    operand_shapes = [shapes(self._type(name)) for name in ins.operands]
    if "cublas" in target:
      config = _backend_config(ins.attrs).get("gemm_backend_config", {})
      dims = config.get("dot_dimension_numbers", {})
      shape = gemm_shape(
        operand_shapes[0][0][1],
        operand_shapes[1][0][1],
        dims.get("lhs_contracting_dimensions", []),
        dims.get("rhs_contracting_dimensions", []),
        dims.get("rhs_batch_dimensions", []),
      )
      flops = 2.0 * math.prod(result[0][1]) * shape[2]  # output elements x the contracted size K
      return Kernel(ins.name, "gemm", flops, io, count, label, dtype=operand_shapes[0][0][0], shape=shape)
    if "fmha" in target:
      q, k = operand_shapes[0][0][1], operand_shapes[1][0][1]  # (B, T, H, D) and (B, S, H, D)
      flops = 4.0 * q[0] * q[2] * q[1] * k[1] * q[3]
      if "Backward" in target:
        flops *= 2.5
      if '"mask_type":"CAUSAL"' in ins.attrs:
        flops /= 2
      return Kernel(ins.name, "attention", flops, io, count, label, dtype=operand_shapes[0][0][0])
    if "conv" in target:  # 2 x output positions (N Ho Wo of the forward) x filter elements (Kh Kw Ci Co)
      labels = _attr(ins.attrs, "dim_labels") or ""
      filter_spec = labels.split("_")[1].split("->")[0] if labels.count("_") == 1 else ""
      if "BackwardFilter" in target:
        filt, forward_out = result[0][1], operand_shapes[1][0][1]
      elif "BackwardInput" in target:
        filt, forward_out = operand_shapes[1][0][1], operand_shapes[0][0][1]
      else:
        filt, forward_out = operand_shapes[1][0][1], result[0][1]
      out_channels = filt[filter_spec.index("o")] if "o" in filter_spec else filt[-1]
      flops = 2.0 * math.prod(filt) * math.prod(forward_out) / out_channels
      return Kernel(ins.name, "convolution", flops, io, count, label)
    return Kernel(ins.name, "elementwise", 0.0, io, count, label)

  def _fusion(self, ins: Instruction, count: int, label: str) -> Kernel:
    body = self.computations.get(_attr(ins.attrs, "calls"), [])
    ops = {i.op for i in body}
    io = self._fusion_bytes(ins, body)
    if "dot" in ops:
      dots = [i for i in body if i.op == "dot"]
      return Kernel(
        ins.name,
        "gemm",
        sum(self._dot_flops(d) for d in dots),
        io,
        count,
        label,
        dtype=shapes(self._type(dots[0].operands[0]))[0][0],
        shape=self._dot_shape(dots[0]) if len(dots) == 1 else (),
      )
    compute, movement = ops - FREE - COPY_OPS - {"convert"}, ops & COPY_OPS
    if compute:
      kind = "reduction" if compute & {"reduce", "reduce-window"} else "elementwise"
    else:  # data movement alone is a copy; a cast (broadcast at most beside it) is elementwise work
      kind = "elementwise" if ("convert" in ops and movement <= {"broadcast"}) or (ops and not movement) else "copy"
    return Kernel(ins.name, kind, 0.0, io, count, label)

  def _dot_flops(self, dot: Instruction) -> float:
    """2 x output elements x the contracted size K of a `dot` instruction."""
    return 2.0 * math.prod(shapes(dot.type)[0][1]) * self._dot_shape(dot)[2]

  def _dot_shape(self, dot: Instruction) -> tuple:
    """(M, N, K) of a `dot` instruction (`gemm_shape`)."""

    def dims(key):
      found = re.search(rf"{key}=\{{([\d,]*)\}}", dot.attrs)
      return re.findall(r"\d+", found.group(1)) if found else []

    return gemm_shape(
      shapes(self._type(dot.operands[0]))[0][1],
      shapes(self._type(dot.operands[1]))[0][1],
      dims("lhs_contracting_dims"),
      dims("rhs_contracting_dims"),
      dims("rhs_batch_dims"),
    )

  def _fusion_bytes(self, ins: Instruction, body: list[Instruction]) -> float:
    """Operands read plus results written, where a parameter read only through slices (dynamic or static: a
    straight-line stack reads each layer of its stacked weights so), alone or after casts and other elementwise
    maps of the whole parameter that XLA computes only where sliced, counts its slices' elements; and a
    dynamic-update-slice root writes its update into its (aliased) buffer."""
    params = {i.name: int(i.args) for i in body if i.op == "parameter"}
    users = {}
    for i in body:
      for name in i.operands:
        users.setdefault(name, []).append(i)

    def uses_of(name: str, through=("bitcast",)) -> list[tuple[Instruction, str]]:
      """(user, the name it reads) of `name`, seen through the ops of `through` (a bitcast is a layout's
      reinterpretation: no bytes)."""
      found = []
      for user in users.get(name, []):
        found.extend(uses_of(user.name, through) if user.op in through else [(user, name)])
      return found

    read = 0.0
    by_index = {index: name for name, index in params.items()}
    for position, operand in enumerate(ins.operands):
      full = nbytes(self._type(operand))
      param = by_index.get(position)
      uses = uses_of(param) if param else []
      mapped = uses_of(param, SLICED_ELEMENTWISE) if param else []
      if uses and all(u.op == "dynamic-update-slice" and u.operands[0] == param for u, _ in uses):
        full = 0.0  # updated in place: only the update is written, counted with the result below
      elif mapped and all(u.op in ("dynamic-slice", "slice") and u.operands[0] == read_as for u, read_as in mapped):
        elements = math.prod(shapes(self._type(operand))[0][1])
        full = min(full, full * sum(math.prod(shapes(u.type)[0][1]) for u, _ in mapped) / max(elements, 1))
      read += full
    written = nbytes(ins.type)
    updates = [i for i in body if i.op == "dynamic-update-slice" and i.operands and i.operands[0] in params]
    if updates:
      written = written - sum(nbytes(u.type) for u in updates) + sum(nbytes(self._type(u.operands[1])) for u in updates)
    return read + max(written, 0.0)
