"""Learn then Test: certified early-exit thresholds (the paper's
calibration; Angelopoulos et al. 2021, fixed-sequence testing).

Pure NumPy/SciPy. Each hypothesis H_j says "the risk at threshold lambda_j
exceeds delta"; fixed-sequence testing walks a descending grid, rejecting
H_j while its p-value is <= epsilon, and returns the last threshold
rejected. With probability >= 1 - epsilon over the calibration draw, the
risk at the returned threshold is <= delta.
"""
import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats

from calm_jax.scoring import metrics

CONSISTENCIES = ('textual', 'risk')


def _h1(a: float, b: float) -> float:
  """Bernoulli KL divergence KL(a || b), with 0 log 0 = 0."""
  value = (1 - a) * math.log((1 - a) / (1 - b))
  if a > 0:
    value += a * math.log(a / b)
  return value


def _check(empirical_risk: float, n: int, delta: float) -> None:
  if n < 1:
    raise ValueError(f'need at least one calibration example, got n={n}')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}')
  if not 0 <= empirical_risk <= 1:
    raise ValueError(f'empirical risk must be in [0, 1], got {empirical_risk}')


def hoeffding_p_value(empirical_risk: float, n: int, delta: float) -> float:
  """exp(-n h1(min(R, delta), delta)): 1 when R >= delta."""
  _check(empirical_risk, n, delta)
  return math.exp(-n * _h1(min(empirical_risk, delta), delta))


def bentkus_p_value(empirical_risk: float, n: int, delta: float) -> float:
  """e P[Binom(n, delta) <= ceil(n R)], capped at 1 (log-space CDF)."""
  _check(empirical_risk, n, delta)
  # A tiny slack keeps n * R = 3.0000000001 from rounding up to 4.
  k = math.ceil(n * empirical_risk - 1e-9)
  return min(1.0, math.exp(1.0 + stats.binom.logcdf(k, n, delta)))


def hb_p_value(empirical_risk: float, n: int, delta: float) -> float:
  """Hoeffding-Bentkus: the smaller of the two valid p-values."""
  return min(hoeffding_p_value(empirical_risk, n, delta),
             bentkus_p_value(empirical_risk, n, delta))


@dataclasses.dataclass
class TestRow:
  threshold: float
  empirical_risk: float
  p_value: float
  avg_layers: Optional[float]
  rejected: bool  # "risk > delta" rejected: the threshold is certified

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class CalibrationResult:
  threshold: Optional[float]  # None: no early exit certified
  table: list[TestRow]
  n: int
  delta: float
  epsilon: float

  @property
  def message(self) -> str:
    if self.threshold is None:
      return (f'no early exit certified at delta={self.delta}, '
              f'epsilon={self.epsilon} with {self.n} examples')
    return (f'threshold {self.threshold:g} certified at delta={self.delta}, '
            f'epsilon={self.epsilon} with {self.n} examples')


def fixed_sequence_test(grid: Sequence[float],
                        losses_at: Callable[[float], tuple[np.ndarray,
                                                           Optional[float]]],
                        *, delta: float, epsilon: float) -> CalibrationResult:
  """Tests thresholds in the grid's (descending) order, lazily.

  `losses_at(threshold)` returns the per-example losses [n] in [0, 1] and
  the average layers there (or None); it is called only for thresholds that
  are reached, so lower thresholds are never decoded once a test fails.
  """
  if not 0 < epsilon < 1:
    raise ValueError(f'epsilon must be in (0, 1), got {epsilon}')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}')
  if list(grid) != sorted(grid, reverse=True):
    raise ValueError('the threshold grid must be in descending order')
  chosen, table, n = None, [], 0
  for threshold in grid:
    losses, avg_layers = losses_at(threshold)
    losses = np.asarray(losses, np.float64)
    n = losses.size
    risk = float(losses.mean()) if n else 1.0
    p_value = hb_p_value(risk, n, delta)
    rejected = p_value <= epsilon
    table.append(TestRow(float(threshold), risk, p_value, avg_layers,
                         rejected))
    if not rejected:
      break
    chosen = float(threshold)
  return CalibrationResult(chosen, table, n, delta, epsilon)


def descending_grid(start: float = 1.0, stop: float = 0.0,
                    step: float = 0.05) -> list[float]:
  """start, start - step, ..., stop (rounded to avoid float drift)."""
  count = int(round((start - stop) / step)) + 1
  return [round(start - i * step, 6) for i in range(count)]


def consistency_losses(consistency: str, metric: str,
                       early: Sequence[str], full: Sequence[str],
                       references: Optional[Sequence] = None) -> np.ndarray:
  """Per-example losses in [0, 1].

  textual: 1 - metric(early, full), the full model's output as reference.
  risk: max(0, (1 - metric(early, ref)) - (1 - metric(full, ref))).
  """
  score = metrics.PER_EXAMPLE[metric]
  if consistency == 'textual':
    losses = np.clip(1.0 - score(list(full), list(early)), 0.0, 1.0)
    # Identical outputs agree fully, even where a metric scores '' as 0.
    same = np.array([e == f for e, f in zip(early, full)], bool)
    return np.where(same, 0.0, losses)
  if consistency == 'risk':
    if references is None:
      raise ValueError('risk consistency needs reference targets')
    early_risk = 1.0 - score(list(references), list(early))
    full_risk = 1.0 - score(list(references), list(full))
    return np.clip(early_risk - full_risk, 0.0, 1.0)
  raise ValueError(f'unknown consistency {consistency!r}; valid: '
                   f'{", ".join(CONSISTENCIES)}')
