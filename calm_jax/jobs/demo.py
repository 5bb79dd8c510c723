"""The demo job: train, evaluate, calibrate and early-exit decode.

  python -m calm_jax.demo --gin_file=gin/experiments/demo.gin

1. Trains (or resumes, or reuses a finished) demo model in MODEL_DIR.
2. Evaluates the full model and every exit layer on the validation split of
   each task (task metric of greedy full-depth decoding, per-layer token
   accuracy).
3. Per task, certifies a softmax threshold with Learn then Test on the
   validation split (textual consistency, delta 0.25, epsilon 0.05 by
   default), then decodes the test split at full depth and with early exit
   at that threshold, alternating timed runs, and reports both metrics, the
   test risk, the average decoder layers and the wall-clock speed-up.
Writes REPORT_PATH (JSON).
"""
import dataclasses
import statistics
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import api
from calm_jax.jobs import calibrate
from calm_jax.calibration import ltt
from calm_jax.storage import checkpoints
from calm_jax.decoding import loops
from calm_jax import cli
from calm_jax.evaluation import timing
from calm_jax.jobs import train as train_lib


def full_depth_eval(model, params, task: str, split: str, num_examples: int,
                    batch_size: int) -> tuple[dict, np.ndarray]:
  """Task metric of greedy full-depth decoding, and per-layer accuracy."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
  batches = list(engine.eval_batches(task, split, batch_size=batch_size,
                                         num_examples=num_examples))
  accuracy = engine.per_layer_accuracy(model, params, batches)
  predictions = engine.full_depth_predictions(model, params, task,
                                                  batches)
  targets = [t for b in batches for t in b.references]
  scores = engine.task_metric_fn(task)(targets, predictions)
  headline = pipeline.headline_metric(task, scores)
  return {'metric': headline, 'value': scores[headline], 'scores': scores,
          'num_examples': len(targets),
          'samples': [{'inputs': i, 'targets': t, 'prediction': p}
                      for i, t, p in zip(batches[0].inputs, targets,
                                         predictions[:3])]}, accuracy


def _timed_alternating(fns: dict, repeats: int) -> dict:
  """Median seconds of each (compiled) callable, run in alternation."""
  times = timing.alternating_seconds(
      {name: (lambda _, fn=fn: fn()) for name, fn in fns.items()}, [None],
      repeats)
  return {name: statistics.median(t) for name, t in times.items()}


def early_exit_test(lm: api.CalmLM, task: str, threshold: float, *,
                    confidence: str, num_examples: int, batch_size: int,
                    repeats: int) -> dict:
  """Full-depth vs early-exit decode of the test split, same inputs."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
  batches = list(engine.eval_batches(task, 'test', batch_size=batch_size,
                                         num_examples=num_examples))
  length = pipeline.feature_lengths(task)['targets']
  cfg = lm.config
  exit_config = loops.ExitConfig.create(
      cfg.num_decoder_layers, confidence=confidence,
      first_exit=cfg.first_exit, exit_interval=cfg.exit_interval)
  static = jax.jit(lambda p, e: lm.model.decode_static(p, e, length))
  early = jax.jit(lambda p, e: lm.model.decode_early_exit(
      p, e, length, exit_config=exit_config.for_threshold(threshold),
      threshold=threshold,
      classifier=lm.classifier_for(confidence)))
  inputs = [jnp.asarray(b.encoder_tokens) for b in batches]
  run = lambda fn: lambda: [fn(lm.params, e) for e in inputs]
  outputs = {'full': jax.device_get(run(static)()),
             'early': jax.device_get(run(early)())}  # also compiles
  seconds = _timed_alternating({'full': run(static), 'early': run(early)},
                               repeats)
  return _compare(task, batches, outputs, seconds)


def _compare(task, batches, outputs, seconds) -> dict:
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
  texts, layers = {}, []
  for name, outs in outputs.items():
    texts[name] = [pipeline.decode_text(task, out.tokens[row])
                   for b, out in zip(batches, outs)
                   for row in range(b.num_real)]
  for b, out in zip(batches, outputs['early']):
    mask = np.asarray(out.exit_layers[:b.num_real]) > 0
    layers += np.asarray(out.exit_layers[:b.num_real])[mask].tolist()
  targets = [t for b in batches for t in b.references]
  metric_fn = engine.task_metric_fn(task)
  headline = pipeline.headline_metric(task, metric_fn(targets, texts['full']))
  losses = ltt.consistency_losses(
      'textual', pipeline.per_example_metric(task), texts['early'], texts['full'])
  return {'full_depth_metric': metric_fn(targets, texts['full'])[headline],
          'early_exit_metric': metric_fn(targets, texts['early'])[headline],
          'test_textual_risk': float(losses.mean()),
          'avg_decoder_layers': float(np.mean(layers)),
          'speedup_vs_full_depth': seconds['full'] / seconds['early'],
          'median_seconds': seconds, 'num_examples': len(targets)}


@gin.configurable(module='calm_jax')
def demo(*, model_dir: str = gin.REQUIRED,
         mixture_or_task_name: str = gin.REQUIRED,
         report_path: str = gin.REQUIRED, eval_examples: int = 200,
         eval_batch_size: int = 50, delta: float = 0.25,
         epsilon: float = 0.05, consistency: str = 'textual',
         confidence: str = 'softmax', timing_repeats: int = 3) -> dict:
  """Runs the whole main job and writes the report; returns it."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  train_lib.train()
  train_seconds = time.perf_counter() - start
  lm = api.CalmLM(model_dir)
  report = {'tasks': {}, 'per_layer_accuracy_by_task': {},
            'train_steps': lm.step, 'model': dataclasses.asdict(lm.config),
            'eval_examples_per_task': eval_examples,
            'calibration': {'delta': delta, 'epsilon': epsilon,
                            'consistency': consistency,
                            'confidence': confidence}}
  for task in pipeline.task_rates(mixture_or_task_name):
    summary, accuracy = full_depth_eval(lm.model, lm.params, task,
                                        'validation', eval_examples,
                                        eval_batch_size)
    record = calibrate.calibrate(
        checkpoint_path=model_dir, mixture_or_task_name=task, delta=delta,
        epsilon=epsilon, consistency=consistency, confidence=confidence,
        num_examples=eval_examples, batch_size=eval_batch_size)
    threshold = (record['threshold'] if record['threshold'] is not None
                 else api.FULL_DEPTH)
    summary['early_exit'] = {
        'certified_threshold': record['threshold'],
        'calibration': record['message'],
        **early_exit_test(lm, task, threshold, confidence=confidence,
                          num_examples=eval_examples,
                          batch_size=eval_batch_size,
                          repeats=timing_repeats)}
    report['tasks'][task] = summary
    report['per_layer_accuracy_by_task'][task] = accuracy.round(4).tolist()
    _print_task(task, summary, accuracy)
  report['per_layer_accuracy'] = np.mean(
      list(report['per_layer_accuracy_by_task'].values()), 0).round(4).tolist()
  report['seconds'] = {'train_or_restore': round(train_seconds, 1),
                       'total': round(time.perf_counter() - start, 1)}
  checkpoints.atomic_write_json(report_path, report)
  print(f'wrote {report_path}')
  return report


def _print_task(task: str, summary: dict, accuracy: np.ndarray) -> None:
  early = summary['early_exit']
  print(f'{task}: full depth {summary["metric"]} = {summary["value"]:.2f}; '
        f'per-layer accuracy {" ".join(f"{a:.3f}" for a in accuracy)}\n'
        f'  {early["calibration"]}; test: {summary["metric"]} '
        f'{early["full_depth_metric"]:.2f} -> {early["early_exit_metric"]:.2f}'
        f', risk {early["test_textual_risk"]:.3f}, layers '
        f'{early["avg_decoder_layers"]:.2f}, speed-up '
        f'x{early["speedup_vs_full_depth"]:.2f}')


def main() -> None:
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cli.run(demo, user_errors=(*train_lib.user_errors(),
                                   checkpoints.CheckpointError,
                                   pipeline.DataError))


if __name__ == '__main__':
  main()
