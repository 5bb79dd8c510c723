"""Reading a compiled program's HLO text: its computations, the arrays it
materialises, and the checks a decode program must pass.

The text is what `compiled.as_text()` gives: the scheduled, optimised HLO
module (on TPU with layouts and memory spaces). Only what the checks need is
parsed: computations, and per instruction its name, result shape, opcode,
the computations it calls and its `op_name` metadata (the JAX source path).
No JAX here.
"""

import dataclasses
import math
import re
from typing import Iterable
from typing import Optional

# Bytes per element of HLO's primitive types.
_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'bf16': 2,
  'f16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
  'c64': 8,
}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')
_COMPUTATION = re.compile(
  r'^(ENTRY )?%?([\w.\-]+)(?: \(.*\))?(?: ->.*)? \{\s*$'
)
_INSTRUCTION = re.compile(
  r'^\s*(ROOT )?%?([\w.\-]+) = (.+?) ([a-z][a-z\-]*)\((.*)$'
)
_CALLED = re.compile(r'\b(?:calls|body|condition|to_apply)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r'%([\w.\-]+)')
# A layout's memory space: `S(1)` in `{1,3,2,0:T(8,128)(2,1)S(1)}`; none
# written is the default space (HBM on a TPU).
_MEMORY_SPACE = re.compile(r'S\((\d+)\)')

# Host transfers: what a decode loop must never do per iteration.
HOST_OPCODES = ('send', 'send-done', 'recv', 'recv-done', 'infeed', 'outfeed')
_HOST_TARGET = re.compile(
  r'custom_call_target="[^"]*(callback|host)[^"]*"', re.I
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # the result shape text, e.g. 'bf16[2,16,2,32]{3,2,1,0:T(2,128)}'
  opcode: str
  called: tuple[str, ...]
  op_name: str  # the JAX source path, '' if none
  root: bool
  line: str
  operands: tuple[str, ...] = ()

  @property
  def memory_space(self) -> int:
    """The memory space of the result's layout (0: the default)."""
    spaces = _MEMORY_SPACE.findall(self.shape)
    return int(spaces[0]) if spaces else 0

  @property
  def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of each array in the result (a tuple has several)."""
    return [
      (dtype, tuple(int(d) for d in dims.split(',') if d))
      for dtype, dims in _ARRAY.findall(self.shape)
    ]

  @property
  def bytes(self) -> int:
    return sum(_BYTES[t] * math.prod(d) for t, d in self.arrays)


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, list[Instruction]]
  entry: str

  def fusion_bodies(self) -> set[str]:
    """Computations that are the bodies of fusions (their instructions
    are not materialised on their own)."""
    return {
      name
      for instructions in self.computations.values()
      for i in instructions
      if i.opcode == 'fusion'
      for name in i.called
    }

  def reachable(self, roots: Iterable[str]) -> set[str]:
    """`roots` and every computation they call, transitively."""
    seen, todo = set(), list(roots)
    while todo:
      name = todo.pop()
      if name in seen or name not in self.computations:
        continue
      seen.add(name)
      todo.extend(c for i in self.computations[name] for c in i.called)
    return seen

  def loop_bodies(self) -> set[str]:
    """Every computation a while loop runs per iteration (bodies,
    conditions and what they call)."""
    return self.reachable(
      c
      for instructions in self.computations.values()
      for i in instructions
      if i.opcode == 'while'
      for c in i.called
    )

  def materialised(self, names: Optional[set[str]] = None) -> list[Instruction]:
    """Instructions outside fusion bodies (in `names`, default all)."""
    fused = self.fusion_bodies()
    return [
      i
      for name, instructions in self.computations.items()
      if name not in fused and (names is None or name in names)
      for i in instructions
    ]


def parse(text: str) -> Module:
  computations: dict[str, list[Instruction]] = {}
  current, entry = None, ''
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
      continue
    if line.startswith('}'):
      current = None
      continue
    match = _INSTRUCTION.match(line) if current else None
    if match is None:
      continue
    root, name, shape, opcode, rest = match.groups()
    called = tuple(_CALLED.findall(rest)) + tuple(
      c.strip().lstrip('%')
      for group in _BRANCHES.findall(rest)
      for c in group.split(',')
    )
    op_name = _OP_NAME.search(rest)
    operands = tuple(_OPERAND.findall(_operand_text(rest)))
    computations[current].append(
      Instruction(
        name=name,
        shape=shape,
        opcode=opcode,
        called=called,
        op_name=op_name.group(1) if op_name else '',
        root=bool(root),
        line=line.strip(),
        operands=operands,
      )
    )
  return Module(computations, entry)


def _operand_text(rest: str) -> str:
  """The operand list of an instruction: `rest` up to the parenthesis
  that closes the opcode's (shapes inside it may hold parentheses)."""
  depth = 1
  for at, char in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      return rest[:at]
  return rest


@dataclasses.dataclass(frozen=True)
class Buffer:
  """One array the program materialises."""

  what: str  # the JAX source path, shortened
  shape: str  # 'bf16[8,512,32128]'
  bytes: int


def _short_source(op_name: str, name: str) -> str:
  if not op_name:
    return name
  parts = [p for p in op_name.split('/') if p and not p.startswith('jit(')]
  return '/'.join(parts[-3:]) or name


# Results that name another array or that fusion makes free.
_NOT_MATERIALISED = (
  'parameter',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'broadcast',
  'iota',
  'constant',
)


def largest_arrays(module: Module, count: int = 5) -> list[Buffer]:
  """The `count` largest distinct arrays the program materialises (by
  result size of instructions outside fusion bodies; one per source path
  and shape). A size ranking, not a liveness analysis: what dominates the
  compiler's temp bytes in practice."""
  found: dict[tuple[str, str], Buffer] = {}
  for i in module.materialised():
    if i.opcode in _NOT_MATERIALISED:
      continue
    for dtype, dims in i.arrays:
      size = _BYTES[dtype] * math.prod(dims)
      shape = f'{dtype}[{",".join(map(str, dims))}]'
      what = _short_source(i.op_name, i.name)
      key = (what, shape)
      if key not in found or found[key].bytes < size:
        found[key] = Buffer(what, shape, size)
  return sorted(found.values(), key=lambda b: -b.bytes)[:count]


@dataclasses.dataclass(frozen=True)
class Traffic:
  """HBM bytes read and written by the instructions of one source."""

  what: str  # the JAX source path, layer numbers folded
  bytes: int
  instructions: int


# Passes through (a loop, a branch, a call): its body's instructions count.
_CONTROL = ('while', 'conditional', 'call', 'async-start', 'async-done')
_PASSED_OVER = _NOT_MATERIALISED + _CONTROL
_LAYER_NUMBER = re.compile(r'(layers?)_\d+')
# The source name of asynchronous copies and slices (XLA names none).
MOVES = 'asynchronous copies and slices (copy-start, slice-start)'


def traffic_by_source(module: Module, count: int = 8) -> list[Traffic]:
  """Bytes each source's materialised instructions read and write (each
  one's operands and result, a loop's body once, as the cost analysis
  counts them), summed over the source paths with layer numbers folded
  (`layers_3` -> `layers_*`), largest first; asynchronous copies and
  slices (the compiler's moves between HBM and on-chip memory, with no
  source path) under `MOVES`, by the bytes they read. An attribution of
  the cost analysis's "bytes accessed", not the compiler's own: operands
  in on-chip memory count as HBM traffic here."""
  fused = module.fusion_bodies()
  totals: dict[str, list[int]] = {}
  for computation, instructions in module.computations.items():
    if computation in fused:
      continue
    local = {i.name: i for i in instructions}
    for i in instructions:
      if i.opcode in _PASSED_OVER or i.opcode.endswith('-done'):
        continue
      read = sum(local[o].bytes for o in i.operands if o in local)
      what = _LAYER_NUMBER.sub(r'\1_*', _short_source(i.op_name, i.opcode))
      written = i.bytes
      if i.opcode.endswith('-start'):
        # An asynchronous copy or slice between memory spaces: its result
        # holds source and destination, so count the bytes it reads, once.
        what, written = MOVES, 0
      total = totals.setdefault(what, [0, 0])
      total[0] += read + written
      total[1] += 1
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:count]
  return [Traffic(what, b, n) for what, (b, n) in ranked]


def host_transfers(
  module: Module, names: Optional[set[str]] = None
) -> list[str]:
  """Host transfers (send/recv, infeed/outfeed, host callbacks) in the
  computations `names` (default: all), as instruction lines."""
  return [
    i.line[:160]
    for i in module.materialised(names)
    if i.opcode in HOST_OPCODES
    or (i.opcode == 'custom-call' and _HOST_TARGET.search(i.line))
  ]


@dataclasses.dataclass(frozen=True)
class Copies:
  """Copies of one array shape: `copies` stay in one memory space (a
  second buffer of the same bytes), `moves` go between memory spaces
  (HBM and the chip's on-chip memory, placed by the compiler's
  memory-space assignment: the array is staged where the loop reads it)."""

  copies: tuple[str, ...]
  moves: tuple[str, ...]


def copies_of(
  module: Module, dims: tuple[int, ...], names: Optional[set[str]] = None
) -> Copies:
  """Materialised copies (copy, copy-start, or a fusion whose root is a
  copy) of an array with these dims, in `names` (default: all), split
  into copies within a memory space and moves between two."""
  fused_root_copy = {
    name
    for name, instructions in module.computations.items()
    if any(i.root and i.opcode == 'copy' for i in instructions)
  }
  by_name = {
    i.name: i
    for instructions in module.computations.values()
    for i in instructions
  }
  copies, moves = [], []
  for i in module.materialised(names):
    copying = i.opcode in ('copy', 'copy-start') or (
      i.opcode == 'fusion' and any(c in fused_root_copy for c in i.called)
    )
    if not copying or all(d != dims for _, d in i.arrays):
      continue
    sources = [by_name[o] for o in i.operands if o in by_name]
    moving = i.opcode == 'copy-start' or any(
      s.memory_space != i.memory_space for s in sources
    )
    (moves if moving else copies).append(i.line[:160])
  return Copies(tuple(copies), tuple(moves))
