"""What a compiled program costs: the compiler's memory and cost analyses,
a roofline bound, and the checks of its HLO.

All figures are per device, as XLA reports them for an SPMD program. The
roofline bound is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth): a lower
bound on the program's time on that chip, never a timing. It ignores
collectives over the interconnect, per-op and loop overheads and the host,
and takes the compiler's "bytes accessed" (which counts every operand read
and result written, on-chip reuse included) as HBM traffic.
"""

import dataclasses
import time
from typing import Optional

from calm_jax import console
from calm_jax import errors
from calm_jax.parallel import partitioning
from calm_jax.planning import chips
from calm_jax.planning import hlo
from calm_jax.planning import programs


class DoesNotFitError(errors.UserError, MemoryError):
  """A program needs more memory per device than the chip has."""


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """One compiled program's figures (bytes and FLOPs per device)."""

  name: str
  kind: str
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  hbm_bytes: int  # per device
  peak_flops: float  # per device
  hbm_bandwidth: float  # per device
  largest: tuple[hlo.Buffer, ...]
  # The sources with the most bytes read and written (an attribution).
  traffic: tuple[hlo.Traffic, ...] = ()
  model_flops: Optional[float] = None  # per step, all devices
  devices: int = 1
  tokens: int = 0
  loop_host_transfers: tuple[str, ...] = ()
  loop_cache_copies: tuple[str, ...] = ()  # within one memory space
  loop_cache_moves: tuple[str, ...] = ()  # between memory spaces
  # A train step's loop over the exits: the iterations the cost analysis
  # left out, added to flops and bytes_accessed (plan._with_exit_loop).
  exit_loop: Optional[dict] = None
  # A scanned model's loops over its layers (scan_layers): the layers the
  # cost analysis left out, added likewise (plan._with_layer_scan).
  layer_scan: Optional[dict] = None

  @property
  def total_bytes(self) -> int:
    """Memory the program needs per device: arguments, outputs not aliased
    to an argument, temporaries and the code."""
    return (
      self.argument_bytes
      + self.output_bytes
      - self.alias_bytes
      + self.temp_bytes
      + self.code_bytes
    )

  @property
  def headroom_bytes(self) -> int:
    return self.hbm_bytes - self.total_bytes

  @property
  def fits(self) -> bool:
    return self.headroom_bytes >= 0

  @property
  def compute_seconds(self) -> float:
    return self.flops / self.peak_flops

  @property
  def memory_seconds(self) -> float:
    return self.bytes_accessed / self.hbm_bandwidth

  @property
  def roofline_seconds(self) -> float:
    """Lower bound on the program's time on the chip (not a timing)."""
    return max(self.compute_seconds, self.memory_seconds)

  @property
  def bound(self) -> str:
    return (
      'compute' if self.compute_seconds >= self.memory_seconds else 'memory'
    )

  @property
  def roofline_mfu(self) -> Optional[float]:
    """Model FLOPs utilisation at the roofline bound: 6 N tokens over
    (devices x peak x bound). An upper bound on the real MFU."""
    if not self.model_flops:
      return None
    return self.model_flops / (
      self.devices * self.peak_flops * self.roofline_seconds
    )

  def as_json(self) -> dict:
    out = dataclasses.asdict(self)
    out['largest'] = [dataclasses.asdict(b) for b in self.largest]
    out['traffic'] = [dataclasses.asdict(t) for t in self.traffic]
    for name in (
      'total_bytes',
      'headroom_bytes',
      'fits',
      'roofline_seconds',
      'bound',
      'roofline_mfu',
    ):
      out[name] = getattr(self, name)
    return out


def _gib(n: float) -> str:
  return f'{n / chips.GIB:.2f} GiB'


def refusal(report: ProgramReport, topology: str) -> str:
  """The one line a program that does not fit is refused with."""
  largest = ', '.join(
    f'{b.what} {b.shape} ({_gib(b.bytes)})' for b in report.largest[:3]
  )
  return (
    f'{report.name} does not fit {topology}: it needs '
    f'{_gib(report.total_bytes)} per device (temp {_gib(report.temp_bytes)}, '
    f'arguments {_gib(report.argument_bytes)}) against '
    f'{_gib(report.hbm_bytes)} of HBM; largest arrays: {largest}'
  )


def compile_program(
  program: programs.Program, budget: chips.DeviceBudget, topology: str = ''
) -> ProgramReport:
  """Lowers and compiles `program` (a notice while it compiles) and reads
  the compiler's analyses and HLO."""
  start = time.perf_counter()
  with console.compiling(program.name):
    if program.rules is not None:
      with partitioning.activation_rules(program.mesh, program.rules):
        lowered = program.fn.lower(*program.args)
    else:
      lowered = program.fn.lower(*program.args)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise DoesNotFitError(
        _oom_refusal(program, lowered, str(e), topology)
      ) from e
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  module = hlo.parse(compiled.as_text())
  loops_ = module.loop_bodies()
  copies, moves = _cache_copies(module, program.cache_dims, loops_)
  return ProgramReport(
    name=program.name,
    kind=program.kind,
    compile_seconds=seconds,
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    flops=float(cost.get('flops', 0.0)),
    bytes_accessed=float(cost.get('bytes accessed', 0.0)),
    hbm_bytes=budget.hbm_bytes,
    peak_flops=budget.peak_flops,
    hbm_bandwidth=budget.hbm_bandwidth,
    largest=tuple(hlo.largest_arrays(module)),
    traffic=tuple(hlo.traffic_by_source(module)),
    model_flops=program.model_flops,
    devices=program.mesh.size,
    tokens=program.tokens,
    loop_host_transfers=tuple(hlo.host_transfers(module, loops_)),
    loop_cache_copies=tuple(copies),
    loop_cache_moves=tuple(moves),
  )


def _cache_copies(module, dims, names):
  """(synchronous copies, memory-space moves) of a K/V cache array inside
  the loops."""
  if dims is None:
    return [], []
  found = hlo.copies_of(module, tuple(dims), names)
  return list(found.copies), list(found.moves)


def _oom_refusal(
  program: programs.Program, lowered, message: str, topology: str
) -> str:
  """The one line for a program the compiler refused for memory: its
  figures, and the largest arrays of the program as lowered (global
  shapes, before partitioning: the compiler names none)."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  head = next((l for l in lines if 'RESOURCE_EXHAUSTED' in l), lines[0])
  head = head.replace('RESOURCE_EXHAUSTED: ', '').rstrip('.')
  largest = hlo.largest_arrays(
    hlo.parse(lowered.as_text(dialect='hlo', debug_info=True)), 3
  )
  names = ', '.join(f'{b.what} {b.shape} ({_gib(b.bytes)})' for b in largest)
  return (
    f'{program.name} does not fit {topology or "the topology"} '
    f'({program.mesh.devices.size} devices): '
    f'{head[:1].lower()}{head[1:]}; largest arrays (global): {names}'
  )
