"""What the jobs tell the person at the terminal (no JAX, no TensorFlow).

One place for status lines, warnings, progress bars and compile notices, all
on stderr (stdout stays for results) and only from the primary process of a
multi-process run. The library logs warnings to the `calm_jax` logger;
`show_warnings` makes them plain `warning: ...` lines, without absl's
prefixes.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from typing import Iterable
from typing import Iterator
from typing import Optional
from typing import Sequence
from typing import TypeVar

import tqdm

T = TypeVar('T')


def is_primary() -> bool:
  """Process 0 of a multi-process run (read from the environment JAX sets
  up, so that this module needs no JAX)."""
  jax = sys.modules.get('jax')
  return jax is None or jax.process_index() == 0


def result(text: str) -> None:
  """A job's results (tables, summaries) on stdout, from the primary."""
  if is_primary():
    print(text, flush=True)


def info(message: str) -> None:
  """A status line on stderr, from the primary."""
  if is_primary():
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
  if is_primary():
    print(f'warning: {message}', file=sys.stderr, flush=True)


class _WarningLines(logging.Handler):
  """`warning: message` on the current stderr (looked up at each record,
  so captured streams see it)."""

  def emit(self, record: logging.LogRecord) -> None:
    if is_primary():
      print(
        f'{record.levelname.lower()}: {record.getMessage()}',
        file=sys.stderr,
        flush=True,
      )


def show_warnings() -> None:
  """Routes the library's warnings to plain stderr lines (idempotent)."""
  logger = logging.getLogger('calm_jax')
  if not any(isinstance(h, _WarningLines) for h in logger.handlers):
    logger.addHandler(_WarningLines(level=logging.WARNING))
  logger.propagate = False


# Native start-up lines that say nothing a user of a CPU (or TPU) machine
# can act on: absl's pre-init banner, C++ INFO lines (oneDNN notes, CPU
# features), the CUDA probes of a machine without a GPU.
START_UP_NOISE = (
  r'^WARNING: All log messages before absl::InitializeLog\(\) is called',
  r'^WARNING: Logging before InitGoogle\(\) is written to STDERR',
  r'^I\d{4} ',
  r'^To enable the following instructions: ',
  r'^[EW]\d{4} .*(cuInit|cuda|CUDA|cuDNN|cuFFT|cuBLAS|TensorRT)',
)


@contextlib.contextmanager
def native_stderr_hidden(
  noise: Optional[Sequence[str]] = None,
) -> Iterator[None]:
  """Hides what is written to file descriptor 2 meanwhile (C++ libraries
  write there), all of it kept and shown if the block fails.

  With `noise` (regular expressions), the lines that match none of them
  are shown after the block: a warning worth acting on survives, the
  start-up lines do not. TensorFlow's native start-up lines go through
  absl's C++ log before it is initialized, which no environment variable
  silences any more.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors='replace'))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    if noise is not None:
      captured.seek(0)
      kept = [
        line
        for line in captured.read().decode(errors='replace').splitlines()
        if not any(re.search(pattern, line) for pattern in noise)
      ]
      if kept:
        sys.stderr.write('\n'.join(kept) + '\n')


@contextlib.contextmanager
def compiling(what: str) -> Iterator[None]:
  """`compiling WHAT ...` before an XLA compile, its seconds after."""
  start = time.perf_counter()
  if is_primary():
    print(f'compiling {what} ...', end='', file=sys.stderr, flush=True)
  try:
    yield
  finally:
    if is_primary():
      print(
        f' {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True
      )


def progress(
  items: Iterable[T],
  *,
  desc: str,
  unit: str,
  total: Optional[int] = None,
  disable: bool = False,
) -> Iterable[T]:
  """A tqdm bar on stderr (primary process only; off when not a terminal
  and CALM_PROGRESS=0)."""
  off = disable or not is_primary() or os.environ.get('CALM_PROGRESS') == '0'
  return tqdm.tqdm(
    items, desc=desc, unit=unit, total=total, disable=off, dynamic_ncols=True
  )
