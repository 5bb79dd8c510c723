"""The paper's check of a calibration's promise: random 80/20 splits.

For each split of the calibration examples, certify a threshold with Learn
then Test on 80% and measure on the other 20%: the fraction of splits whose
test risk exceeds delta is what LTT promises to keep at or below epsilon.
Pure NumPy over precomputed per-example losses and exit layers.
"""

import math

import numpy as np

from calm_jax.calibration import ltt


def split_outcome(
  losses,
  layer_sums,
  tokens,
  grid,
  calibration_rows,
  test_rows,
  *,
  delta,
  epsilon,
) -> dict:
  """Certify on calibration rows; measure risk and layers on test rows."""
  result = ltt.fixed_sequence_test(
    grid,
    lambda t: (losses[grid.index(t), calibration_rows], None),
    delta=delta,
    epsilon=epsilon,
  )
  if result.threshold is None:  # no exit: full depth, zero risk by design
    return {'threshold': None, 'test_risk': 0.0, 'avg_layers': None}
  j = grid.index(result.threshold)
  return {
    'threshold': result.threshold,
    'test_risk': float(losses[j, test_rows].mean()),
    'avg_layers': float(
      layer_sums[j, test_rows].sum() / tokens[j, test_rows].sum()
    ),
  }


def run_splits(
  losses,
  layer_sums,
  tokens,
  grid,
  *,
  delta,
  epsilon,
  splits,
  seed,
  num_layers,
  speedups,
) -> dict:
  n = losses.shape[1]
  rng = np.random.RandomState(seed)
  outcomes = []
  for _ in range(splits):
    order = rng.permutation(n)
    cut = int(round(0.8 * n))
    outcomes.append(
      split_outcome(
        losses,
        layer_sums,
        tokens,
        grid,
        order[:cut],
        order[cut:],
        delta=delta,
        epsilon=epsilon,
      )
    )
  risks = np.array([o['test_risk'] for o in outcomes])
  layers = [o['avg_layers'] or num_layers for o in outcomes]
  speed = [speedups.get(o['threshold'], 1.0) for o in outcomes]
  return {
    'delta': delta,
    'epsilon': epsilon,
    'splits': splits,
    'violation_rate': float((risks > delta).mean()),
    'mean_test_risk': float(risks.mean()),
    'mean_avg_layers': float(np.mean(layers)),
    'mean_speedup': float(np.mean(speed)),
    'certified_fraction': float(
      np.mean([o['threshold'] is not None for o in outcomes])
    ),
    'mean_threshold': float(
      np.mean(
        [o['threshold'] for o in outcomes if o['threshold'] is not None]
        or [np.nan]
      )
    ),
  }


def violation_bound(epsilon: float, splits: int) -> float:
  """epsilon plus two binomial standard deviations over `splits` splits:
  the violation rate a kept promise stays under, but for noise."""
  return epsilon + 2 * math.sqrt(epsilon * (1 - epsilon) / splits)
