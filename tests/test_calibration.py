"""calibration.py: p-values from the formulas, fixed-sequence testing, losses."""

import math

import numpy as np
import pytest
from scipy import special

from calm_jax.calibration import ltt


def _kl(a, b):
  terms = [(1 - a) * math.log((1 - a) / (1 - b))]
  if a > 0:
    terms.append(a * math.log(a / b))
  return sum(terms)


def _binom_cdf(k, n, p):
  """Direct sum of the binomial pmf, independent of scipy.stats."""
  return sum(
    special.comb(n, i, exact=True) * p**i * (1 - p) ** (n - i)
    for i in range(0, k + 1)
  )


@pytest.mark.parametrize('n', [1, 5, 40, 200])
@pytest.mark.parametrize('risk', [0.0, 0.05, 0.1, 0.24, 0.3, 1.0])
@pytest.mark.parametrize('delta', [0.1, 0.25])
def test_p_values_match_the_formulas(n, risk, delta):
  hoeffding = math.exp(-n * _kl(min(risk, delta), delta))
  k = math.ceil(round(n * risk, 9))
  bentkus = min(1.0, math.e * _binom_cdf(k, n, delta))
  assert ltt.hoeffding_p_value(risk, n, delta) == pytest.approx(
    hoeffding, rel=1e-9
  )
  assert ltt.bentkus_p_value(risk, n, delta) == pytest.approx(
    bentkus, rel=1e-7, abs=1e-300
  )
  assert ltt.hb_p_value(risk, n, delta) == pytest.approx(
    min(hoeffding, bentkus), rel=1e-7, abs=1e-300
  )


def test_p_value_edges_and_monotonicity():
  assert ltt.hoeffding_p_value(0.3, 50, 0.25) == 1.0  # R >= delta
  assert ltt.hb_p_value(0.0, 1, 0.25) == pytest.approx(min(0.75, math.e * 0.75))
  assert 0 < ltt.hb_p_value(0.0, 2000, 0.05) < 1e-40  # no underflow
  risks = np.linspace(0, 0.3, 31)
  p = [ltt.hb_p_value(r, 100, 0.2) for r in risks]
  assert all(a <= b + 1e-15 for a, b in zip(p, p[1:]))
  by_n = [ltt.hb_p_value(0.1, n, 0.2) for n in (10, 50, 100, 500)]
  assert all(a >= b for a, b in zip(by_n, by_n[1:]))
  with pytest.raises(ValueError, match='delta'):
    ltt.hb_p_value(0.1, 10, 1.5)
  with pytest.raises(ValueError, match='n=0'):
    ltt.hb_p_value(0.1, 0, 0.2)


def _curve(risks, n=400):
  """losses_at for a risk curve: exactly round(r * n) losses of 1."""
  calls = []

  def losses_at(threshold):
    calls.append(threshold)
    ones = int(round(risks[threshold] * n))
    return np.r_[np.ones(ones), np.zeros(n - ones)], 1.0 + threshold

  return losses_at, calls


def test_fixed_sequence_monotone_curve_stops_at_first_failure():
  grid = [1.0, 0.8, 0.6, 0.4, 0.2]
  losses_at, calls = _curve(
    {1.0: 0.0, 0.8: 0.02, 0.6: 0.05, 0.4: 0.2, 0.2: 0.4}
  )
  result = ltt.fixed_sequence_test(grid, losses_at, delta=0.1, epsilon=0.05)
  assert result.threshold == 0.6
  assert calls == [1.0, 0.8, 0.6, 0.4]  # 0.2 never decoded
  assert [row.rejected for row in result.table] == [True, True, True, False]
  assert result.table[-1].p_value > 0.05 and result.n == 400


def test_fixed_sequence_non_monotone_all_fail_all_pass():
  grid = [1.0, 0.8, 0.6, 0.4]
  losses_at, _ = _curve({1.0: 0.0, 0.8: 0.3, 0.6: 0.0, 0.4: 0.0})
  result = ltt.fixed_sequence_test(grid, losses_at, delta=0.1, epsilon=0.05)
  assert result.threshold == 1.0  # stops at 0.8 though 0.6 would pass
  losses_at, _ = _curve({1.0: 0.5, 0.8: 0.0, 0.6: 0.0, 0.4: 0.0})
  none = ltt.fixed_sequence_test(grid, losses_at, delta=0.1, epsilon=0.05)
  assert none.threshold is None and len(none.table) == 1
  assert none.message.startswith('no early exit certified at delta=0.1')
  losses_at, _ = _curve({t: 0.0 for t in grid})
  everything = ltt.fixed_sequence_test(grid, losses_at, delta=0.1, epsilon=0.05)
  assert everything.threshold == 0.4 and len(everything.table) == 4
  with pytest.raises(ValueError, match='descending'):
    ltt.fixed_sequence_test([0.2, 0.4], losses_at, delta=0.1, epsilon=0.05)
  with pytest.raises(ValueError, match='epsilon'):
    ltt.fixed_sequence_test(grid, losses_at, delta=0.1, epsilon=0.0)


def test_consistency_losses():
  same = ltt.consistency_losses(
    'textual', 'rougeL', ['a b c', ''], ['a b c', '']
  )
  np.testing.assert_array_equal(same, [0.0, 0.0])
  disjoint = ltt.consistency_losses('textual', 'f1', ['x y'], ['a b'])
  np.testing.assert_array_equal(disjoint, [1.0])
  risk = ltt.consistency_losses(
    'risk', 'f1', ['x y', 'x'], ['x', 'x y'], references=['x y', 'x y']
  )
  # Early is better than full on row 0: clipped at 0; worse on row 1.
  np.testing.assert_allclose(risk, [0.0, 1 - 2 / 3])
  assert ltt.descending_grid(1.0, 0.8, 0.05) == [1.0, 0.95, 0.9, 0.85, 0.8]
