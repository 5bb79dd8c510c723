"""Decode sizes refused before anything compiles.

A decode whose sequence is longer than the model's positions, whose K/V
caches and attention scores cannot fit the device, or whose exact mode
drafts more tokens per round than a program should unroll, is refused in
one line with its figures (a `SizeError`, exit status 2), not after
minutes of compiling or an allocation failure.

- Lengths: a Llama-family model's prompt plus its output must fit its
  context (`LlamaConfig.context_length`, HF's max_position_embeddings).
  T5 1.1's relative positions have no limit of their own; this module
  states one, `T5_MAX_LENGTH` per side.
- Memory: `memory_estimate` counts the buffers a decode cannot do without
  (every layer's K/V cache, T5's cross-attention keys and values, the
  widest attention scores) per device. It is a lower bound on the need,
  compared with what the device has free now.
- The exact mode: `gamma` at most `arguments.MAX_GAMMA` (its draft loop is unrolled,
  so compile time grows with it). A gamma above max_length is allowed (the
  default 4 with a 3-token output): it drafts no further than the end.
"""

import dataclasses
import os
from typing import Any
from typing import Optional

import jax
import jax.numpy as jnp

from calm_jax import arguments
from calm_jax import errors
from calm_jax.model import model_files

# The longest T5 input, and the longest output, a decode may ask for: 16x
# the 512 / 128 tokens T5 1.1 is trained with, far past what its relative
# position buckets (exact below 128) resolve.
T5_MAX_LENGTH = 8192
GIB = 1 << 30


class SizeError(errors.SettingError):
  """A decode too long or too large for the model or the device."""


@dataclasses.dataclass(frozen=True)
class DecodeSize:
  """The shape of one decode call."""

  rows: int  # the global batch
  input_length: int  # encoder tokens (T5) or prompt tokens (Llama)
  max_length: int  # output tokens
  gamma: int = 0  # the exact mode's drafts per round (0: another mode)

  @classmethod
  def of(
    cls, mode: Any, rows: int, input_length: int, max_length: int
  ) -> 'DecodeSize':
    """The size of a decode mode's call (the exact mode's gamma with it)."""
    draft = getattr(mode, 'draft', None)
    return cls(rows, input_length, max_length, draft.gamma if draft else 0)

  @property
  def cache_positions(self) -> int:
    """Decoder positions cached (the exact mode's verify writes gamma + 1
    past a row's end)."""
    return self.max_length + (self.gamma + 1 if self.gamma else 0)


def check_lengths(config: Any, size: DecodeSize) -> None:
  """Refuses a sequence the model's positions do not cover, and a gamma
  above its cap."""
  if size.gamma:  # its cap (a settings rule), for library callers too
    try:
      arguments.check(gamma=size.gamma)
    except errors.SettingError as e:
      raise SizeError(str(e)) from e
  if model_files.family_of(config) == 'llama':
    context = config.context_length
    total = size.input_length + size.max_length
    if total > context:
      raise SizeError(
        f'the prompt ({size.input_length} tokens) plus max_length '
        f"({size.max_length}) is {total} tokens, past the model's context "
        f'of {context}: shorten the input (max_input_length) or max_length'
      )
    return
  for name, length in (
    ('input length', size.input_length),
    ('max_length', size.max_length),
  ):
    if length > T5_MAX_LENGTH:
      raise SizeError(
        f'{name} {length} is above T5_MAX_LENGTH={T5_MAX_LENGTH} tokens, '
        'the longest T5 decode calm_jax runs'
      )


def memory_estimate(config: Any, size: DecodeSize) -> dict[str, int]:
  """Bytes, over all devices, of the buffers a decode of this size holds
  at once at the least: {'kv_cache', 'cross_kv' (T5), 'attention'}."""
  item = jnp.dtype(config.dtype).itemsize
  rows = size.rows
  if model_files.family_of(config) == 'llama':
    positions = size.input_length + size.cache_positions
    per_position = 2 * config.num_kv_heads * config.head_dim * item
    return {
      'kv_cache': config.num_layers * rows * positions * per_position,
      # The prompt's prefill scores, float32, one layer at a time.
      'attention': rows * config.num_heads * size.input_length**2 * 4,
    }
  per_position = 2 * config.num_heads * config.head_dim * item
  layers = config.num_decoder_layers
  return {
    'kv_cache': layers * rows * size.cache_positions * per_position,
    'cross_kv': layers * rows * size.input_length * per_position,
    'attention': rows * config.num_heads * size.input_length**2 * 4,
  }


def free_bytes(device: Optional[Any] = None) -> Optional[int]:
  """What the device can still allocate: its allocator's limit less what
  is in use, or on a CPU the host's available memory (None: unknown).
  By default this process's first device: another process's devices have
  no memory statistics here (JAX raises INVALID_ARGUMENT)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  if hasattr(os, 'sysconf') and 'SC_AVPHYS_PAGES' in os.sysconf_names:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  return None


def check_memory(
  config: Any,
  size: DecodeSize,
  *,
  devices: int = 1,
  free: Optional[int] = None,
) -> None:
  """Refuses a decode whose estimated buffers per device exceed what the
  device has free (`free` None: measured now)."""
  free = free_bytes() if free is None else free
  if free is None:
    return
  parts = memory_estimate(config, size)
  need = sum(parts.values()) / devices
  if need > free:
    shown = ', '.join(f'{k} {v / devices / GIB:.2f}' for k, v in parts.items())
    raise SizeError(
      f'a decode of {size.rows} rows, {size.input_length} input and '
      f'{size.max_length} output tokens needs at least {need / GIB:.2f} GiB '
      f'per device ({shown} GiB), and the device has {free / GIB:.2f} GiB '
      'free: lower batch_size, max_length or the input length'
    )


def check(
  config: Any, size: DecodeSize, *, devices: int = 1, free=None
) -> None:
  """Every bound of this module, cheapest first."""
  check_lengths(config, size)
  check_memory(config, size, devices=devices, free=free)
