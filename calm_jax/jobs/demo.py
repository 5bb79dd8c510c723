"""The demo job: train, evaluate, calibrate and early-exit decode.

1. Trains (or resumes, or reuses a finished) demo model in MODEL_DIR.
2. Evaluates the full model and every exit layer on the validation split of
   each task (task metric of greedy full-depth decoding, per-layer token
   accuracy).
3. Per task, certifies a threshold with Learn then Test on the validation
   split (softmax, textual consistency, delta 0.25, epsilon 0.05 by
   default), then decodes the test split at full depth and with early exit
   at that threshold, times both alternately, and reports both metrics, the
   test risk, the average decoder layers (and the share of tokens exiting
   at each layer), the oracle's layers and the wall-clock speed-up.
Writes REPORT_PATH (JSON). Every decode goes through the engine's cache in
MODEL_DIR/calibration/cache, so a rerun re-measures only the timings.
"""

import dataclasses
import time
from typing import Optional

from etils import epy
import gin
import numpy as np

from calm_jax import arguments
from calm_jax import console
from calm_jax.data import examples as examples_lib
from calm_jax.decoding import thresholds
from calm_jax.evaluation import certify
from calm_jax.evaluation import engine
from calm_jax.inference import modes
from calm_jax.jobs import calibrate as calibrate_job
from calm_jax.jobs import train as train_job
from calm_jax.storage import files

# The SeqIO pipeline (and with it TensorFlow) loads when a job first
# reads data, not when the command line registers every job.
with epy.lazy_imports():
  from calm_jax.data import pipeline

READS = ('calm_jax.demo', *train_job.READS)


def full_depth_eval(
  evaluator: engine.Evaluator, examples: examples_lib.ExampleSet
) -> tuple[dict, np.ndarray]:
  """Task metric of greedy full-depth decoding, and per-layer accuracy."""
  full = evaluator.decode(examples, modes.FullDepth())
  score = evaluator.score(examples, full.predictions)
  samples = [
    {'inputs': e.inputs, 'targets': r, 'prediction': p}
    for e, r, p in zip(
      examples.examples, examples.references, full.predictions[:3]
    )
  ]
  return (
    {
      'metric': score.metric,
      'value': score.value,
      'scores': score.scores,
      'num_examples': len(examples),
      'samples': samples,
    },
    evaluator.layer_accuracy(examples),
  )


def early_exit_test(
  evaluator: engine.Evaluator,
  examples: examples_lib.ExampleSet,
  mode: modes.EarlyExit,
  *,
  repeats: int,
) -> dict:
  """Full-depth vs early-exit decode of the test examples: quality, test
  risk, layers (and the share of tokens exiting at each), the oracle's
  layers, and the speed-up of whole passes over them, timed in turns (the
  batch job a demo user runs)."""
  full = evaluator.decode(examples, modes.FullDepth())
  early = evaluator.decode(examples, mode)
  speed = evaluator.speedup(
    examples,
    mode,
    batch_size=evaluator.batch_size,
    repeats=repeats,
    alternate='pass',
  )
  losses = evaluator.losses(examples, 'textual', early, full)
  oracle = evaluator.decode(examples, modes.FullDepth(oracle=True))
  num_layers = evaluator.model.config.num_decoder_layers
  return {
    'full_depth_metric': evaluator.score(examples, full.predictions).value,
    'early_exit_metric': evaluator.score(examples, early.predictions).value,
    'test_textual_risk': float(losses.mean()),
    'avg_decoder_layers': early.avg_layers,
    'exit_layer_shares': early.exit_shares(num_layers),
    'oracle_avg_decoder_layers': oracle.avg_layers,
    'oracle_exit_layer_shares': oracle.exit_shares(num_layers),
    'mean_output_tokens': full.tokens / len(examples),
    'speedup_vs_full_depth': speed.ratio,
    'speedup_range': [speed.low, speed.high],
    'median_seconds': speed.median_seconds,
    'num_examples': len(examples),
  }


@gin.configurable(module='calm_jax')
def demo(
  *,
  model_dir: str = gin.REQUIRED,
  mixture_or_task_name: str = gin.REQUIRED,
  report_path: str = gin.REQUIRED,
  eval_examples: int = 200,
  eval_batch_size: int = 50,
  delta: float = 0.25,
  epsilon: float = 0.05,
  consistency: str = 'textual',
  confidence: str = 'softmax',
  timing_repeats: int = 3,
  check_only: bool = False,
) -> Optional[dict]:
  """Runs the whole main job and writes the report; returns it. Every
  setting (the training run's too) is checked first; `check_only` stops
  there."""
  arguments.check(
    eval_examples=eval_examples,
    eval_batch_size=eval_batch_size,
    delta=delta,
    epsilon=epsilon,
    consistency=consistency,
    confidence=confidence,
    timing_repeats=timing_repeats,
  )
  train_job.train(check_only=True)
  if check_only:
    return None
  start = time.perf_counter()
  console.info(
    f'[1/3] training the demo model in {model_dir} (resumes; a '
    'finished model is reused)'
  )
  train_job.train()
  train_seconds = time.perf_counter() - start
  evaluator = engine.Evaluator.load(
    model_dir,
    batch_size=eval_batch_size,
    cache_dir=calibrate_job.cache_dir(model_dir),
  )
  model = evaluator.model
  exit_config = model.exit_config(confidence)
  report = {
    'tasks': {},
    'per_layer_accuracy_by_task': {},
    'train_steps': model.step,
    'model': dataclasses.asdict(model.config),
    'eval_examples_per_task': eval_examples,
    'calibration': {
      'delta': delta,
      'epsilon': epsilon,
      'consistency': consistency,
      'confidence': confidence,
    },
  }
  for task in pipeline.task_rates(mixture_or_task_name):
    console.info(
      f'[2/3] {task}: full-depth quality and per-layer accuracy '
      f'on {eval_examples} validation examples'
    )
    validation = pipeline.task_examples(
      task, 'validation', num_examples=eval_examples
    )
    summary, accuracy = full_depth_eval(evaluator, validation)
    console.info(
      f'[3/3] {task}: certify a {confidence} threshold (delta '
      f'{delta:g}, epsilon {epsilon:g}), then early exit on test'
    )
    record = calibrate_job.certify_and_write(
      certify.Calibration(evaluator, (validation,), exit_config),
      task=task,
      consistency=consistency,
      delta=delta,
      epsilon=epsilon,
      grid_step=0.05,
      split='validation',
      min_exit=1,
    )
    threshold = record.threshold if record.certified else thresholds.EXITS_OFF
    summary['early_exit'] = {
      'certified_threshold': record.threshold,
      'calibration': record.message,
      **early_exit_test(
        evaluator,
        pipeline.task_examples(task, 'test', num_examples=eval_examples),
        modes.EarlyExit(exit_config, threshold),
        repeats=timing_repeats,
      ),
    }
    report['tasks'][task] = summary
    report['per_layer_accuracy_by_task'][task] = accuracy.round(4).tolist()
    _print_task(task, summary, accuracy)
  report['per_layer_accuracy'] = (
    np.mean(list(report['per_layer_accuracy_by_task'].values()), 0)
    .round(4)
    .tolist()
  )
  report['seconds'] = {
    'train_or_restore': round(train_seconds, 1),
    'total': round(time.perf_counter() - start, 1),
  }
  files.atomic_write_json(report_path, report)
  console.info(f'wrote {report_path}')
  return report


def _print_task(task: str, summary: dict, accuracy: np.ndarray) -> None:
  early = summary['early_exit']
  console.result(
    f'{task}: full depth {summary["metric"]} = {summary["value"]:.2f}; '
    f'per-layer accuracy {" ".join(f"{a:.3f}" for a in accuracy)}\n'
    f'  {early["calibration"]}; test: {summary["metric"]} '
    f'{early["full_depth_metric"]:.2f} -> {early["early_exit_metric"]:.2f}'
    f', risk {early["test_textual_risk"]:.3f}, layers '
    f'{early["avg_decoder_layers"]:.2f} (per layer '
    f'{_shares(early["exit_layer_shares"])}), speed-up '
    f'x{early["speedup_vs_full_depth"]:.2f}\n'
    f'  oracle: {early["oracle_avg_decoder_layers"]:.2f} layers (per '
    f'layer {_shares(early["oracle_exit_layer_shares"])})'
  )


def _shares(shares) -> str:
  return ' '.join(f'{s:.2f}' for s in shares)


def run(check_only: bool = False) -> None:
  demo(check_only=check_only)
