"""Does the calibration keep its promise? Random calibration/test splits.

  python -m calm_jax.validity [--model_dir runs/demo/model] [--splits 50]

Decodes the demo model's validation data once per grid threshold (through
the calibration cache), then for each delta and consistency type draws
random 80/20 calibration/test splits (the paper's protocol), certifies a
threshold on the 80% with Learn then Test and measures on the 20%: the
fraction of splits whose test risk exceeds delta (LTT promises <= epsilon),
the mean test risk, the mean average layers and the mean speed-up (full-depth
decode time over early-exit decode time of the same examples). Writes
runs/validity/validity.json and validity.png (test risk and violation rate
vs delta, drawn by plots.risk_vs_delta).
"""
import argparse
import os
from typing import Sequence

import numpy as np

from calm_jax import api
from calm_jax.calibration import ltt
from calm_jax.storage import checkpoints
from calm_jax.analysis import plots

DELTAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def loss_table(cache, task_names: Sequence[str], consistency: str,
               grid: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Per-example losses [thresholds, n] and exit layers summed per example."""
  from calm_jax.jobs import calibrate  # pylint: disable=g-import-not-at-top
  losses, layer_sums, token_counts = [], [], []
  for threshold in grid:
    row, _ = calibrate.losses_at_threshold(cache, task_names, consistency,
                                           threshold)
    losses.append(row)
    rows = [r for task in task_names
            for r in cache.get(task, threshold)['exit_layers']]
    layer_sums.append([sum(r) for r in rows])
    token_counts.append([len(r) for r in rows])
  return (np.array(losses), np.array(layer_sums, np.float64),
          np.array(token_counts, np.float64))


def split_outcome(losses, layer_sums, tokens, grid, calibration_rows,
                  test_rows, *, delta, epsilon) -> dict:
  """Certify on calibration rows; measure risk and layers on test rows."""
  result = ltt.fixed_sequence_test(
      grid, lambda t: (losses[grid.index(t), calibration_rows], None),
      delta=delta, epsilon=epsilon)
  if result.threshold is None:  # no exit: full depth, zero risk by design
    return {'threshold': None, 'test_risk': 0.0, 'avg_layers': None}
  j = grid.index(result.threshold)
  return {'threshold': result.threshold,
          'test_risk': float(losses[j, test_rows].mean()),
          'avg_layers': float(layer_sums[j, test_rows].sum()
                              / tokens[j, test_rows].sum())}


def run_splits(losses, layer_sums, tokens, grid, *, delta, epsilon, splits,
               seed, num_layers, speedups) -> dict:
  n = losses.shape[1]
  rng = np.random.RandomState(seed)
  outcomes = []
  for _ in range(splits):
    order = rng.permutation(n)
    cut = int(round(0.8 * n))
    outcomes.append(split_outcome(losses, layer_sums, tokens, grid,
                                  order[:cut], order[cut:], delta=delta,
                                  epsilon=epsilon))
  risks = np.array([o['test_risk'] for o in outcomes])
  layers = [o['avg_layers'] or num_layers for o in outcomes]
  speed = [speedups.get(o['threshold'], 1.0) for o in outcomes]
  return {'delta': delta, 'epsilon': epsilon, 'splits': splits,
          'violation_rate': float((risks > delta).mean()),
          'mean_test_risk': float(risks.mean()),
          'mean_avg_layers': float(np.mean(layers)),
          'mean_speedup': float(np.mean(speed)),
          'certified_fraction': float(np.mean(
              [o['threshold'] is not None for o in outcomes])),
          'mean_threshold': float(np.mean(
              [o['threshold'] for o in outcomes
               if o['threshold'] is not None] or [np.nan]))}


def decode_speedups(cache, task_names, grid) -> dict:
  """Full-depth seconds / early-exit seconds per threshold (same examples;
  measured once each while filling the cache, so sequential, not
  alternating: a rough figure; `make bench` has the careful ratios)."""
  from calm_jax.jobs import calibrate  # pylint: disable=g-import-not-at-top
  seconds = lambda t: sum(cache.get(task, t)['seconds_after_compile']
                          for task in task_names)
  full = seconds(calibrate.FULL)
  return {t: full / max(seconds(t), 1e-9) for t in grid}


def main(argv=None) -> None:
  from calm_jax.jobs import calibrate  # pylint: disable=g-import-not-at-top
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_dir', default='runs/demo/model')
  parser.add_argument('--task', default='synth_mix')
  parser.add_argument('--num_examples', type=int, default=300,
                      help='validation examples per task')
  parser.add_argument('--splits', type=int, default=50)
  parser.add_argument('--epsilon', type=float, default=0.05)
  parser.add_argument('--confidence', default='softmax')
  parser.add_argument('--output_dir', default='runs/validity')
  args = parser.parse_args(argv)
  if not os.path.exists(os.path.join(args.model_dir, checkpoints.MODEL_JSON)):
    raise SystemExit(f'error: no trained model in {args.model_dir} '
                     '(run make demo first)')
  lm = api.CalmLM(args.model_dir)
  task_names = list(pipeline.task_rates(args.task))
  cache = calibrate.DecodeCache(lm, measure=args.confidence, tau=None,
                                split='validation',
                                num_examples=args.num_examples,
                                batch_size=32, min_exit=1)
  grid = ltt.descending_grid(1.0, 0.0, 0.05)
  speedups = decode_speedups(cache, task_names, grid)
  results = []
  for consistency in ltt.CONSISTENCIES:
    losses, layer_sums, tokens = loss_table(cache, task_names, consistency,
                                            grid)
    for delta in DELTAS:
      row = run_splits(losses, layer_sums, tokens, grid, delta=delta,
                       epsilon=args.epsilon, splits=args.splits, seed=0,
                       num_layers=lm.config.num_decoder_layers,
                       speedups=speedups)
      row['consistency'] = consistency
      results.append(row)
      print(f"{consistency:>8} delta={delta:<5} violations="
            f"{row['violation_rate']:.3f} risk={row['mean_test_risk']:.4f} "
            f"layers={row['mean_avg_layers']:.2f} "
            f"speedup={row['mean_speedup']:.2f}")
  os.makedirs(args.output_dir, exist_ok=True)
  checkpoints.atomic_write_json(os.path.join(args.output_dir,
                                             'validity.json'), {
      'model_dir': args.model_dir, 'checkpoint_step': lm.step,
      'confidence': args.confidence, 'n': int(losses.shape[1]),
      'grid': grid, 'speedup_by_threshold': speedups, 'results': results})
  plots.risk_vs_delta(results, os.path.join(args.output_dir, 'validity.png'))
  print(f'wrote {args.output_dir}/validity.json and validity.png')


if __name__ == '__main__':
  main()
