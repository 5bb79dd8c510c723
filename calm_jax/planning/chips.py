"""TPU chips and topologies: the one table of per-chip figures.

Every figure is Google's published per-chip specification (Cloud TPU
documentation, the "system architecture" page of each version, read
2026-12):
  v4   https://cloud.google.com/tpu/docs/v4
  v5e  https://cloud.google.com/tpu/docs/v5e
  v5p  https://cloud.google.com/tpu/docs/v5p
  v6e  https://cloud.google.com/tpu/docs/v6e
Peak compute is the dense bf16 figure; HBM bandwidth the chip's. What a
JAX device is comes from the compiler's topology, not from this table: a
v4 or v5p chip holds two TensorCores, and the libtpu topology may show
each as a device, so per-device figures divide the chip's by the devices
per chip the topology reports.

No JAX here.
"""

import dataclasses
import math
import re

from calm_jax import errors

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's published figures."""

  name: str  # the topology prefix: 'v5e'
  hbm_bytes: int
  peak_bf16_flops: float  # FLOP/s, dense
  hbm_bandwidth: float  # bytes/s
  source: str


CHIPS = {
  chip.name: chip
  for chip in (
    Chip(
      'v4', 32 * GIB, 275e12, 1228e9, 'https://cloud.google.com/tpu/docs/v4'
    ),
    Chip(
      'v5e', 16 * GIB, 197e12, 819e9, 'https://cloud.google.com/tpu/docs/v5e'
    ),
    Chip(
      'v5p', 95 * GIB, 459e12, 2765e9, 'https://cloud.google.com/tpu/docs/v5p'
    ),
    Chip(
      'v6e', 32 * GIB, 918e12, 1640e9, 'https://cloud.google.com/tpu/docs/v6e'
    ),
  )
}

# Cloud's accelerator-type names for a topology of N chips (what libtpu
# reads from TPU_ACCELERATOR_TYPE): v4 and v5p count TensorCores.
_ACCELERATOR_TYPE = {
  'v4': lambda chips: f'v4-{2 * chips}',
  'v5e': lambda chips: f'v5litepod-{chips}',
  'v5p': lambda chips: f'v5p-{2 * chips}',
  'v6e': lambda chips: f'v6e-{chips}',
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: its chip and its chip grid, e.g. 'v5e:16x16'."""

  chip: Chip
  dims: tuple[int, ...]

  @property
  def name(self) -> str:
    return f'{self.chip.name}:{"x".join(map(str, self.dims))}'

  @property
  def num_chips(self) -> int:
    return math.prod(self.dims)

  @property
  def accelerator_type(self) -> str:
    return _ACCELERATOR_TYPE[self.chip.name](self.num_chips)


def parse_topology(name: str) -> Topology:
  """'v5e:2x2' -> Topology; an unknown chip or a bad grid is a
  SettingError naming what is valid."""
  match = re.fullmatch(r'(v\w+):(\d+(?:x\d+){1,2})', str(name))
  if match is None:
    raise errors.SettingError(
      f'topology {name!r} is not CHIP:GRID, e.g. v5e:2x2, v5e:16x16, '
      'v4:4x4x8, v5p:4x4x4, v6e:8x8'
    )
  chip, grid = match.groups()
  if chip not in CHIPS:
    raise errors.SettingError(
      f'topology {name!r}: unknown chip {chip!r}; valid: {", ".join(CHIPS)}'
    )
  dims = tuple(int(d) for d in grid.split('x'))
  want = 3 if chip in ('v4', 'v5p') else 2
  if len(dims) != want or min(dims) < 1:
    raise errors.SettingError(
      f'topology {name!r}: a {chip} grid has {want} dimensions'
    )
  return Topology(CHIPS[chip], dims)


@dataclasses.dataclass(frozen=True)
class DeviceBudget:
  """What one JAX device of a topology has: the chip's figures divided by
  the devices per chip."""

  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float

  @classmethod
  def of(cls, topology: Topology, num_devices: int) -> 'DeviceBudget':
    per_chip = max(1, num_devices // topology.num_chips)
    chip = topology.chip
    return cls(
      hbm_bytes=chip.hbm_bytes // per_chip,
      peak_flops=chip.peak_bf16_flops / per_chip,
      hbm_bandwidth=chip.hbm_bandwidth / per_chip,
    )
