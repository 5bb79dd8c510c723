"""Model directories: what a trained or imported model dir holds, and
loading its parameters.

  MODEL_DIR/model.json       the model family ('t5' or 'llama'), its
                             config, the vocabulary file name, the feature
                             lengths the model was trained with, and for an
                             imported model where it came from
  MODEL_DIR/config.gin       the operative gin config of the training run
  MODEL_DIR/vocab/<name>     the tokenizer: T5's SentencePiece model, or a
                             Llama-family tokenizer.json (and its
                             tokenizer_config.json with the chat template)
  MODEL_DIR/checkpoints/ and classifier/   verified orbax checkpoints
                             (`storage.checkpoints`)

model.json is sealed (its own sha256 in "digest") and holds the sha256 of
the vocabulary files and config.gin ("files"): a changed byte in any of
them is refused, naming the file, before the dir is used. A dir written
before seals (no "digest") is read as it is.
"""

import dataclasses
import re
from typing import Any
from typing import Optional

import jax

from calm_jax import errors
from calm_jax.decoding import confidence
from calm_jax.model import layout
from calm_jax.model import llama
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning
from calm_jax.storage import checkpoints
from calm_jax.storage import files
from calm_jax.storage import provenance

MODEL_JSON = 'model.json'

# Each family: its config class and the model around it.
FAMILIES = {
  't5': (network.T5Config, models.CalmModel),
  'llama': (llama.LlamaConfig, llama.CalmLlama),
}
Config = network.T5Config | llama.LlamaConfig


def family_of(config: Config) -> str:
  return next(f for f, (cls, _) in FAMILIES.items() if isinstance(config, cls))


def model_for(config: Config, **options):
  """The CALM model of a config's family (`models.CalmModel` for T5,
  `llama.CalmLlama` for the Llama family)."""
  return FAMILIES[family_of(config)][1](config, **options)


def write_model_files(
  model_dir: str,
  config: Config,
  vocab: str | dict[str, str],
  operative_gin: str = '',
  feature_lengths: Optional[dict] = None,
  source: Optional[dict] = None,
) -> None:
  """Writes model.json, config.gin and a copy of the vocabulary.

  `vocab` is a SentencePiece model file, or {name: path} of tokenizer files
  (the first one is the tokenizer). `feature_lengths` ({'inputs': s,
  'targets': t}, the longest of the training tasks) is what decoding a
  user's file and `generate` default to. `source` says where an imported
  model came from (its path and, for a file, its sha256).
  """
  vocab_files = (
    vocab if isinstance(vocab, dict) else {files.as_path(vocab).name: vocab}
  )
  written = {}  # path in the dir -> its sha256; model.json comes last
  for name, path in vocab_files.items():
    written[f'vocab/{name}'] = files.copy_file(
      path, files.join(model_dir, 'vocab', name)
    )
  if operative_gin:
    written['config.gin'] = files.atomic_write_text(
      files.join(model_dir, 'config.gin'), operative_gin
    )
  meta = {
    'family': family_of(config),
    'config': dataclasses.asdict(config),
    'vocabulary': next(iter(vocab_files)),
    'files': {k: provenance.digest_file(v) for k, v in written.items()},
  }
  if feature_lengths:
    meta['feature_lengths'] = dict(feature_lengths)
  if source:
    meta['source'] = source
  files.atomic_write_json(
    files.join(model_dir, MODEL_JSON), provenance.sealed(meta)
  )


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
  if isinstance(meta, dict):
    _check_sealed(model_dir, path, meta)
  return path, meta


# Everything model.json may hold; a key outside it (a flipped bit in a key
# would otherwise hide the seal itself) is refused.
META_KEYS = (
  'family',
  'config',
  'vocabulary',
  'feature_lengths',
  'source',
  'files',
  provenance.DIGEST,
)
_REWRITE = 'restore it from a copy, or write the model dir again'


def _check_sealed(model_dir: str, path: str, meta: dict) -> None:
  """model.json's own digest, then each file it holds a sha256 of (a file
  that is missing is left to the reader that needs it, which names it)."""
  unknown = sorted(set(meta) - set(META_KEYS))
  if unknown:
    raise checkpoints.CheckpointError(
      f'{path} holds unknown keys {unknown}; valid: {", ".join(META_KEYS)}'
    )
  if not provenance.seal_intact(meta):
    raise checkpoints.CheckpointError(
      f'{path} was changed after it was written: its content does not match '
      f'its digest; {_REWRITE}'
    )
  digests = meta.get('files', {})
  for name, digest in digests.items() if isinstance(digests, dict) else ():
    file_path = files.join(model_dir, name)
    if files.exists(file_path) and provenance.digest_file(file_path) != digest:
      raise checkpoints.CheckpointError(
        f'{file_path} was changed after it was written: its sha256 does not '
        f'match the one {MODEL_JSON} holds; {_REWRITE}'
      )


def read_model_config(model_dir: str) -> tuple[Config, str]:
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


def _config_from(path: str, meta: Any) -> Config:
  """The config in model.json (of its family, T5 when it names none); a
  missing or unknown field is named."""
  stored = meta.get('config') if isinstance(meta, dict) else None
  if not isinstance(stored, dict) or 'vocabulary' not in meta:
    raise checkpoints.CheckpointError(
      f'{path} lacks "config" or "vocabulary": write it '
      'again with the training run that made the dir'
    )
  family = meta.get('family', 't5')
  if family not in FAMILIES:
    raise checkpoints.CheckpointError(
      f'{path} names model family {family!r}; valid: {", ".join(FAMILIES)}'
    )
  config_class = FAMILIES[family][0]
  fields = {f.name for f in dataclasses.fields(config_class)}
  if 'exit_layer_list' in stored:  # JSON has no tuples
    stored = {**stored, 'exit_layer_list': tuple(stored['exit_layer_list'])}
  unknown = sorted(set(stored) - fields)
  if unknown:
    raise checkpoints.CheckpointError(
      f'{path} has unknown config fields {unknown}; '
      f'valid: {", ".join(sorted(fields))}'
    )
  try:
    return config_class(**stored)
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


def check_compatible(model_dir: str, config: Config) -> None:
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
    hint = 'use another MODEL_DIR'
    if set(diff) <= set(layout.LAYOUT_FIELDS):
      # Its optimizer state is stored in that layout too.
      hint = (
        f'a run keeps the layout it started with (scan_layers='
        f'{stored.scan_layers}); to change it, fine-tune from this dir '
        'into another MODEL_DIR (INITIAL_CHECKPOINT_PATH)'
      )
    raise checkpoints.CheckpointError(
      f'{model_dir} holds a model with other settings '
      f'(stored, requested): {diff}; {hint}'
    )


def load_params(
  model_dir: str,
  config: Config,
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
    lambda: model_for(config).init_params(jax.random.PRNGKey(0))
  )
  target = target['params']
  if shardings is not None:
    target = partitioning.with_shardings(target, shardings)
  # The steps are in the layout the dir was trained in; restored in it
  # (shards placed as the requested ones would be), then converted.
  saved_scanned = _saved_layout(model_dir, config)
  target = layout.to_layout(target, saved_scanned)
  try:
    restored, step = checkpoints.restore_verified(mgr, step, params=target)
  except checkpoints.ShapeMismatchError as e:
    raise checkpoints.CheckpointError(
      f'{files.join(model_dir, MODEL_JSON)} does not describe the model '
      f"dir's checkpoint: {e}"
    ) from e
  finally:
    mgr.close()
  params = restored['params']
  if saved_scanned != config.scan_layers:
    placed = {} if shardings is None else {'out_shardings': shardings}
    params = jax.jit(
      lambda p: layout.to_layout(p, config.scan_layers), **placed
    )(params)
  return params, step


def _saved_layout(model_dir: str, config: Config) -> bool:
  """Whether the dir's checkpoints stack their layers (model.json's
  scan_layers); a dir without a model.json is taken to hold `config`'s."""
  if not files.exists(files.join(model_dir, MODEL_JSON)):
    return config.scan_layers
  return read_model_config(model_dir)[0].scan_layers


def has_classifier(model_dir: str) -> bool:
  """Whether the model dir holds a trained exit classifier step."""
  root = files.join(model_dir, checkpoints.CLASSIFIER_SUBDIR)
  return files.is_dir(root) and any(
    name.isdigit() for name in files.listdir(root)
  )


def load_classifier(model_dir: str, config: Config) -> Optional[Any]:
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


def save_classifier(model_dir: str, classifier: Any) -> int:
  """Writes an exit classifier fitted outside training (on a frozen
  model's states) as the model dir's newest classifier step."""
  mgr = checkpoints.manager(model_dir, subdir=checkpoints.CLASSIFIER_SUBDIR)
  step = (mgr.latest_step() or 0) + 1
  checkpoints.save_params_only(mgr, step, classifier)
  mgr.close()
  return step


def read_source(model_dir: str) -> Optional[dict]:
  """Where an imported model came from (model.json's 'source'), if known."""
  return _read_meta(model_dir)[1].get('source')
