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
from typing import Callable
from typing import Optional
from typing import Sequence

import numpy as np
from scipy import stats

from calm_jax import arguments
from calm_jax.scoring import metrics


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
  return min(
    hoeffding_p_value(empirical_risk, n, delta),
    bentkus_p_value(empirical_risk, n, delta),
  )


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
      return (
        f'no early exit certified at delta={self.delta}, '
        f'epsilon={self.epsilon} with {self.n} examples'
      )
    return (
      f'threshold {self.threshold:g} certified at delta={self.delta}, '
      f'epsilon={self.epsilon} with {self.n} examples'
    )


def test_row(
  threshold: float,
  risk: float,
  n: int,
  avg_layers: Optional[float],
  *,
  delta: float,
  epsilon: float,
) -> TestRow:
  """One hypothesis of the sequence: "risk at `threshold` exceeds delta",
  rejected (the threshold certified) when its p-value is <= epsilon."""
  p_value = hb_p_value(risk, n, delta)
  return TestRow(
    float(threshold), float(risk), p_value, avg_layers, p_value <= epsilon
  )


def fixed_sequence_test(
  grid: Sequence[float],
  losses_at: Callable[[float], tuple[np.ndarray, Optional[float]]],
  *,
  delta: float,
  epsilon: float,
) -> CalibrationResult:
  """Tests thresholds in the grid's (descending) order, lazily.

  `losses_at(threshold)` returns the per-example losses [n] in [0, 1] and
  the average layers there (or None); it is called only for thresholds that
  are reached, so lower thresholds are never decoded once a test fails.
  """
  _check_levels(delta, epsilon)
  if list(grid) != sorted(grid, reverse=True):
    raise ValueError('the threshold grid must be in descending order')
  chosen, table, n = None, [], 0
  for threshold in grid:
    losses, avg_layers = losses_at(threshold)
    losses = np.asarray(losses, np.float64)
    n = losses.size
    row = test_row(
      threshold,
      float(losses.mean()) if n else 1.0,
      n,
      avg_layers,
      delta=delta,
      epsilon=epsilon,
    )
    table.append(row)
    if not row.rejected:
      break
    chosen = row.threshold
  return CalibrationResult(chosen, table, n, delta, epsilon)


def replay(
  table: Sequence[dict],
  grid: Sequence[float],
  *,
  n: int,
  delta: float,
  epsilon: float,
) -> Optional[float]:
  """The threshold that fixed-sequence testing certifies from a record's
  table of empirical risks: every row's p-value and decision recomputed,
  the rows checked to be the grid's first thresholds in order, ending at
  the first hypothesis not rejected (or at the grid's end). A ValueError
  says which row does not follow."""
  _check_levels(delta, epsilon)
  if not table:
    raise ValueError('the table has no rows')
  chosen = None
  for index, stored in enumerate(table):
    if index >= len(grid) or abs(stored['threshold'] - grid[index]) > 1e-9:
      raise ValueError(
        f'row {index + 1} tests threshold '
        f"{stored['threshold']}, not the grid's next "
        'threshold'
      )
    row = test_row(
      stored['threshold'],
      stored['empirical_risk'],
      n,
      stored.get('avg_layers'),
      delta=delta,
      epsilon=epsilon,
    )
    if (
      not math.isclose(
        row.p_value, stored['p_value'], rel_tol=1e-9, abs_tol=1e-12
      )
      or row.rejected != stored['rejected']
    ):
      raise ValueError(
        f'row {index + 1} (threshold {row.threshold:g}) '
        f'does not follow from its risk {row.empirical_risk}'
      )
    if not row.rejected:
      if index != len(table) - 1:
        raise ValueError(
          f'the test stops at row {index + 1}, but the table goes on'
        )
      return chosen
    chosen = row.threshold
  if len(table) < len(grid):
    raise ValueError(
      f'the table ends at row {len(table)} with a certified '
      'threshold, before the test does'
    )
  return chosen


def _check_levels(delta: float, epsilon: float) -> None:
  if not 0 < epsilon < 1:
    raise ValueError(f'epsilon must be in (0, 1), got {epsilon}')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}')


def descending_grid(
  start: float = 1.0, stop: float = 0.0, step: float = 0.05
) -> list[float]:
  """start, start - step, ..., stop (rounded to avoid float drift)."""
  count = int(round((start - stop) / step)) + 1
  return [round(start - i * step, 6) for i in range(count)]


def consistency_losses(
  consistency: str,
  metric: str,
  early: Sequence[str],
  full: Sequence[str],
  references: Optional[Sequence] = None,
) -> np.ndarray:
  """Per-example losses in [0, 1].

  textual: 1 - metric(early, full), the full model's output as reference.
  risk: max(0, (1 - metric(early, ref)) - (1 - metric(full, ref))).
  """
  arguments.check(consistency=consistency)
  score = metrics.PER_EXAMPLE[metric]
  if consistency == 'textual':
    losses = np.clip(1.0 - score(list(full), list(early)), 0.0, 1.0)
    # Identical outputs agree fully, even where a metric scores '' as 0.
    same = np.array([e == f for e, f in zip(early, full)], bool)
    return np.where(same, 0.0, losses)
  if references is None:  # risk consistency
    raise ValueError('risk consistency needs reference targets')
  early_risk = 1.0 - score(list(references), list(early))
  full_risk = 1.0 - score(list(references), list(full))
  return np.clip(early_risk - full_risk, 0.0, 1.0)
