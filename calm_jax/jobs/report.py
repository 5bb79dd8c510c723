"""The reproduction report: the paper's findings re-measured (`make reproduce`).

  python -m calm_jax.report [--model_dir runs/demo/model] \
    [--output docs/REPRODUCTION.md] [--tasks synth_summarize,...]

Runs every measurement of calm_jax.reproduce on a trained model dir (with
its exit classifier) and writes, all from this one run:
  docs/REPRODUCTION.md   tables in the shape of the paper's Table 2, the
                         oracle, the state-propagation ablation, decaying vs
                         constant thresholds, the figures;
  docs/reproduction.json every number behind it;
  docs/figures/*.png     layers and speed-up vs delta, test risk vs delta,
                         quality vs layers (early exit vs truncated models),
                         exit-layer histograms, exit maps (+ .html).
Decodes are cached in MODEL_DIR/calibration/cache, so an interrupted run
resumes; running it again rewrites every file.
"""
import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from calm_jax import api
from calm_jax.storage import checkpoints
from calm_jax.analysis import plots

DEFAULT_TASKS = ('synth_summarize', 'synth_translate', 'synth_qa')
MEASURES = ('softmax', 'state', 'classifier')
# The paper's Table 2 settings: (consistency, delta).
TABLE_SETTINGS = (('textual', 0.1), ('textual', 0.25), ('risk', 0.02),
                  ('risk', 0.05))
SWEEP_DELTAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
CURVE_THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)
EXIT_MAP_EXAMPLES = 8


def calibrated_rows(setup, tasks: Sequence[str], settings) -> list[dict]:
  """Certify on validation, measure on test: one row per (task, measure,
  consistency, delta)."""
  from calm_jax.analysis import findings  # pylint: disable=g-import-not-at-top
  rows = []
  for task in tasks:
    for measure in MEASURES:
      for consistency, delta in settings:
        threshold = findings.certify(setup, task, measure, consistency,
                                      delta)
        outcome = findings.test_outcome(setup, task, measure, consistency,
                                         threshold)
        rows.append({'task': task, 'measure': measure,
                     'consistency': consistency, 'delta': delta, **outcome})
        print(f'{task} {measure} {consistency} delta {delta}: threshold '
              f'{threshold}, layers {outcome["avg_layers"]:.2f}, '
              f'x{outcome["speedup"]:.2f}', flush=True)
  return rows


def validity_rows(setup, tasks: Sequence[str], splits: int = 50
                  ) -> list[dict]:
  """The 80/20 split protocol on the pooled validation data (softmax)."""
  from calm_jax.analysis import findings  # pylint: disable=g-import-not-at-top
  from calm_jax.jobs import validity  # pylint: disable=g-import-not-at-top
  cache = setup.cache('softmax', 'validation')
  rows = []
  for consistency in ('textual', 'risk'):
    losses, layer_sums, tokens = validity.loss_table(
        cache, tasks, consistency, findings.GRID)
    for delta in SWEEP_DELTAS:
      result = validity.run_splits(
          losses, layer_sums, tokens, findings.GRID, delta=delta,
          epsilon=setup.epsilon, splits=splits, seed=0,
          num_layers=setup.lm.config.num_decoder_layers, speedups={})
      rows.append({'consistency': consistency, **result})
  return rows


def decay_comparison(setup, tasks: Sequence[str]) -> list[dict]:
  """Constant vs decaying (tau 4) threshold per task (softmax, textual
  delta 0.25), longest outputs first: the paper's case for the decay."""
  from calm_jax.analysis import findings  # pylint: disable=g-import-not-at-top
  cache = setup.cache('softmax', 'test')
  lengths = {t: float(np.mean([len(r) for r in cache.get(
      t, findings.FULL)['exit_layers']])) for t in tasks}
  out = []
  for task in sorted(tasks, key=lambda t: -lengths[t]):
    entry = {'task': task, 'mean_output_tokens': lengths[task]}
    for name, tau in (('constant', None), ('decaying_tau4', 4.0)):
      threshold = findings.certify(setup, task, 'softmax', 'textual', 0.25,
                                    tau)
      outcome = findings.test_outcome(setup, task, 'softmax', 'textual',
                                       threshold, tau)
      outcome.pop('exit_layers')
      entry[name] = outcome
    out.append(entry)
  return out


def _padded_exits(rows: Sequence[Sequence[int]], batch_size: int,
                  length: int) -> list[np.ndarray]:
  """Per-example exit lists -> [b, length] arrays per test batch."""
  arrays = []
  for start in range(0, len(rows), batch_size):
    array = np.ones((batch_size, length), np.int32)
    for i, row in enumerate(rows[start:start + batch_size]):
      array[i, :len(row)] = row
    arrays.append(array)
  return arrays


def analyses(setup, tasks: Sequence[str], table: Sequence[dict]) -> dict:
  """Oracle, propagation ablation and quality-vs-layers curves per task."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from calm_jax.analysis import findings  # pylint: disable=g-import-not-at-top
  out = {'oracle': {}, 'ablation': {}, 'curves': []}
  for task in tasks:
    oracle = findings.oracle(setup, task)
    out['oracle'][task] = {k: v for k, v in oracle.items() if k != 'outputs'}
    calibrated = next(r for r in table if r['task'] == task and r[
        'measure'] == 'softmax' and r['consistency'] == 'textual' and r[
            'delta'] == 0.25)
    length = pipeline.feature_lengths(task)['targets']
    cache = setup.cache('softmax', 'test')
    threshold = calibrated['threshold']
    rows = cache.get(task, findings.FULL if threshold is None else
                     threshold)['exit_layers']
    out['ablation'][task] = {
        'oracle_exits': findings.propagation_ablation(
            setup, task, [np.asarray(o.exit_layers) for o in
                          oracle['outputs']]),
        'calibrated_exits': findings.propagation_ablation(
            setup, task, _padded_exits(rows, setup.batch_size, length))}
    metric = oracle['metric']
    out['curves'].append({'task': task, 'kind': 'static', 'metric': metric,
                          'points': findings.truncated_curve(setup, task)})
    for measure in MEASURES:
      out['curves'].append({
          'task': task, 'kind': measure, 'metric': metric,
          'points': findings.early_exit_curve(setup, task, measure,
                                               CURVE_THRESHOLDS)})
    print(f'{task}: oracle {oracle["avg_layers"]:.2f} layers', flush=True)
  return out


def exit_maps(setup, tasks: Sequence[str], table: Sequence[dict],
              figures: str) -> dict:
  """HTML + PNG exit maps of the first test examples (softmax, textual
  delta 0.25)."""
  from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
  from calm_jax.analysis import findings  # pylint: disable=g-import-not-at-top
  lm, cfg, paths = setup.lm, setup.lm.config, {}
  for task in tasks:
    row = next(r for r in table if r['task'] == task and r[
        'measure'] == 'softmax' and r['consistency'] == 'textual' and r[
            'delta'] == 0.25)
    threshold = api.FULL_DEPTH if row['threshold'] is None else row[
        'threshold']
    records, _ = engine.decode_task(
        lm.model, lm.params, task, split='test',
        num_examples=EXIT_MAP_EXAMPLES, batch_size=EXIT_MAP_EXAMPLES,
        exit_config=findings.exit_config(setup, 'softmax'), threshold=threshold, seed=0)
    title = (f'{task}: exit layer per token (softmax, textual delta 0.25, '
             f'threshold {threshold:g})')
    paths[task] = plots.write_exit_map(
        records, cfg.num_decoder_layers, title,
        os.path.join(figures, f'exit_map_{task}.html'),
        os.path.join(figures, f'exit_map_{task}.png'))
  return paths


def figures(results: dict, figures_dir: str, num_layers: int) -> dict:
  """Writes the PNG plots; returns their paths by name."""
  table = results['table']
  histogram = {r['task']: r['exit_layers'] for r in table
               if r['measure'] == 'softmax' and r['consistency'] == 'textual'
               and r['delta'] == 0.25}
  path = lambda name: os.path.join(figures_dir, name)
  return {
      'layers_speedup': plots.layers_and_speedup_vs_delta(
          results['sweep'], path('layers_speedup_vs_delta.png')),
      'risk': plots.risk_vs_delta(results['validity'],
                                  path('risk_vs_delta.png')),
      'quality': plots.quality_vs_layers(results['analyses']['curves'],
                                         path('quality_vs_layers.png')),
      'histogram': plots.exit_histogram(histogram, num_layers,
                                        path('exit_histogram.png'))}


def run(model_dir: str, output: str, tasks: Sequence[str], *,
        cal_examples: int, test_examples: int, timing_examples: int) -> dict:
  """All measurements, figures and the document."""
  from calm_jax.analysis import findings  # pylint: disable=g-import-not-at-top
  from calm_jax.analysis import report_markdown  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  lm = api.CalmLM(model_dir)
  lm.classifier_for('classifier')  # one-line error if never trained
  setup = findings.Setup(lm, cal_examples=cal_examples,
                          test_examples=test_examples,
                          timing_examples=timing_examples)
  results = {'model_dir': model_dir, 'checkpoint_step': lm.step,
             'tasks': list(tasks),
             'settings': {'cal_examples': cal_examples,
                          'test_examples': test_examples,
                          'timing_examples': timing_examples,
                          'epsilon': setup.epsilon,
                          'timing_repeats': setup.repeats}}
  results['table'] = calibrated_rows(setup, tasks, TABLE_SETTINGS)
  results['sweep'] = calibrated_rows(
      setup, tasks, [('textual', d) for d in SWEEP_DELTAS])
  results['validity'] = validity_rows(setup, tasks)
  results['decay'] = decay_comparison(setup, tasks)
  results['analyses'] = analyses(setup, tasks, results['table'])
  docs = os.path.dirname(os.path.abspath(output))
  figures_dir = os.path.join(docs, 'figures')
  results['figures'] = figures(results, figures_dir,
                               lm.config.num_decoder_layers)
  results['exit_maps'] = exit_maps(setup, tasks, results['table'],
                                   figures_dir)
  results['seconds'] = round(time.perf_counter() - start, 1)
  for rows in (results['table'], results['sweep']):
    for row in rows:
      row['exit_layers_histogram'] = np.bincount(
          row.pop('exit_layers'),
          minlength=lm.config.num_decoder_layers + 1)[1:].tolist()
  checkpoints.atomic_write_json(os.path.join(docs, 'reproduction.json'),
                                results)
  checkpoints.atomic_write_text(output, report_markdown.render(results, docs))
  print(f'wrote {output} in {results["seconds"]:.0f} s')
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', default='runs/demo/model')
  parser.add_argument('--output', default='docs/REPRODUCTION.md')
  parser.add_argument('--tasks', default=','.join(DEFAULT_TASKS))
  parser.add_argument('--cal_examples', type=int, default=300)
  parser.add_argument('--test_examples', type=int, default=200)
  parser.add_argument('--timing_examples', type=int, default=32)
  args = parser.parse_args(argv)
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    run(args.model_dir, args.output, args.tasks.split(','),
        cal_examples=args.cal_examples, test_examples=args.test_examples,
        timing_examples=args.timing_examples)
  except (checkpoints.CheckpointError, pipeline.DataError, ValueError) as e:
    print(f'error: {checkpoints.first_line(e)}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
