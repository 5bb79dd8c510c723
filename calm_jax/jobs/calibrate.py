"""Calibration entry point: the fastest threshold certified by Learn then Test.

  python -m calm_jax.calibrate --gin_file=gin/runs/calibrate.gin \
    --gin.CHECKPOINT_PATH="'runs/demo/model'" \
    --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" --gin.DELTA=0.25 \
    --gin.EPSILON=0.05 --gin.CONSISTENCY="'textual'" --gin.CONFIDENCE="'softmax'"

Decodes the calibration split at full depth, then at each threshold of a
descending grid, stopping where fixed-sequence testing stops. Decodes are
cached in MODEL_DIR/calibration/cache under the fingerprint of everything
that determines them (parameters and classifier by content hash, config and
dtype, vocabulary, task, split, examples, feature lengths, decode settings,
threshold), so another delta or epsilon reuses them and any other change
decodes afresh. Writes MODEL_DIR/calibration/<name>.json with the same
fingerprint, which `calm_jax.decode` and `calm_jax.load(...).generate` use
for that task when no threshold is given, and refuse once the model dir
has changed.
"""
import os
import time
from typing import Optional, Sequence

import gin
import numpy as np

from calm_jax import api
from calm_jax import arguments
from calm_jax.calibration import ltt
from calm_jax.decoding import confidence as confidence_lib
from calm_jax.storage import files
from calm_jax import cli
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import provenance

FULL = 'full'


class DecodeCache:
  """Decoded predictions per task and threshold, as JSON files.

  An entry is found only under the fingerprint of everything that
  determines it (see `fingerprint`): another model, classifier, dtype,
  vocabulary, feature length, split, example count or decode setting is a
  miss and decodes afresh. A corrupt entry is reported and decoded again.
  """

  def __init__(self, lm: api.CalmLM, *, measure: str, tau, split: str,
               num_examples: Optional[int], batch_size: int, min_exit: int,
               propagation: str = 'hidden'):
    # lm.mesh: decodes run over it; with several processes all of them
    # decode, and the primary one reads and writes the files.
    self.lm, self.measure, self.split = lm, measure, split
    self.min_exit = min_exit
    self.num_examples, self.batch_size = num_examples, batch_size
    self.exit_config = lm.exit_config(measure, min_exit=min_exit, tau=tau,
                                      propagation=propagation)
    self.root = os.path.join(lm.model_dir, api.CALIBRATION_SUBDIR, 'cache')

  @property
  def tau(self):
    return self.exit_config.tau

  def data_fingerprint(self, task: str) -> dict:
    from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return {'task': task, 'split': self.split,
            'num_examples': self.num_examples,
            'feature_lengths': pipeline.feature_lengths(task)}

  def fingerprint(self, task: str, threshold) -> dict:
    full = threshold == FULL
    return {'model': self.lm.model_fingerprint('full' if full else
                                               self.measure),
            'data': self.data_fingerprint(task),
            'decode': ({'full_depth': True, 'greedy': True} if full else
                       self.exit_config.fingerprint()),
            'threshold': threshold}

  def _path(self, task: str, fingerprint: dict) -> str:
    name = (f'{task}_{self.split}_{fingerprint["threshold"]}_'
            f'{provenance.short_hash(fingerprint)}')
    return os.path.join(self.root, name + '.json')

  def _read(self, path: str, fingerprint: dict) -> Optional[dict]:
    """The entry at `path` if it is whole and has this fingerprint."""
    if not os.path.exists(path):
      return None
    try:
      entry = files.read_json(path, what='decode cache entry',
                              recovery='ignored; decoding again')
    except files.FileError as e:
      print(f'warning: {e}')
      return None
    return entry if entry.get('fingerprint') == fingerprint else None

  def get(self, task: str, threshold) -> dict:
    """{'predictions', 'targets' (references), 'exit_layers'}, decoded once."""
    fingerprint = self.fingerprint(task, threshold)
    path = self._path(task, fingerprint)
    # Every process must take the same branch: a decode is collective.
    entry = multihost.from_primary(lambda: self._read(path, fingerprint))
    if multihost.agree(entry is not None):
      return entry
    from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
    records, seconds = self._decode(task, threshold)
    entry = {'fingerprint': fingerprint,
             'predictions': [r['prediction'] for r in records],
             'targets': engine.references(records),
             'exit_layers': [r['exit_layers'] for r in records],
             'seconds_after_compile': seconds}
    if multihost.is_primary():
      files.atomic_write_json(path, entry)
    return entry

  def _decode(self, task: str, threshold) -> tuple[list[dict], float]:
    from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
    full = threshold == FULL
    exit_config = (self.lm.exit_config('softmax') if full else
                   self.exit_config)
    return engine.decode_task(
        self.lm.model, self.lm.params, task, split=self.split,
        num_examples=self.num_examples, batch_size=self.batch_size,
        exit_config=exit_config,
        threshold=api.FULL_DEPTH if full else threshold, seed=0,
        classifier=None if full else self.lm.classifier_for(self.measure),
        mesh=self.lm.mesh)


def losses_at_threshold(cache: DecodeCache, task_names: Sequence[str],
                        consistency: str, threshold: float
                        ) -> tuple[np.ndarray, float]:
  """Per-example losses over all tasks, and the average decoder layers."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  losses, layers = [], []
  for task in task_names:
    full, early = cache.get(task, FULL), cache.get(task, threshold)
    losses.append(ltt.consistency_losses(
        consistency, pipeline.per_example_metric(task), early['predictions'],
        full['predictions'], references=full['targets']))
    layers += [l for row in early['exit_layers'] for l in row]
  return np.concatenate(losses), float(np.mean(layers))


def _validate(deltas, epsilon, consistency: str, confidence: str,
              grid_step, num_examples, batch_size, min_exit, tau) -> None:
  arguments.calibration(deltas=deltas, epsilon=epsilon, grid_step=grid_step,
                        num_examples=num_examples)
  arguments.integer('batch_size', batch_size, 1)
  arguments.integer('min_exit', min_exit, 1)
  arguments.optional(arguments.real, 'tau', tau, 0.0, open_low=True)
  if consistency not in ltt.CONSISTENCIES:
    raise arguments.InputError(
        f'unknown consistency {consistency!r}; valid: '
        f'{", ".join(ltt.CONSISTENCIES)}')
  confidence_lib.get(confidence)


def record_fingerprint(cache: DecodeCache, task_names: Sequence[str], *,
                       consistency: str, delta: float, epsilon: float,
                       grid_step: float) -> dict:
  """Everything a record's certificate depends on."""
  return {'model': cache.lm.model_fingerprint(cache.measure),
          'data': {t: cache.data_fingerprint(t) for t in task_names},
          'decode': cache.exit_config.fingerprint(),
          'calibration': {'consistency': consistency, 'delta': delta,
                          'epsilon': epsilon, 'grid_step': grid_step}}


def record_name(task: str, fingerprint: dict) -> str:
  """Readable, and distinct for any difference in data, decode or
  calibration settings; the same settings on a retrained model reuse the
  name, so its new record replaces the stale one."""
  settings = {k: v for k, v in fingerprint.items() if k != 'model'}
  cal = fingerprint['calibration']
  return (f'{task}_{fingerprint["decode"]["confidence"]}_'
          f'{cal["consistency"]}_delta{cal["delta"]:g}_eps{cal["epsilon"]:g}'
          f'_{provenance.short_hash(settings, 8)}')


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
  Each record carries the fingerprint of what it certifies
  (`record_fingerprint`). Decodes run on a (data, model) mesh of
  `mesh_shape` (default: every device on 'data'), over every process; the
  primary one writes. `dtype` overrides the model's activation dtype.
  """
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  deltas = list(delta) if isinstance(delta, (list, tuple)) else [delta]
  _validate(deltas, epsilon, consistency, confidence, grid_step, num_examples,
            batch_size, min_exit, tau)
  lm = api.CalmLM(checkpoint_path, mesh=partitioning.make_mesh(mesh_shape),
                  dtype=dtype)
  lm.classifier_for(confidence)  # fails early without a classifier
  task_names = list(pipeline.task_rates(mixture_or_task_name))
  cache = DecodeCache(lm, measure=confidence, tau=tau, split=split,
                      num_examples=num_examples, batch_size=batch_size,
                      min_exit=min_exit)
  records = [_certify(cache, task_names, mixture_or_task_name, consistency,
                      value, epsilon, grid_step) for value in deltas]
  return records if isinstance(delta, (list, tuple)) else records[0]


def _certify(cache: DecodeCache, task_names, task: str, consistency: str,
             delta: float, epsilon: float, grid_step: float) -> dict:
  """Runs Learn then Test for one delta and writes its record."""
  result = ltt.fixed_sequence_test(
      ltt.descending_grid(1.0, 0.0, grid_step),
      lambda t: losses_at_threshold(cache, task_names, consistency, t),
      delta=delta, epsilon=epsilon)
  fingerprint = record_fingerprint(cache, task_names, consistency=consistency,
                                   delta=delta, epsilon=epsilon,
                                   grid_step=grid_step)
  name = record_name(task, fingerprint)
  record = {
      'name': name, 'created': time.time(), 'threshold': result.threshold,
      'certified': result.threshold is not None, 'message': result.message,
      'delta': delta, 'epsilon': epsilon, 'consistency': consistency,
      'confidence': cache.measure, 'tau': cache.tau,
      'min_exit': cache.min_exit,
      'n': result.n, 'split': cache.split, 'task': task,
      'checkpoint_step': cache.lm.step, 'dtype': cache.lm.config.dtype,
      'fingerprint': fingerprint,
      'table': [row.as_dict() for row in result.table]}
  path = os.path.join(cache.lm.model_dir, api.CALIBRATION_SUBDIR,
                      name + '.json')
  if multihost.is_primary():
    files.atomic_write_json(path, record)
    print(f'delta {delta:g}: {result.message}')
    print(f'wrote {path}')
  return record


def main() -> None:
  from calm_jax.jobs import train  # pylint: disable=g-import-not-at-top
  cli.run(calibrate, user_errors=train.user_errors())


if __name__ == '__main__':
  main()
