"""Model directories: orbax checkpoints plus what is needed to load them.

A model dir is self-contained:
  MODEL_DIR/checkpoints/<step>/{params,opt_state}   orbax (atomic commits)
  MODEL_DIR/classifier/<step>/{params,opt_state}    exit classifier, if any
  MODEL_DIR/<checkpoints|classifier>.manifests/<step>.json
                             sha256 of every saved array, checked on restore
  MODEL_DIR/damaged/<subdir>-<step>   a damaged step moved aside by training
  MODEL_DIR/model.json       T5Config and the vocabulary file name
  MODEL_DIR/config.gin       the operative gin config of the training run
  MODEL_DIR/vocab/<name>     the SentencePiece model the tokens refer to
"""
import dataclasses
import hashlib
import os
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from calm_jax import errors
from calm_jax.decoding import confidence
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import files
from calm_jax.storage import provenance

CHECKPOINT_SUBDIR = 'checkpoints'
CLASSIFIER_SUBDIR = 'classifier'  # stage-2 exit classifier checkpoints
MODEL_JSON = 'model.json'


class CheckpointError(errors.UserError, RuntimeError):
  """A model dir that cannot be used (incompatible or unreadable)."""


class NonFiniteError(CheckpointError):
  """Parameters or optimizer state with NaN or infinity: never saved."""


def manager(model_dir: str, *, max_to_keep: Optional[int] = None,
            save_interval_steps: int = 1,
            subdir: str = CHECKPOINT_SUBDIR) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      create=True)
  root = os.path.abspath(model_dir) if files.is_local(model_dir) else (
      model_dir)
  return ocp.CheckpointManager(files.join(root, subdir), options=options)


def _abstract(tree: Any) -> Any:
  """Restore targets: the leaves' shardings, or this process's first device
  for leaves without one (orbax will not guess a layout for a checkpoint
  saved on another mesh)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, 'sharding', None) or default),
      tree)


def manifest_path(mgr: ocp.CheckpointManager, step: int) -> str:
  return files.join(f'{mgr.directory}.manifests', f'{step}.json')


def array_digests(tree: Any) -> tuple[dict[str, str], list[str]]:
  """(sha256 per leaf path, paths of leaves holding NaN or infinity)."""
  digests, non_finite = {}, []
  for key, array in provenance.host_leaves(tree):
    digests[key] = hashlib.sha256(array.tobytes()).hexdigest()
    if np.issubdtype(array.dtype, np.inexact) and not np.all(
        np.isfinite(array)):
      non_finite.append(key)
  return digests, non_finite


def save(mgr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         *, force: bool = False) -> bool:
  """Saves (asynchronously; orbax commits atomically) with a manifest of
  every array's sha256. True if it saved. Non-finite values are never
  saved: a NonFiniteError names them instead."""
  trees = {'params': params, 'opt_state': opt_state}
  manifest = {'step': step}
  for name, tree in trees.items():
    digests, non_finite = array_digests(tree)
    if non_finite:
      raise NonFiniteError(f'step {step}: {name} {non_finite[0]} holds NaN '
                           f'or infinity ({len(non_finite)} arrays); not '
                           'saved')
    manifest[name] = digests
  saved = mgr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state)), force=force)
  if saved and jax.process_index() == 0:
    files.atomic_write_json(manifest_path(mgr, step), manifest)
  return saved


def params_only_save_args(params: Any) -> ocp.args.Composite:
  """Save args of a checkpoint without optimizer state (an imported model:
  fine-tuning starts a fresh optimizer in another model dir)."""
  return ocp.args.Composite(params=ocp.args.StandardSave(params))


def restore(mgr: ocp.CheckpointManager, step: int, *, params: Any,
            opt_state: Any = None) -> dict[str, Any]:
  """Restores `step` onto the structure/shapes/shardings of the targets.

  Raises CheckpointError (one line) when the stored tree does not match.
  """
  items = {'params': ocp.args.StandardRestore(_abstract(params))}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(_abstract(opt_state))
  try:
    return dict(mgr.restore(step, args=ocp.args.Composite(**items)))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f'checkpoint {mgr.directory}/{step} does not match this model: '
        f'{errors.first_line(e)}') from e


def write_model_files(model_dir: str, config: network.T5Config,
                      vocab_path: str, operative_gin: str = '',
                      feature_lengths: Optional[dict] = None) -> None:
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
    files.atomic_write_text(files.join(model_dir, 'config.gin'),
                            operative_gin)


# What decoding defaults to for a model dir that records no lengths (one
# imported from Hugging Face, or trained before model.json held them).
DEFAULT_FEATURE_LENGTHS = {'inputs': 512, 'targets': 64}


def _read_meta(model_dir: str) -> tuple[str, dict]:
  path = files.join(model_dir, MODEL_JSON)
  if not files.exists(path):
    raise CheckpointError(f'{model_dir} is not a model dir: no {MODEL_JSON}')
  try:
    meta = files.read_json(path, what=MODEL_JSON,
                           recovery='restore it from a copy, or write it '
                           'again with the training run that made the dir')
  except files.FileError as e:
    raise CheckpointError(str(e)) from e
  return path, meta


def read_model_config(model_dir: str) -> tuple[network.T5Config, str]:
  """(config, vocabulary path) of a model dir written by training."""
  path, meta = _read_meta(model_dir)
  return _config_from(path, meta), files.join(model_dir, 'vocab',
                                              meta['vocabulary'])


def read_feature_lengths(model_dir: str) -> dict[str, int]:
  """The input and target lengths the model was trained with."""
  path, meta = _read_meta(model_dir)
  lengths = meta.get('feature_lengths') or DEFAULT_FEATURE_LENGTHS
  if not (isinstance(lengths, dict) and all(
      isinstance(lengths.get(k), int) and lengths[k] > 1
      for k in ('inputs', 'targets'))):
    raise CheckpointError(f'{path}: "feature_lengths" must hold integers '
                          f'"inputs" and "targets" > 1, got {lengths!r}')
  return {'inputs': lengths['inputs'], 'targets': lengths['targets']}


def _config_from(path: str, meta: Any) -> network.T5Config:
  """The T5Config in model.json; a missing or unknown field is named."""
  fields = {f.name for f in dataclasses.fields(network.T5Config)}
  stored = meta.get('config') if isinstance(meta, dict) else None
  if not isinstance(stored, dict) or 'vocabulary' not in meta:
    raise CheckpointError(f'{path} lacks "config" or "vocabulary": write it '
                          'again with the training run that made the dir')
  unknown = sorted(set(stored) - fields)
  if unknown:
    raise CheckpointError(f'{path} has unknown config fields {unknown}; '
                          f'valid: {", ".join(sorted(fields))}')
  try:
    return network.T5Config(**stored)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: {errors.first_line(e)}') from e


def check_compatible(model_dir: str, config: network.T5Config) -> None:
  """Refuses to train into a dir whose model.json holds other dims."""
  if not files.exists(files.join(model_dir, MODEL_JSON)):
    return
  stored, _ = read_model_config(model_dir)
  if stored != config:
    diff = {k: (v, getattr(config, k))
            for k, v in dataclasses.asdict(stored).items()
            if getattr(config, k) != v}
    raise CheckpointError(f'{model_dir} holds a model with other settings '
                          f'(stored, requested): {diff}; use another MODEL_DIR')


def damage(mgr: ocp.CheckpointManager, step: int,
           restored: dict[str, Any]) -> Optional[str]:
  """What is wrong with a restored step: arrays whose sha256 differs from
  the manifest written at save, or (no manifest: a checkpoint from before
  manifests) values that are not finite. None if it is intact."""
  path = manifest_path(mgr, step)
  manifest = (files.read_json(path, what='checkpoint manifest')
              if files.exists(path) else None)
  for name, tree in restored.items():
    digests, non_finite = array_digests(tree)
    if manifest is None:
      if non_finite:
        return f'{name} {non_finite[0]} holds NaN or infinity'
      continue
    changed = [k for k, v in digests.items()
               if manifest.get(name, {}).get(k) != v]
    if changed:
      return (f'{name} {changed[0]} differs from its manifest '
              f'({len(changed)} arrays)')
  return None


def restore_verified(mgr: ocp.CheckpointManager, step: Optional[int] = None,
                     *, params: Any, opt_state: Any = None,
                     fallback: bool = True) -> tuple[dict[str, Any], int]:
  """Restores and verifies `step` (default: the newest intact one).

  A step that fails to read or to verify is reported in one line; with
  `step` None and `fallback`, the next older step is tried, else it is a
  CheckpointError. Nothing is deleted. Returns (restored, step).
  """
  steps = sorted(mgr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise CheckpointError(f'{mgr.directory} holds no checkpoint')
  problems = []
  for candidate in steps:
    try:
      restored = restore(mgr, candidate, params=params, opt_state=opt_state)
      problem = damage(mgr, candidate, restored)
    except Exception as e:  # pylint: disable=broad-except
      # Damage shows as any error of the reader (or a tree that no longer
      # matches); every step failing alike reads as another model's dir.
      problem = f'unreadable: {errors.first_line(e)}'
    if problem is None:
      return restored, candidate
    problems.append(problem)
    where = f'{mgr.directory}/{candidate}'
    if step is not None or not fallback:
      raise CheckpointError(f'checkpoint {where} is damaged: {problem}')
    print(f'warning: checkpoint {where} is damaged ({problem}); trying the '
          'step before it', file=sys.stderr)
  raise CheckpointError(f'no usable checkpoint in {mgr.directory}: step '
                        f'{steps[-1]}: {problems[-1]}')


def move_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves damaged steps out of the manager's directory (to
  MODEL_DIR/damaged/), so that training can save those steps again. With
  several processes, the primary moves them and every process then
  reloads its manager (they all see the same steps)."""
  root = files.as_path(str(mgr.directory))
  moved = []
  if jax.process_index() == 0:
    for step in steps:
      moved.append(files.move(
          root / str(step), root.parent / 'damaged' / f'{root.name}-{step}'))
  multihost.barrier('calm_jax.checkpoints.move_aside')
  mgr.reload()
  return moved


def load_params(model_dir: str, config: network.T5Config,
                step: Optional[int] = None, shardings: Any = None
                ) -> tuple[Any, int]:
  """Parameters of `step` (default: the newest intact one: a damaged latest
  step is reported and the one before it used) of a model dir, and the
  step; the parameters are verified against the step's manifest.

  With `shardings` (a tree of NamedShardings, e.g. from
  `partitioning.param_shardings`) they are restored straight into those
  shards, whatever mesh the checkpoint was saved from; else onto the
  default device.
  """
  mgr = manager(model_dir)
  target = jax.eval_shape(
      lambda: models.CalmModel(config).init_params(jax.random.PRNGKey(0)))
  target = target['params']
  if shardings is not None:
    target = partitioning.with_shardings(target, shardings)
  try:
    restored, step = restore_verified(mgr, step, params=target)
  finally:
    mgr.close()
  return restored['params'], step


def load_classifier(model_dir: str, config: network.T5Config
                    ) -> Optional[Any]:
  """The latest exit classifier of a model dir, or None if never trained."""
  if not files.is_dir(files.join(model_dir, CLASSIFIER_SUBDIR)):
    return None
  mgr = manager(model_dir, subdir=CLASSIFIER_SUBDIR)
  if mgr.latest_step() is None:
    return None
  target = jax.eval_shape(lambda: confidence.init_classifier(config.emb_dim))
  try:
    restored, _ = restore_verified(mgr, params=target)
  finally:
    mgr.close()
  return restored['params']
