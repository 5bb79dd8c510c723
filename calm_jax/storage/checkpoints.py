"""Verified orbax checkpoints: atomic saves with a manifest of every array's
sha256, restores that check it, and a damaged step reported and passed over.

  MODEL_DIR/checkpoints/<step>/{params,opt_state}   orbax (atomic commits)
  MODEL_DIR/classifier/<step>/{params,opt_state}    exit classifier, if any
  MODEL_DIR/<checkpoints|classifier>.manifests/<step>.json
                             sha256 of every saved array, checked on restore
  MODEL_DIR/damaged/<subdir>-<step>   a damaged step moved aside by training

What a model dir holds besides (model.json, the vocabulary) and how a
model's parameters are loaded from it is `model.model_dir`'s. Knows no
model.
"""

import hashlib
import os
import sys
from typing import Any
from typing import Callable
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from calm_jax import console
from calm_jax import errors
from calm_jax.parallel import multihost
from calm_jax.storage import files
from calm_jax.storage import provenance

CHECKPOINT_SUBDIR = 'checkpoints'
CLASSIFIER_SUBDIR = 'classifier'  # stage-2 exit classifier checkpoints
# How often a reader lists the steps again when the ones it chose were
# deleted under it (a writer's retention, saving every step beside it).
RELIST_ATTEMPTS = 20


def _unraisable_hook(previous):
  """A hook that drops one known unraisable: tensorstore's read callbacks
  landing on orbax's closed event loop after a read failed (a damaged
  step). Each printed a traceback, hundreds per damaged step, under the
  one line that says what is wrong. Anything else goes to `previous`."""

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    previous(unraisable)

  return hook


sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


class CheckpointError(errors.UserError, RuntimeError):
  """A model dir that cannot be used (incompatible or unreadable)."""


class NonFiniteError(CheckpointError):
  """Parameters or optimizer state with NaN or infinity: never saved."""


def manager(
  model_dir: str,
  *,
  max_to_keep: Optional[int] = None,
  save_interval_steps: int = 1,
  subdir: str = CHECKPOINT_SUBDIR,
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    save_interval_steps=save_interval_steps,
    create=True,
  )
  root = (
    os.path.abspath(model_dir) if files.is_local(model_dir) else (model_dir)
  )
  directory = files.join(root, subdir)
  return _listing(lambda: ocp.CheckpointManager(directory, options=options))


def _listing(list_steps: Callable[[], Any]) -> Any:
  """`list_steps()` (a manager's creation or reload, which stat every
  step), again when a step was deleted while it was listed (a training run
  beside this reader, keeping its newest steps)."""
  for _ in range(RELIST_ATTEMPTS - 1):
    try:
      return list_steps()
    except (FileNotFoundError, NotADirectoryError):  # a step being deleted
      continue
  return list_steps()


def _abstract(tree: Any) -> Any:
  """Restore targets: the leaves' shardings, or this process's first device
  for leaves without one (orbax will not guess a layout for a checkpoint
  saved on another mesh)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, 'sharding', None) or default
    ),
    tree,
  )


def manifest_path(mgr: ocp.CheckpointManager, step: int) -> str:
  return files.join(f'{mgr.directory}.manifests', f'{step}.json')


def array_digests(tree: Any) -> tuple[dict[str, str], list[str]]:
  """(sha256 per leaf path, paths of leaves holding NaN or infinity)."""
  digests, non_finite = {}, []
  for key, array in provenance.host_leaves(tree):
    digests[key] = hashlib.sha256(array.tobytes()).hexdigest()
    if np.issubdtype(array.dtype, np.inexact) and not np.all(
      np.isfinite(array)
    ):
      non_finite.append(key)
  return digests, non_finite


def save(
  mgr: ocp.CheckpointManager,
  step: int,
  params: Any,
  opt_state: Any,
  *,
  force: bool = False,
) -> bool:
  """Saves (asynchronously; orbax commits atomically) with a manifest of
  every array's sha256. True if it saved. Non-finite values are never
  saved: a NonFiniteError names them instead."""
  trees = {'params': params, 'opt_state': opt_state}
  manifest = {'step': step}
  for name, tree in trees.items():
    digests, non_finite = array_digests(tree)
    if non_finite:
      raise NonFiniteError(
        f'step {step}: {name} {non_finite[0]} holds NaN '
        f'or infinity ({len(non_finite)} arrays); not '
        'saved'
      )
    manifest[name] = digests
  saved = mgr.save(
    step,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
    ),
    force=force,
  )
  if saved and jax.process_index() == 0:
    files.atomic_write_json(manifest_path(mgr, step), manifest)
  return saved


def save_params_only(
  mgr: ocp.CheckpointManager, step: int, params: Any
) -> None:
  """Saves a checkpoint without optimizer state (an imported model, whose
  fine-tuning starts a fresh optimizer; exit adapters; a classifier fitted
  outside training) with the manifest every restore checks, and waits for
  it. The manifest is written first: a crash in between leaves a manifest
  without a step, never a step without one."""
  digests, non_finite = array_digests(params)
  if non_finite:
    raise NonFiniteError(
      f'step {step}: params {non_finite[0]} holds NaN or infinity '
      f'({len(non_finite)} arrays); not saved'
    )
  if jax.process_index() == 0:
    files.atomic_write_json(
      manifest_path(mgr, step), {'step': step, 'params': digests}
    )
  mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  mgr.wait_until_finished()


def restore(
  mgr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any = None
) -> dict[str, Any]:
  """Restores `step` onto the structure/shapes/shardings of the targets.

  Raises CheckpointError (one line) when the stored tree does not match.
  """
  items = {'params': ocp.args.StandardRestore(_abstract(params))}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(_abstract(opt_state))
  try:
    return dict(mgr.restore(step, args=ocp.args.Composite(**items)))
  except (ValueError, KeyError, TypeError) as e:
    message = reader_message(e)
    if message.startswith('DATA_LOSS'):
      raise  # damaged bytes (a checksum), not another model's tree
    raise CheckpointError(
      f'checkpoint {mgr.directory}/{step} does not match this model: {message}'
    ) from e


def reader_message(error: BaseException) -> str:
  """The first line of a checkpoint reader's error, without the
  tensorstore spec (a kilobyte of JSON) that tensorstore appends."""
  return errors.first_line(error).split(' [tensorstore_spec')[0]


def damage(
  mgr: ocp.CheckpointManager, step: int, restored: dict[str, Any]
) -> Optional[str]:
  """What is wrong with a restored step: arrays whose sha256 differs from
  the manifest written at save, or (no manifest: a checkpoint from before
  manifests) values that are not finite. None if it is intact."""
  path = manifest_path(mgr, step)
  manifest = (
    files.read_json(path, what='checkpoint manifest')
    if files.exists(path)
    else None
  )
  for name, tree in restored.items():
    digests, non_finite = array_digests(tree)
    if manifest is None:
      if non_finite:
        return f'{name} {non_finite[0]} holds NaN or infinity'
      continue
    changed = [
      k for k, v in digests.items() if manifest.get(name, {}).get(k) != v
    ]
    if changed:
      return (
        f'{name} {changed[0]} differs from its manifest ({len(changed)} arrays)'
      )
  return None


class ShapeMismatchError(CheckpointError):
  """A checkpoint saved from other dims than the model restoring it."""


def _key(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def stored_shapes(
  mgr: ocp.CheckpointManager, step: int, item: str
) -> Optional[dict[str, tuple]]:
  """Array path -> shape of an item of `step` as saved, from its metadata
  (None when the metadata cannot be read: damage, found by the restore)."""
  directory = files.as_path(str(mgr.directory)) / str(step) / item
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(directory)
  except Exception:  # pylint: disable=broad-except
    return None
  return {
    _key(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]
    if hasattr(leaf, 'shape')
  }


def check_shapes(
  mgr: ocp.CheckpointManager, step: int, item: str, target: Any
) -> None:
  """A ShapeMismatchError naming the first array whose stored shape is not
  the target's (the model's config does not describe the checkpoint). A
  mismatch is not damage: no other step is tried, and no array is read."""
  stored = stored_shapes(mgr, step, item)
  if stored is None:
    return
  wanted = {
    _key(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  differing = sorted(k for k in wanted if stored.get(k, wanted[k]) != wanted[k])
  if differing:
    name = differing[0]
    raise ShapeMismatchError(
      f'checkpoint {mgr.directory}/{step} holds {item} of other shapes than '
      f'this model: {name} is stored as {stored[name]}, the model has '
      f'{wanted[name]} ({len(differing)} arrays differ)'
    )


class _Vanished(Exception):
  """The step being read was deleted meanwhile: not damage."""


def _overtaken(
  mgr: ocp.CheckpointManager, listed: list[int], step: int
) -> bool:
  """Whether a step that failed to read may have been deleted under the
  reader: it is gone, or newer steps than the listing's were saved since
  (retention deletes a step only after saving a newer one, and a step
  being deleted still exists, half empty)."""
  if not files.exists(files.join(str(mgr.directory), str(step))):
    return True
  _listing(mgr.reload)
  return max(mgr.all_steps(), default=-1) > listed[0]


def restore_verified(
  mgr: ocp.CheckpointManager,
  step: Optional[int] = None,
  *,
  params: Any,
  opt_state: Any = None,
  fallback: bool = True,
) -> tuple[dict[str, Any], int]:
  """Restores and verifies `step` (default: the newest intact one).

  A step that fails to read or to verify is reported in one line; with
  `step` None and `fallback`, the next older step is tried, else it is a
  CheckpointError. A step saved with other shapes than the targets' is a
  ShapeMismatchError at once (the model's config is wrong, not the step).
  A step deleted while it was read (a training run beside this reader,
  keeping its newest steps) is not damage: the steps are listed again and
  the newest one read. Nothing is deleted. Returns (restored, step).
  """
  for _ in range(RELIST_ATTEMPTS):
    steps = sorted(mgr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise CheckpointError(f'{mgr.directory} holds no checkpoint')
    try:
      return _first_intact(mgr, steps, params, opt_state, step, fallback)
    except _Vanished as e:
      if step is not None:
        raise CheckpointError(
          f'checkpoint {mgr.directory}/{step} was deleted while it was read '
          '(by the training run writing this dir?)'
        ) from e
      _listing(mgr.reload)
  raise CheckpointError(
    f'{mgr.directory}: the newest checkpoint was deleted while it was read, '
    f'{RELIST_ATTEMPTS} times over; keep more steps in the training run '
    '(CheckpointSettings.keep) or read a finished dir'
  )


def _first_intact(mgr, steps, params, opt_state, step, fallback):
  """The newest of `steps` that reads and verifies (see restore_verified);
  _Vanished when one of them was deleted while it was read."""
  problems = []
  for candidate in steps:
    check_shapes(mgr, candidate, 'params', params)
    try:
      restored = restore(mgr, candidate, params=params, opt_state=opt_state)
      problem = damage(mgr, candidate, restored)
    except Exception as e:  # pylint: disable=broad-except
      if _overtaken(mgr, steps, candidate):
        raise _Vanished(candidate) from e
      # Damage shows as any error of the reader (or a tree that no longer
      # matches); every step failing alike reads as another model's dir.
      problem = f'unreadable: {reader_message(e)}'
    if problem is None:
      return restored, candidate
    if _overtaken(mgr, steps, candidate):
      raise _Vanished(candidate)  # read half-deleted: not damage either
    problems.append(problem)
    where = f'{mgr.directory}/{candidate}'
    if step is not None or not fallback:
      raise CheckpointError(f'checkpoint {where} is damaged: {problem}')
    console.warn(
      f'checkpoint {where} is damaged ({problem}); trying the step before it'
    )
  raise CheckpointError(
    f'no usable checkpoint in {mgr.directory}: step {steps[-1]}: {problems[-1]}'
  )


def move_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves damaged steps out of the manager's directory (to
  MODEL_DIR/damaged/), so that training can save those steps again. With
  several processes, the primary moves them and every process then
  reloads its manager (they all see the same steps)."""
  root = files.as_path(str(mgr.directory))
  moved = []
  if jax.process_index() == 0:
    for step in steps:
      moved.append(
        files.move(
          root / str(step), root.parent / 'damaged' / f'{root.name}-{step}'
        )
      )
  multihost.barrier('calm_jax.checkpoints.move_aside')
  mgr.reload()
  return moved
