"""analysis/split_protocol.py: the split protocol on synthetic losses with known risks."""

import numpy as np

from calm_jax.analysis import split_protocol


def _synthetic(n=500, seed=0):
  """Loss at threshold t is Bernoulli(risk(t)); risk grows as t falls."""
  grid = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
  risk = {1.0: 0.0, 0.8: 0.05, 0.6: 0.1, 0.4: 0.2, 0.2: 0.3, 0.0: 0.5}
  rng = np.random.RandomState(seed)
  uniform = rng.rand(n)  # shared draw: losses nested across thresholds
  losses = np.array([(uniform < risk[t]).astype(float) for t in grid])
  layers = np.array([[8 - 7 * (1 - t)] * n for t in grid])
  tokens = np.ones_like(layers)
  return grid, losses, layers, tokens


def test_run_splits_keeps_test_risk_below_delta():
  grid, losses, layers, tokens = _synthetic()
  speedups = {t: 1 + (1 - t) for t in grid}
  row = split_protocol.run_splits(
    losses,
    layers,
    tokens,
    grid,
    delta=0.15,
    epsilon=0.05,
    splits=50,
    seed=0,
    num_layers=8,
    speedups=speedups,
  )
  assert row['violation_rate'] <= 0.1
  assert 0 < row['mean_test_risk'] < 0.15
  assert row['certified_fraction'] == 1.0
  # Certified thresholds are 0.8 or 0.6 (true risks 0.05 and 0.1 < 0.15).
  assert 0.6 <= row['mean_threshold'] <= 0.8
  assert 8 - 7 * 0.4 <= row['mean_avg_layers'] <= 8 - 7 * 0.2
  tight = split_protocol.run_splits(
    losses,
    layers,
    tokens,
    grid,
    delta=0.01,
    epsilon=0.05,
    splits=10,
    seed=0,
    num_layers=8,
    speedups=speedups,
  )
  assert tight['violation_rate'] == 0.0 and tight['mean_test_risk'] == 0.0
