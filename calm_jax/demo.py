"""The demo job: train the demo model on the embedded mixture, then evaluate.

  python -m calm_jax.demo --gin_file=gin/experiments/demo.gin

Trains (or resumes, or reuses a finished) model in MODEL_DIR, evaluates the
full model and every exit layer on the validation split of each task, and
writes REPORT_PATH (JSON) with the full-depth task metrics and the per-layer
token accuracies.
"""
import dataclasses
import time

import gin
import numpy as np

from calm_jax import checkpoints
from calm_jax import decoding
from calm_jax import gin_utils
from calm_jax import models
from calm_jax import train as train_lib


@gin.configurable(module='calm_jax')
def demo(*, model_dir: str = gin.REQUIRED,
         mixture_or_task_name: str = gin.REQUIRED,
         report_path: str = gin.REQUIRED, eval_split: str = 'validation',
         eval_examples: int = 200, eval_batch_size: int = 50,
         early_exit_confidence: str = 'softmax',
         early_exit_threshold: float = 0.9) -> dict:
  """Trains (resumable) and writes the evaluation report; returns it."""
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  from calm_jax import evaluation  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  train_lib.train()
  train_seconds = time.perf_counter() - start
  config, _ = checkpoints.read_model_config(model_dir)
  params, step = checkpoints.load_params(model_dir, config)
  model = models.CalmModel(config)
  report = {'tasks': {}, 'per_layer_accuracy_by_task': {},
            'train_steps': step, 'model': dataclasses.asdict(config),
            'eval_split': eval_split, 'eval_examples_per_task': eval_examples}
  accuracies = []
  for task in data.task_rates(mixture_or_task_name):
    batches = list(evaluation.eval_batches(
        task, eval_split, batch_size=eval_batch_size,
        num_examples=eval_examples))
    accuracy = evaluation.per_layer_accuracy(model, params, batches)
    predictions = evaluation.full_depth_predictions(model, params, task,
                                                    batches)
    targets = [t for b in batches for t in b.targets]
    scores = evaluation.task_metric_fn(task)(targets, predictions)
    headline = data.headline_metric(task, scores)
    report['tasks'][task] = {
        'metric': headline, 'value': scores[headline], 'scores': scores,
        'num_examples': len(targets),
        'samples': [{'inputs': i, 'targets': t, 'prediction': p}
                    for i, t, p in zip(batches[0].inputs, targets,
                                       predictions[:3])]}
    report['per_layer_accuracy_by_task'][task] = accuracy.round(4).tolist()
    report['tasks'][task]['early_exit'] = _early_exit_summary(
        model, params, task, eval_split, eval_examples, eval_batch_size,
        early_exit_confidence, early_exit_threshold)
    accuracies.append(accuracy)
    print(f'{task}: {headline} = {scores[headline]:.2f}; per-layer accuracy '
          f'{" ".join(f"{a:.3f}" for a in accuracy)}')
  report['per_layer_accuracy'] = np.mean(accuracies, 0).round(4).tolist()
  report['seconds'] = {'train_and_restore': round(train_seconds, 1),
                       'total': round(time.perf_counter() - start, 1)}
  checkpoints.atomic_write_json(report_path, report)
  print(f'wrote {report_path}')
  return report


def _early_exit_summary(model, params, task, split, num_examples, batch_size,
                        confidence, threshold) -> dict:
  """Task metric and average layers of an (uncalibrated) early-exit decode."""
  from calm_jax import decode  # pylint: disable=g-import-not-at-top
  exit_config = decoding.ExitConfig.create(
      model.config.num_decoder_layers, confidence=confidence,
      first_exit=model.config.first_exit,
      exit_interval=model.config.exit_interval)
  records, seconds = decode.decode_task(
      model, params, task, split=split, num_examples=num_examples,
      batch_size=batch_size, exit_config=exit_config, threshold=threshold,
      seed=0)
  summary = decode.summarize(task, records, seconds, 1.0)
  layers = np.concatenate([r['exit_layers'] for r in records])
  print(f'{task}: early exit ({confidence} >= {threshold}): '
        f'{summary["metric"]} = {summary["value"]:.2f}, average layers '
        f'{summary["avg_decoder_layers"]:.2f}')
  return {'confidence': confidence, 'threshold': threshold,
          'value': summary['value'],
          'avg_decoder_layers': round(summary['avg_decoder_layers'], 3),
          'exit_layer_histogram': np.bincount(
              layers, minlength=model.config.num_decoder_layers + 1)[1:]
                                  .tolist()}


def main() -> None:
  gin_utils.run(demo, user_errors=train_lib.user_errors())


if __name__ == '__main__':
  main()
