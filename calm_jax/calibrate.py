"""Calibration entry point: the fastest threshold certified by Learn then Test.

  python -m calm_jax.calibrate --gin_file=gin/runs/calibrate.gin \
    --gin.CHECKPOINT_PATH="'runs/demo/model'" \
    --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" --gin.DELTA=0.25 \
    --gin.EPSILON=0.05 --gin.CONSISTENCY="'textual'" --gin.CONFIDENCE="'softmax'"

Decodes the calibration split at full depth, then at each threshold of a
descending grid, stopping where fixed-sequence testing stops. Decodes are
cached in MODEL_DIR/calibration/cache keyed by (checkpoint step, activation
dtype, measure, tau, threshold, split, examples), so another delta or epsilon reuses them.
Writes MODEL_DIR/calibration/<name>.json, which `calm_jax.decode` and
`calm_jax.load(...).generate` use when no threshold is given.
"""
import json
import os
import time
from typing import Optional, Sequence

import gin
import numpy as np

from calm_jax import api
from calm_jax import calibration
from calm_jax import checkpoints
from calm_jax import confidence as confidence_lib
from calm_jax import gin_utils
from calm_jax import multihost
from calm_jax import partitioning

FULL = 'full'


class DecodeCache:
  """Decoded predictions per task and threshold, as JSON files."""

  def __init__(self, lm: api.CalmLM, *, measure: str, tau, split: str,
               num_examples: Optional[int], batch_size: int, min_exit: int):
    # lm.mesh: decodes run over it; with several processes all of them
    # decode, and the primary one reads and writes the files.
    self.lm, self.measure, self.tau, self.split = lm, measure, tau, split
    self.num_examples, self.batch_size = num_examples, batch_size
    self.min_exit = min_exit
    self.root = os.path.join(lm.model_dir, api.CALIBRATION_SUBDIR, 'cache')

  def _path(self, task: str, threshold) -> str:
    measure = 'full' if threshold == FULL else self.measure
    key = (f'step{self.lm.step}_{self.lm.config.dtype}_{task}_{self.split}_'
           f'n{self.num_examples}_{measure}_tau{self.tau}_min{self.min_exit}_'
           f'{threshold}')
    return os.path.join(self.root, key + '.json')

  def get(self, task: str, threshold) -> dict:
    """{'predictions', 'targets' (references), 'exit_layers'}, decoded once."""
    path = self._path(task, threshold)
    # Every process must take the same branch: a decode is collective.
    if multihost.agree(os.path.exists(path)):
      return multihost.from_primary(lambda: _read_json(path))
    from calm_jax import evaluation  # pylint: disable=g-import-not-at-top
    records, seconds = self._decode(task, threshold)
    entry = {'predictions': [r['prediction'] for r in records],
             'targets': evaluation.references(records),
             'exit_layers': [r['exit_layers'] for r in records],
             'seconds_after_compile': seconds}
    if multihost.is_primary():
      checkpoints.atomic_write_json(path, entry)
    return entry

  def _decode(self, task: str, threshold) -> tuple[list[dict], float]:
    from calm_jax import evaluation  # pylint: disable=g-import-not-at-top
    measure = 'softmax' if threshold == FULL else self.measure
    exit_config = self.lm.exit_config(measure, min_exit=self.min_exit,
                                      tau=self.tau)
    return evaluation.decode_task(
        self.lm.model, self.lm.params, task, split=self.split,
        num_examples=self.num_examples, batch_size=self.batch_size,
        exit_config=exit_config,
        threshold=api.FULL_DEPTH if threshold == FULL else threshold,
        seed=0, classifier=None if threshold == FULL else
        self.lm.classifier_for(measure), mesh=self.lm.mesh)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def losses_at_threshold(cache: DecodeCache, task_names: Sequence[str],
                        consistency: str, threshold: float
                        ) -> tuple[np.ndarray, float]:
  """Per-example losses over all tasks, and the average decoder layers."""
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  losses, layers = [], []
  for task in task_names:
    full, early = cache.get(task, FULL), cache.get(task, threshold)
    losses.append(calibration.consistency_losses(
        consistency, data.per_example_metric(task), early['predictions'],
        full['predictions'], references=full['targets']))
    layers += [l for row in early['exit_layers'] for l in row]
  return np.concatenate(losses), float(np.mean(layers))


def _validate(delta: float, epsilon: float, consistency: str,
              confidence: str) -> None:
  for name, value in (('delta', delta), ('epsilon', epsilon)):
    if not 0 < value < 1:
      raise ValueError(f'{name} must be in (0, 1), got {value}')
  if consistency not in calibration.CONSISTENCIES:
    raise ValueError(f'unknown consistency {consistency!r}; valid: '
                     f'{", ".join(calibration.CONSISTENCIES)}')
  confidence_lib.get(confidence)


def record_name(confidence, consistency, delta, epsilon, task) -> str:
  return f'{task}_{confidence}_{consistency}_delta{delta:g}_eps{epsilon:g}'


@gin.configurable(module='calm_jax')
def calibrate(*, checkpoint_path: str = gin.REQUIRED,
              mixture_or_task_name: str = gin.REQUIRED,
              delta=gin.REQUIRED, epsilon: float = 0.05,
              consistency: str = 'textual', confidence: str = 'softmax',
              split: str = 'validation', num_examples: Optional[int] = None,
              batch_size: int = 32, tau: Optional[float] = None,
              min_exit: int = 1, grid_step: float = 0.05,
              mesh_shape: Optional[Sequence[int]] = None,
              dtype: Optional[str] = None):
  """Certifies a threshold per delta and writes the calibration records.

  `delta` is one tolerance or a list of them (a paper-style sweep); the
  decodes are shared, so each further delta costs only the thresholds it
  reaches beyond the others. Returns the record, or the list of records.
  Decodes run on a (data, model) mesh of `mesh_shape` (default: every
  device on 'data'), over every process; the primary one writes. `dtype`
  overrides the model's activation dtype; the record says which was used.
  """
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  deltas = list(delta) if isinstance(delta, (list, tuple)) else [delta]
  for value in deltas:
    _validate(value, epsilon, consistency, confidence)
  lm = api.CalmLM(checkpoint_path, mesh=partitioning.make_mesh(mesh_shape),
                  dtype=dtype)
  lm.classifier_for(confidence)  # fails early without a classifier
  task_names = list(data.task_rates(mixture_or_task_name))
  cache = DecodeCache(lm, measure=confidence, tau=tau, split=split,
                      num_examples=num_examples, batch_size=batch_size,
                      min_exit=min_exit)
  records = []
  for value in deltas:
    result = calibration.fixed_sequence_test(
        calibration.descending_grid(1.0, 0.0, grid_step),
        lambda t: losses_at_threshold(cache, task_names, consistency, t),
        delta=value, epsilon=epsilon)
    name = record_name(confidence, consistency, value, epsilon,
                       mixture_or_task_name)
    record = {
        'name': name, 'created': time.time(), 'threshold': result.threshold,
        'certified': result.threshold is not None, 'message': result.message,
        'delta': value, 'epsilon': epsilon, 'consistency': consistency,
        'confidence': confidence, 'tau': tau, 'min_exit': min_exit,
        'n': result.n, 'split': split, 'task': mixture_or_task_name,
        'checkpoint_step': lm.step, 'dtype': lm.config.dtype,
        'table': [row.as_dict() for row in result.table]}
    path = os.path.join(checkpoint_path, api.CALIBRATION_SUBDIR,
                        name + '.json')
    if multihost.is_primary():
      checkpoints.atomic_write_json(path, record)
      print(f'delta {value:g}: {result.message}')
      print(f'wrote {path}')
    records.append(record)
  return records if isinstance(delta, (list, tuple)) else records[0]


def main() -> None:
  from calm_jax import train  # pylint: disable=g-import-not-at-top
  gin_utils.run(calibrate, user_errors=train.user_errors())


if __name__ == '__main__':
  main()
