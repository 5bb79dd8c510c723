"""The calibrate job: the fastest threshold certified by Learn then Test.

Decodes the calibration split at full depth, then at each threshold of a
descending grid, stopping where fixed-sequence testing stops
(`evaluation.certify`). Decodes are cached in MODEL_DIR/calibration/cache
under the fingerprint of everything that determines them, so another delta
or epsilon reuses them and any other change decodes afresh. Writes
MODEL_DIR/calibration/<name>.json with the same fingerprint, which decode
and `calm_jax.load(...).generate` use for that task when no threshold is
given, and refuse once the model dir has changed.
"""

import os
from typing import Optional
from typing import Sequence

from etils import epy
import gin

from calm_jax import arguments
from calm_jax import console
from calm_jax.calibration import records
from calm_jax.evaluation import certify
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.jobs import settings
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import files

# The SeqIO pipeline (and with it TensorFlow) loads when a job first
# reads data, not when the command line registers every job.
with epy.lazy_imports():
  from calm_jax.data import pipeline

READS = ('calm_jax.calibrate', *settings.SETTINGS)


def cache_dir(model_dir: str) -> str:
  """Where a model dir's decodes are cached (shared by every job)."""
  return os.path.join(records.directory(model_dir), 'cache')


def calibration_for(
  decoder: decoder_lib.Decoder,
  task_names: Sequence[str],
  exits: settings.ExitSettings,
  *,
  split: str,
  num_examples: Optional[int],
  batch_size: int,
) -> certify.Calibration:
  """LTT over the pooled split of these tasks, cached in the model dir."""
  model = decoder.model
  evaluator = engine.Evaluator(
    decoder, batch_size=batch_size, cache_dir=cache_dir(model.model_dir)
  )
  return certify.Calibration(
    evaluator,
    tuple(
      pipeline.task_examples(t, split, num_examples=num_examples)
      for t in task_names
    ),
    model.exit_config(
      exits.confidence,
      min_exit=exits.min_exit,
      tau=exits.tau,
      propagation=exits.propagation,
    ),
  )


def certify_and_write(
  calibration: certify.Calibration,
  *,
  task: str,
  consistency: str,
  delta: float,
  epsilon: float,
  grid_step: float,
  split: str,
  min_exit: int,
) -> records.CalibrationRecord:
  """Runs Learn then Test for one delta and writes its record."""
  result = calibration.certify(consistency, delta, epsilon, grid_step)
  record = calibration.record(
    result,
    task=task,
    consistency=consistency,
    delta=delta,
    epsilon=epsilon,
    grid_step=grid_step,
    extra={'split': split, 'min_exit': min_exit},
  )
  if multihost.is_primary():
    path = records.write(calibration.evaluator.model.model_dir, record)
    console.info(f'delta {delta:g}: {result.message}\nwrote {path}')
  return record


@gin.configurable(module='calm_jax')
def calibrate(
  *,
  model_dir: str = gin.REQUIRED,
  mixture_or_task_name: str = gin.REQUIRED,
  delta=gin.REQUIRED,
  epsilon: float = 0.05,
  consistency: str = 'textual',
  split: str = 'validation',
  num_examples: Optional[int] = None,
  grid_step: float = 0.05,
  exits: Optional[settings.ExitSettings] = None,
  runtime: Optional[settings.RunSettings] = None,
  check_only: bool = False,
):
  """Certifies a threshold per delta and writes the calibration records.

  `delta` is one tolerance or a list of them (a paper-style sweep); the
  decodes are shared, so each further delta costs only the thresholds it
  reaches beyond the others. Returns the record, or the list of records.
  `exits` and `runtime` default to their gin bindings (calm_jax.ExitSettings,
  shared with decode so that a record's settings are the decode's, and
  calm_jax.RunSettings: batch, mesh, dtype). Decodes run over every process;
  the primary one writes. Every setting is checked before the model is
  loaded; `check_only` stops there.
  """
  deltas = list(delta) if isinstance(delta, (list, tuple)) else [delta]
  exits = (exits or settings.ExitSettings()).check()
  runtime = (runtime or settings.RunSettings()).check()
  arguments.check(
    delta=deltas,
    epsilon=epsilon,
    consistency=consistency,
    grid_step=grid_step,
    num_examples=num_examples,
  )
  files.check_writable_dir(records.directory(model_dir), 'MODEL_DIR')
  if check_only:
    return None
  model = loaded_lib.load(
    model_dir,
    mesh=partitioning.make_mesh(runtime.mesh_shape),
    dtype=runtime.dtype,
  )
  model.classifier_for(exits.confidence)  # fails early without a classifier
  calibration = calibration_for(
    decoder_lib.Decoder(model),
    list(pipeline.task_rates(mixture_or_task_name)),
    exits,
    split=split,
    num_examples=num_examples,
    batch_size=runtime.batch_size,
  )
  out = [
    certify_and_write(
      calibration,
      task=mixture_or_task_name,
      consistency=consistency,
      delta=value,
      epsilon=epsilon,
      grid_step=grid_step,
      split=split,
      min_exit=exits.min_exit,
    )
    for value in deltas
  ]
  return out if isinstance(delta, (list, tuple)) else out[0]


def run(check_only: bool = False) -> None:
  calibrate(check_only=check_only)
