"""Model directories: orbax checkpoints plus what is needed to load them.

A model dir is self-contained:
  MODEL_DIR/checkpoints/<step>/{params,opt_state}   orbax (atomic commits)
  MODEL_DIR/classifier/<step>/{params,opt_state}    exit classifier, if any
  MODEL_DIR/model.json       T5Config and the vocabulary file name
  MODEL_DIR/config.gin       the operative gin config of the training run
  MODEL_DIR/vocab/<name>     the SentencePiece model the tokens refer to
"""
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from calm_jax import files
from calm_jax import network
from calm_jax import partitioning

CHECKPOINT_SUBDIR = 'checkpoints'
CLASSIFIER_SUBDIR = 'classifier'  # stage-2 exit classifier checkpoints
MODEL_JSON = 'model.json'


class CheckpointError(RuntimeError):
  """A model dir that cannot be used (incompatible or unreadable)."""


def first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def manager(model_dir: str, *, max_to_keep: Optional[int] = None,
            save_interval_steps: int = 1,
            subdir: str = CHECKPOINT_SUBDIR) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(model_dir), subdir),
      options=options)


def _abstract(tree: Any) -> Any:
  """Restore targets: the leaves' shardings, or this process's first device
  for leaves without one (orbax will not guess a layout for a checkpoint
  saved on another mesh)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, 'sharding', None) or default),
      tree)


def save(mgr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         *, force: bool = False) -> bool:
  """Saves (asynchronously; orbax commits atomically). True if it saved."""
  return mgr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state)), force=force)


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
        f'{first_line(e)}') from e


def write_model_files(model_dir: str, config: network.T5Config,
                      vocab_path: str, operative_gin: str = '') -> None:
  """Writes model.json, config.gin and a copy of the vocabulary."""
  root = pathlib.Path(model_dir)
  (root / 'vocab').mkdir(parents=True, exist_ok=True)
  vocab_name = pathlib.Path(vocab_path).name
  shutil.copyfile(vocab_path, root / 'vocab' / vocab_name)
  files.atomic_write_json(str(root / MODEL_JSON), {
      'config': dataclasses.asdict(config), 'vocabulary': vocab_name})
  if operative_gin:
    files.atomic_write_text(str(root / 'config.gin'), operative_gin)


def read_model_config(model_dir: str) -> tuple[network.T5Config, str]:
  """(config, vocabulary path) of a model dir written by training."""
  path = pathlib.Path(model_dir) / MODEL_JSON
  if not path.exists():
    raise CheckpointError(f'{model_dir} is not a model dir: no {MODEL_JSON}')
  meta = json.loads(path.read_text())
  return (network.T5Config(**meta['config']),
          str(pathlib.Path(model_dir) / 'vocab' / meta['vocabulary']))


def check_compatible(model_dir: str, config: network.T5Config) -> None:
  """Refuses to train into a dir whose model.json holds other dims."""
  path = pathlib.Path(model_dir) / MODEL_JSON
  if not path.exists():
    return
  stored, _ = read_model_config(model_dir)
  if stored != config:
    diff = {k: (v, getattr(config, k))
            for k, v in dataclasses.asdict(stored).items()
            if getattr(config, k) != v}
    raise CheckpointError(f'{model_dir} holds a model with other settings '
                          f'(stored, requested): {diff}; use another MODEL_DIR')


# Whole-or-nothing writes live in calm_jax.files; the names stay here for
# the jobs that write next to checkpoints.
atomic_write_text = files.atomic_write_text
atomic_write_json = files.atomic_write_json


def load_params(model_dir: str, config: network.T5Config,
                step: Optional[int] = None, shardings: Any = None
                ) -> tuple[Any, int]:
  """Parameters of `step` (default: the latest) of a model dir, and the step.

  With `shardings` (a tree of NamedShardings, e.g. from
  `partitioning.param_shardings`) they are restored straight into those
  shards, whatever mesh the checkpoint was saved from; else onto the
  default device.
  """
  from calm_jax import models  # pylint: disable=g-import-not-at-top
  mgr = manager(model_dir)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{model_dir} holds no checkpoint')
  target = jax.eval_shape(
      lambda: models.CalmModel(config).init_params(jax.random.PRNGKey(0)))
  target = target['params']
  if shardings is not None:
    target = partitioning.with_shardings(target, shardings)
  params = restore(mgr, step, params=target)['params']
  mgr.close()
  return params, step


def load_classifier(model_dir: str, config: network.T5Config
                    ) -> Optional[Any]:
  """The latest exit classifier of a model dir, or None if never trained."""
  from calm_jax import confidence  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(model_dir, CLASSIFIER_SUBDIR)):
    return None
  mgr = manager(model_dir, subdir=CLASSIFIER_SUBDIR)
  step = mgr.latest_step()
  if step is None:
    return None
  target = jax.eval_shape(lambda: confidence.init_classifier(config.emb_dim))
  params = restore(mgr, step, params=target)['params']
  mgr.close()
  return params
