"""The report job: the paper's findings re-measured on a trained model dir.

Runs every measurement of `analysis.findings` on a model dir (with its exit
classifier) and writes, all from this one run:
  OUTPUT                 tables in the shape of the paper's Table 2, the
                         oracle, the state-propagation ablation, decaying vs
                         constant thresholds, the figures;
  reproduction.json      every number behind it, next to OUTPUT;
  figures/*.png          layers and speed-up vs delta, test risk vs delta,
                         quality vs layers (early exit vs truncated models),
                         exit-layer histograms, exit maps (+ .html).
Decodes are cached in MODEL_DIR/calibration/cache, so an interrupted run
resumes; running it again rewrites every file.
"""

import os
import time
from typing import Optional
from typing import Sequence

from etils import epy
import gin
import numpy as np

from calm_jax import arguments
from calm_jax import console
from calm_jax.analysis import findings
from calm_jax.analysis import plots
from calm_jax.analysis import report_markdown
from calm_jax.analysis import split_protocol
from calm_jax.decoding import thresholds
from calm_jax.evaluation import engine
from calm_jax.inference import loaded as loaded_lib
from calm_jax.jobs import calibrate as calibrate_job
from calm_jax.jobs import preflight
from calm_jax.storage import files

# The SeqIO pipeline (and with it TensorFlow) loads when a job first
# reads data, not when the command line registers every job.
with epy.lazy_imports():
  from calm_jax.data import pipeline

READS = ('calm_jax.report',)
DEFAULT_GIN_FILES = ('gin/runs/report.gin',)
DEFAULT_TASKS = ('synth_summarize', 'synth_translate', 'synth_qa')
MEASURES = ('softmax', 'state', 'classifier')
# The paper's Table 2 settings: (consistency, delta).
TABLE_SETTINGS = (
  ('textual', 0.1),
  ('textual', 0.25),
  ('risk', 0.02),
  ('risk', 0.05),
)
SWEEP_DELTAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
CURVE_THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)
EXIT_MAP_EXAMPLES = 8


def calibrated_rows(setup, tasks: Sequence[str], settings) -> list[dict]:
  """Certify on validation, measure on test: one row per (task, measure,
  consistency, delta)."""
  rows = []
  for task in tasks:
    for measure in MEASURES:
      for consistency, delta in settings:
        threshold = findings.certify_threshold(
          setup, task, measure, consistency, delta
        )
        outcome = findings.test_outcome(
          setup, task, measure, consistency, threshold
        )
        rows.append(
          {
            'task': task,
            'measure': measure,
            'consistency': consistency,
            'delta': delta,
            **outcome,
          }
        )
        console.info(
          f'{task} {measure} {consistency} delta {delta}: '
          f'threshold {threshold}, layers '
          f'{outcome["avg_layers"]:.2f}, x{outcome["speedup"]:.2f}'
        )
  return rows


def validity_rows(setup, tasks: Sequence[str], splits: int = 50) -> list[dict]:
  """The 80/20 split protocol on the pooled validation data (softmax)."""
  calibration = setup.calibration(tasks, 'softmax')
  rows = []
  for consistency in ('textual', 'risk'):
    table = calibration.loss_table(consistency, findings.GRID)
    for delta in SWEEP_DELTAS:
      result = split_protocol.run_splits(
        *table,
        findings.GRID,
        delta=delta,
        epsilon=setup.epsilon,
        splits=splits,
        seed=0,
        num_layers=setup.model.config.num_decoder_layers,
        speedups={},
      )
      rows.append({'consistency': consistency, **result})
  return rows


def decay_comparison(setup, tasks: Sequence[str]) -> list[dict]:
  """Constant vs decaying (tau 4) threshold per task (softmax, textual
  delta 0.25), longest outputs first: the paper's case for the decay."""
  lengths = {
    t: float(np.mean([len(r) for r in setup.full(t).exit_layers]))
    for t in tasks
  }
  out = []
  for task in sorted(tasks, key=lambda t: -lengths[t]):
    entry = {'task': task, 'mean_output_tokens': lengths[task]}
    for name, tau in (('constant', None), ('decaying_tau4', 4.0)):
      threshold = findings.certify_threshold(
        setup, task, 'softmax', 'textual', 0.25, tau
      )
      outcome = findings.test_outcome(
        setup, task, 'softmax', 'textual', threshold, tau
      )
      outcome.pop('exit_layers')
      entry[name] = outcome
    out.append(entry)
  return out


def _headline_row(table: Sequence[dict], task: str) -> dict:
  """The softmax, textual delta 0.25 row of a task (the paper's headline)."""
  return next(
    r
    for r in table
    if r['task'] == task
    and r['measure'] == 'softmax'
    and r['consistency'] == 'textual'
    and r['delta'] == 0.25
  )


def analyses(setup, tasks: Sequence[str], table: Sequence[dict]) -> dict:
  """Oracle, propagation ablation and quality-vs-layers curves per task."""
  out = {'oracle': {}, 'ablation': {}, 'curves': []}
  for task in tasks:
    oracle = findings.oracle(setup, task)
    out['oracle'][task] = {
      k: v for k, v in oracle.items() if k != 'exit_layers'
    }
    out['oracle'][task]['exit_layers_histogram'] = engine.exit_histogram(
      oracle['exit_layers'], setup.model.config.num_decoder_layers
    )
    out['oracle'][task]['mean_output_tokens'] = float(
      np.mean([len(row) for row in oracle['exit_layers']])
    )
    threshold = _headline_row(table, task)['threshold']
    calibrated = setup.early(task, 'softmax', threshold).exit_layers
    out['ablation'][task] = {
      'oracle_exits': findings.propagation_ablation(
        setup, task, oracle['exit_layers']
      ),
      'calibrated_exits': findings.propagation_ablation(
        setup, task, calibrated
      ),
    }
    metric = oracle['metric']
    out['curves'].append(
      {
        'task': task,
        'kind': 'static',
        'metric': metric,
        'points': findings.truncated_curve(setup, task),
      }
    )
    for measure in MEASURES:
      out['curves'].append(
        {
          'task': task,
          'kind': measure,
          'metric': metric,
          'points': findings.early_exit_curve(
            setup, task, measure, CURVE_THRESHOLDS
          ),
        }
      )
    console.info(f'{task}: oracle {oracle["avg_layers"]:.2f} layers')
  return out


def exit_maps(
  setup, tasks: Sequence[str], table: Sequence[dict], figures_dir: str
) -> dict:
  """HTML + PNG exit maps of the first test examples (softmax, textual
  delta 0.25)."""
  paths = {}
  for task in tasks:
    threshold = _headline_row(table, task)['threshold']
    examples = setup.examples(task, 'test')
    records = engine.example_records(
      examples, setup.early(task, 'softmax', threshold)
    )
    shown = thresholds.EXITS_OFF if threshold is None else threshold
    title = (
      f'{task}: exit layer per token (softmax, textual delta 0.25, '
      f'threshold {shown:g})'
    )
    paths[task] = plots.write_exit_map(
      records[:EXIT_MAP_EXAMPLES],
      setup.model.config.num_decoder_layers,
      title,
      os.path.join(figures_dir, f'exit_map_{task}.html'),
      os.path.join(figures_dir, f'exit_map_{task}.png'),
    )
  return paths


def figures(results: dict, figures_dir: str, num_layers: int) -> dict:
  """Writes the PNG plots; returns their paths by name."""
  table = results['table']
  histogram = {
    r['task']: r['exit_layers']
    for r in table
    if r['measure'] == 'softmax'
    and r['consistency'] == 'textual'
    and r['delta'] == 0.25
  }
  path = lambda name: os.path.join(figures_dir, name)
  return {
    'layers_speedup': plots.layers_and_speedup_vs_delta(
      results['sweep'], path('layers_speedup_vs_delta.png')
    ),
    'risk': plots.risk_vs_delta(results['validity'], path('risk_vs_delta.png')),
    'quality': plots.quality_vs_layers(
      results['analyses']['curves'], path('quality_vs_layers.png')
    ),
    'histogram': plots.exit_histogram(
      histogram, num_layers, path('exit_histogram.png')
    ),
  }


def needs(model_dir: str) -> list[preflight.Need]:
  """The trained model and its exit classifier (the classifier measure)."""
  return [preflight.model_dir(model_dir), preflight.classifier(model_dir)]


def measure(
  model_dir: str,
  output: str,
  tasks: Sequence[str],
  *,
  cal_examples: int,
  test_examples: int,
  timing_examples: int,
) -> dict:
  """All measurements, figures and the document."""
  start = time.perf_counter()
  preflight.refuse_unmet('the reproduction report', needs(model_dir))
  model = loaded_lib.load(model_dir)
  setup = findings.Setup(
    model,
    lambda task, split, n: pipeline.task_examples(task, split, num_examples=n),
    calibrate_job.cache_dir(model_dir),
    cal_examples=cal_examples,
    test_examples=test_examples,
    timing_examples=timing_examples,
  )
  results = {
    'model_dir': model_dir,
    'checkpoint_step': model.step,
    'tasks': list(tasks),
    'settings': {
      'cal_examples': cal_examples,
      'test_examples': test_examples,
      'timing_examples': timing_examples,
      'epsilon': setup.epsilon,
      'timing_repeats': setup.repeats,
    },
  }
  results['table'] = calibrated_rows(setup, tasks, TABLE_SETTINGS)
  results['sweep'] = calibrated_rows(
    setup, tasks, [('textual', d) for d in SWEEP_DELTAS]
  )
  results['validity'] = validity_rows(setup, tasks)
  results['decay'] = decay_comparison(setup, tasks)
  results['analyses'] = analyses(setup, tasks, results['table'])
  docs = os.path.dirname(os.path.abspath(output))
  figures_dir = os.path.join(docs, 'figures')
  results['figures'] = figures(
    results, figures_dir, model.config.num_decoder_layers
  )
  results['exit_maps'] = exit_maps(setup, tasks, results['table'], figures_dir)
  results['seconds'] = round(time.perf_counter() - start, 1)
  for rows in (results['table'], results['sweep']):
    for row in rows:
      row['exit_layers_histogram'] = engine.exit_histogram(
        [row.pop('exit_layers')], model.config.num_decoder_layers
      )
  results = _relative_paths(results, docs)
  files.atomic_write_json(os.path.join(docs, 'reproduction.json'), results)
  files.atomic_write_text(output, report_markdown.render(results, docs))
  console.info(f'wrote {output} in {results["seconds"]:.0f} s')
  return results


def _relative_paths(results, root: str):
  """Generated files name the figures relative to the document's folder,
  never by this machine's absolute paths."""
  if isinstance(results, dict):
    return {k: _relative_paths(v, root) for k, v in results.items()}
  if isinstance(results, (list, tuple)):
    return [_relative_paths(v, root) for v in results]
  if (
    isinstance(results, str)
    and os.path.isabs(results)
    and (results.startswith(root + os.sep))
  ):
    return os.path.relpath(results, root)
  return results


def render_saved(output: str) -> dict:
  """Rewrites `output` from the reproduction.json beside it, measuring
  nothing (after a change to the document's wording or layout)."""
  docs = os.path.dirname(os.path.abspath(output))
  results = files.read_json(os.path.join(docs, 'reproduction.json'))
  files.atomic_write_text(output, report_markdown.render(results, docs))
  console.info(f'wrote {output} from {docs}/reproduction.json')
  return results


@gin.configurable(module='calm_jax')
def report(
  *,
  model_dir: str = gin.REQUIRED,
  output: str = 'docs/REPRODUCTION.md',
  tasks: Sequence[str] = DEFAULT_TASKS,
  cal_examples: int = 300,
  test_examples: int = 200,
  timing_examples: int = 32,
  render_only: bool = False,
  check_only: bool = False,
) -> Optional[dict]:
  """Measures the paper's findings on `model_dir` and writes `output`
  (render_only: rewrites `output` from the saved numbers of the last run;
  check_only: checks the settings, runs nothing)."""
  arguments.check(
    cal_examples=cal_examples,
    test_examples=test_examples,
    timing_examples=timing_examples,
  )
  if check_only:
    return None
  if render_only:
    return render_saved(output)
  return measure(
    model_dir,
    output,
    list(tasks),
    cal_examples=cal_examples,
    test_examples=test_examples,
    timing_examples=timing_examples,
  )


def run(check_only: bool = False) -> None:
  report(check_only=check_only)
