"""Model directories: what a trained or imported model dir holds, and
loading its parameters.

  MODEL_DIR/model.json       the config, the vocabulary file name and the
                             feature lengths the model was trained with
  MODEL_DIR/config.gin       the operative gin config of the training run
  MODEL_DIR/vocab/<name>     the SentencePiece model the tokens refer to
  MODEL_DIR/checkpoints/ and classifier/   verified orbax checkpoints
                             (`storage.checkpoints`)
"""

import dataclasses
import re
from typing import Any
from typing import Optional

import jax

from calm_jax import errors
from calm_jax.decoding import confidence
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning
from calm_jax.storage import checkpoints
from calm_jax.storage import files

MODEL_JSON = 'model.json'


def write_model_files(
  model_dir: str,
  config: network.T5Config,
  vocab_path: str,
  operative_gin: str = '',
  feature_lengths: Optional[dict] = None,
) -> None:
  """Writes model.json, config.gin and a copy of the vocabulary.

  `feature_lengths` ({'inputs': s, 'targets': t}, the longest of the
  training tasks) is what decoding a user's file and `generate` default to.
  """
  vocab_name = files.as_path(vocab_path).name
  files.copy_file(vocab_path, files.join(model_dir, 'vocab', vocab_name))
  meta = {'config': dataclasses.asdict(config), 'vocabulary': vocab_name}
  if feature_lengths:
    meta['feature_lengths'] = dict(feature_lengths)
  files.atomic_write_json(files.join(model_dir, MODEL_JSON), meta)
  if operative_gin:
    files.atomic_write_text(files.join(model_dir, 'config.gin'), operative_gin)


# What decoding defaults to for a model dir that records no lengths (one
# imported from Hugging Face, or trained before model.json held them).
DEFAULT_FEATURE_LENGTHS = {'inputs': 512, 'targets': 64}


def _read_meta(model_dir: str) -> tuple[str, dict]:
  path = files.join(model_dir, MODEL_JSON)
  if not files.exists(path):
    raise checkpoints.CheckpointError(
      f'{model_dir} is not a model dir: no {MODEL_JSON}'
    )
  try:
    meta = files.read_json(
      path,
      what=MODEL_JSON,
      recovery='restore it from a copy, or write it '
      'again with the training run that made the dir',
    )
  except files.FileError as e:
    raise checkpoints.CheckpointError(str(e)) from e
  return path, meta


def read_model_config(model_dir: str) -> tuple[network.T5Config, str]:
  """(config, vocabulary path) of a model dir written by training."""
  path, meta = _read_meta(model_dir)
  return _config_from(path, meta), files.join(
    model_dir, 'vocab', meta['vocabulary']
  )


def read_feature_lengths(model_dir: str) -> dict[str, int]:
  """The input and target lengths the model was trained with."""
  path, meta = _read_meta(model_dir)
  lengths = meta.get('feature_lengths') or DEFAULT_FEATURE_LENGTHS
  if not (
    isinstance(lengths, dict)
    and all(
      isinstance(lengths.get(k), int) and lengths[k] > 1
      for k in ('inputs', 'targets')
    )
  ):
    raise checkpoints.CheckpointError(
      f'{path}: "feature_lengths" must hold integers '
      f'"inputs" and "targets" > 1, got {lengths!r}'
    )
  return {'inputs': lengths['inputs'], 'targets': lengths['targets']}


def _config_from(path: str, meta: Any) -> network.T5Config:
  """The T5Config in model.json; a missing or unknown field is named."""
  fields = {f.name for f in dataclasses.fields(network.T5Config)}
  stored = meta.get('config') if isinstance(meta, dict) else None
  if not isinstance(stored, dict) or 'vocabulary' not in meta:
    raise checkpoints.CheckpointError(
      f'{path} lacks "config" or "vocabulary": write it '
      'again with the training run that made the dir'
    )
  unknown = sorted(set(stored) - fields)
  if unknown:
    raise checkpoints.CheckpointError(
      f'{path} has unknown config fields {unknown}; '
      f'valid: {", ".join(sorted(fields))}'
    )
  try:
    return network.T5Config(**stored)
  except (TypeError, ValueError) as e:
    raise checkpoints.CheckpointError(f'{path}: {errors.first_line(e)}') from e


def training_task(model_dir: str) -> Optional[str]:
  """The task or mixture the model dir was trained on, from the operative
  config.gin its training wrote (None if unknown)."""
  path = files.join(model_dir, 'config.gin')
  if not files.exists(path):
    return None
  found = re.search(
    r"^MIXTURE_OR_TASK_NAME = '([^']+)'", files.read_text(path), re.M
  )
  return found.group(1) if found else None


def train_classifier_command(model_dir: str) -> str:
  """The command that trains a model dir's exit classifier."""
  task = training_task(model_dir) or 'TASK'
  return (
    'python -m calm_jax.train --gin_file=gin/runs/train_classifier.gin '
    f'--gin.MODEL_DIR="\'{model_dir}\'" '
    f'--gin.MIXTURE_OR_TASK_NAME="\'{task}\'"'
  )


def check_compatible(model_dir: str, config: network.T5Config) -> None:
  """Refuses to train into a dir whose model.json holds other dims."""
  if not files.exists(files.join(model_dir, MODEL_JSON)):
    return
  stored, _ = read_model_config(model_dir)
  if stored != config:
    diff = {
      k: (v, getattr(config, k))
      for k, v in dataclasses.asdict(stored).items()
      if getattr(config, k) != v
    }
    raise checkpoints.CheckpointError(
      f'{model_dir} holds a model with other settings '
      f'(stored, requested): {diff}; use another MODEL_DIR'
    )


def load_params(
  model_dir: str,
  config: network.T5Config,
  step: Optional[int] = None,
  shardings: Any = None,
) -> tuple[Any, int]:
  """Parameters of `step` (default: the newest intact one: a damaged latest
  step is reported and the one before it used) of a model dir, and the
  step; the parameters are verified against the step's manifest.

  With `shardings` (a tree of NamedShardings, e.g. from
  `partitioning.param_shardings`) they are restored straight into those
  shards, whatever mesh the checkpoint was saved from; else onto the
  default device.
  """
  mgr = checkpoints.manager(model_dir)
  target = jax.eval_shape(
    lambda: models.CalmModel(config).init_params(jax.random.PRNGKey(0))
  )
  target = target['params']
  if shardings is not None:
    target = partitioning.with_shardings(target, shardings)
  try:
    restored, step = checkpoints.restore_verified(mgr, step, params=target)
  except checkpoints.ShapeMismatchError as e:
    raise checkpoints.CheckpointError(
      f'{files.join(model_dir, MODEL_JSON)} does not describe the model '
      f"dir's checkpoint: {e}"
    ) from e
  finally:
    mgr.close()
  return restored['params'], step


def load_classifier(model_dir: str, config: network.T5Config) -> Optional[Any]:
  """The latest exit classifier of a model dir, or None if never trained."""
  if not files.is_dir(files.join(model_dir, checkpoints.CLASSIFIER_SUBDIR)):
    return None
  mgr = checkpoints.manager(model_dir, subdir=checkpoints.CLASSIFIER_SUBDIR)
  if mgr.latest_step() is None:
    return None
  target = jax.eval_shape(lambda: confidence.init_classifier(config.emb_dim))
  try:
    restored, _ = checkpoints.restore_verified(mgr, params=target)
  finally:
    mgr.close()
  return restored['params']
