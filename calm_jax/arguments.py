"""One validation of the user's decoding and calibration arguments.

Decode, calibrate and the Python API check every argument here before any
work or any write: a wrong type or a value out of range is an `InputError`
naming the argument and its valid range, which the entry points print as
one line (exit 2). No JAX, no TensorFlow.
"""
import math
import numbers
from typing import Any, Optional, Sequence

from calm_jax import errors


class InputError(errors.UserError, ValueError):
  """A user argument of the wrong type or out of range."""


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value: Any, low: int,
            high: Optional[int] = None) -> int:
  """`value` as an int in [low, high] (high None: no upper bound)."""
  if not _is_int(value):
    raise InputError(f'{name} must be an integer, got {value!r}')
  if value < low or (high is not None and value > high):
    bound = f'[{low}, {high}]' if high is not None else f'>= {low}'
    raise InputError(f'{name}={value} is out of range: valid {bound}')
  return int(value)


def real(name: str, value: Any, low: float, high: float = math.inf, *,
         open_low: bool = False, open_high: bool = False) -> float:
  """`value` as a finite float in the interval (ends open or closed)."""
  if not _is_real(value) or not math.isfinite(value):
    raise InputError(f'{name} must be a finite number, got {value!r}')
  too_low = value <= low if open_low else value < low
  too_high = value >= high if open_high else value > high
  if too_low or too_high:
    left = '(' if open_low else '['
    right = ')' if open_high or high == math.inf else ']'
    raise InputError(f'{name}={value} is out of range: valid '
                     f'{left}{low:g}, {high:g}{right}')
  return float(value)


def optional(check, name: str, value: Any, *args, **kwargs):
  return None if value is None else check(name, value, *args, **kwargs)


def texts(value: Any) -> list[str]:
  """A list of input strings (a lone string is refused, not split)."""
  if isinstance(value, (str, bytes)):
    raise InputError('texts must be a list of strings; for one text pass '
                     '[text]')
  if not isinstance(value, Sequence) or not all(isinstance(t, str)
                                                for t in value):
    raise InputError('texts must be a list of strings')
  return list(value)


def decoding(*, num_layers: int, threshold: Any = None, batch_size: Any = 1,
             min_exit: Any = 1, tau: Any = None, temperature: Any = 0.0,
             top_k: Any = 0, top_p: Any = 1.0,
             max_length: Any = None) -> None:
  """Checks the settings every decode takes (thresholds above 1 are valid:
  they disable exits)."""
  optional(real, 'threshold', threshold, 0.0)
  integer('batch_size', batch_size, 1)
  integer('min_exit', min_exit, 1, num_layers)
  optional(real, 'tau', tau, 0.0, open_low=True)
  real('temperature', temperature, 0.0)
  integer('top_k', top_k, 0)
  real('top_p', top_p, 0.0, 1.0, open_low=True)
  optional(integer, 'max_length', max_length, 1)


def calibration(*, deltas: Sequence[Any], epsilon: Any, grid_step: Any,
                num_examples: Any) -> None:
  for delta in deltas:
    real('delta', delta, 0.0, 1.0, open_low=True, open_high=True)
  real('epsilon', epsilon, 0.0, 1.0, open_low=True, open_high=True)
  real('grid_step', grid_step, 0.0, 1.0, open_low=True)
  optional(integer, 'num_examples', num_examples, 1)
