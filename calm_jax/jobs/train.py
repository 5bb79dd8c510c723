"""The train job: CALM's model, or its exit classifier, into a model dir.

Running the same command again resumes from the latest checkpoint at the same
data position; a finished run returns at once. With
`calm_jax.train.initial_checkpoint_path` (gin/runs/finetune.gin) a new run
starts from another model dir's latest parameters (a pre-trained or imported
T5) instead of a random init, with a fresh optimizer and step 0.
"""

import dataclasses
from typing import Optional
from typing import Sequence

from etils import epy
import gin
import jax

from calm_jax import arguments
from calm_jax import console
from calm_jax import errors
from calm_jax.jobs import settings
from calm_jax.model import layout
from calm_jax.model import llama
from calm_jax.model import model_files
from calm_jax.model import network
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import checkpoints
from calm_jax.storage import files
from calm_jax.storage import locks
from calm_jax.training import optim
from calm_jax.training import trainer

# The SeqIO pipeline (and with it TensorFlow) loads when a job first
# reads data, not when the command line registers every job.
with epy.lazy_imports():
  from clu import metric_writers  # TensorBoard through TensorFlow

  from calm_jax.data import pipeline

T5Config = gin.external_configurable(network.T5Config, module='calm_jax')
LlamaConfig = gin.external_configurable(llama.LlamaConfig, module='calm_jax')
make_optimizer = gin.external_configurable(
  optim.make_optimizer, module='calm_jax'
)


STAGES = ('model', 'classifier')
READS = (
  'calm_jax.train',
  'calm_jax.T5Config',
  'calm_jax.LlamaConfig',
  'calm_jax.make_optimizer',
  *settings.TRAIN_SETTINGS,
)


@gin.configurable(module='calm_jax')
def train(
  *,
  model_dir: str = gin.REQUIRED,
  mixture_or_task_name: str = gin.REQUIRED,
  model_config: Optional[model_files.Config] = None,
  optimizer=gin.REQUIRED,
  stage: str = 'model',
  batch_size: int = 64,
  num_train_steps: int = 1000,
  seed: int = 0,
  shuffle: bool = True,
  pack: bool = True,
  initial_checkpoint_path: Optional[str] = None,
  mesh_shape: Optional[Sequence[int]] = None,
  remat_policy: str = 'none',
  scan_layers: bool = False,
  parameter_partitioning_dims: int = 1,
  max_bad_steps: int = 0,
  checkpointing: Optional[settings.CheckpointSettings] = None,
  logging: Optional[settings.LogSettings] = None,
  loss: Optional[settings.LossSettings] = None,
  check_only: bool = False,
) -> Optional[trainer.TrainState]:
  """Trains into `model_dir` on a SeqIO task or mixture.

  stage 'model' trains the CALM network (model_config required); stage
  'classifier' trains the exit classifier of the model already in
  `model_dir`, backbone frozen, into MODEL_DIR/classifier.

  The run uses a (data, model) mesh of `mesh_shape` (default: every device
  on 'data'). `remat_policy` ('none', 'minimal', 'full') is what the model
  stage's layers keep for the backward pass: memory against recompute.
  `scan_layers` runs each stack's layers as one scan over
  parameters stacked on a 'layers' axis (t5x's), with the optimizer
  applied per layer. `pack` (as t5x's run configs) fills each row with several examples,
  each attending to itself only, instead of one example and padding.
  `parameter_partitioning_dims` 2 splits parameters and optimizer state
  over 'data' too (t5x's 2D parameter sharding, for XL and XXL); the
  checkpoints restore onto either layout. `batch_size` is the global
  batch: with several processes each reads batch_size / processes rows
  from its own shard of the data.

  A NaN or infinite step is not applied: the run stops (or skips up to
  `max_bad_steps`). The settings groups default to their gin bindings
  (calm_jax.CheckpointSettings, LogSettings, LossSettings). Every setting
  is checked before anything is read or written; `check_only` stops
  there.
  """
  checkpointing = (checkpointing or settings.CheckpointSettings()).check()
  logging = (logging or settings.LogSettings()).check()
  loss = (loss or settings.LossSettings()).check()
  arguments.choice('stage', stage, STAGES)
  arguments.check(
    num_train_steps=num_train_steps,
    batch_size=batch_size,
    max_bad_steps=max_bad_steps,
    seed=seed,
    mesh_shape=mesh_shape,
    remat_policy=remat_policy,
    parameter_partitioning_dims=parameter_partitioning_dims,
  )
  if stage == 'model' and model_config is None and not initial_checkpoint_path:
    raise errors.SettingError(
      'stage "model" needs a model config: add a gin/models/*.gin file'
    )
  files.check_writable_dir(model_dir, 'MODEL_DIR')
  if check_only:
    return None
  # One training per model dir at a time (readers take no lock).
  lock = locks.ModelDirLock(model_dir, f'training ({stage} stage)')
  if multihost.is_primary():
    lock.acquire()
  try:
    mesh = partitioning.make_mesh(mesh_shape)
    rules = partitioning.rules_for(parameter_partitioning_dims)
    local_batch = _local_batch_size(batch_size, mesh)
    if stage == 'model':
      objective = _model_stage(
        model_dir,
        mixture_or_task_name,
        model_config,
        loss,
        initial_checkpoint_path,
        remat_policy,
        scan_layers,
      )
      optimizer = dataclasses.replace(optimizer, per_layer=scan_layers)
      subdir = checkpoints.CHECKPOINT_SUBDIR
    else:
      objective = _classifier_stage(model_dir, mesh, rules)
      subdir = checkpoints.CLASSIFIER_SUBDIR
    writer = metric_writers.create_default_writer(
      files.join(model_dir, 'train' if stage == 'model' else subdir),
      just_logging=not multihost.is_primary(),
      asynchronous=False,
    )
    shard = pipeline.process_shard() if jax.process_count() > 1 else None
    batches_from = lambda start: pipeline.train_batches(
      mixture_or_task_name,
      batch_size=local_batch,
      seed=seed,
      start_step=start,
      shuffle=shuffle,
      shard=shard,
      pack=pack,
    )
    validation = lambda: pipeline.first_batches(
      mixture_or_task_name,
      'validation',
      batch_size=local_batch,
      batches_per_task=logging.eval_batches,
      shard=shard,
      pack=pack,
    )
    # One batch of each shape the run trains on: all compiled before step 1.
    shapes = lambda: pipeline.first_batches(
      mixture_or_task_name,
      'train',
      batch_size=local_batch,
      batches_per_task=1,
      shard=shard,
      pack=pack,
    )
    state = trainer.train_loop(
      objective=objective,
      optimizer=optimizer,
      model_dir=model_dir,
      batches_from=batches_from,
      num_steps=num_train_steps,
      checkpoint_period=checkpointing.period,
      keep_checkpoints=checkpointing.keep,
      log_every=logging.log_every,
      seed=seed,
      writer=writer,
      progress=logging.progress,
      checkpoint_subdir=subdir,
      mesh=mesh,
      rules=rules,
      max_bad_steps=max_bad_steps,
      restore_fallback=checkpointing.restore_fallback,
      validation_batches=validation,
      eval_every=logging.eval_every,
      shape_batches=shapes,
    )
    writer.flush()
    return state
  finally:
    lock.release()


def _local_batch_size(batch_size: int, mesh) -> int:
  """This process's rows of each global batch."""
  partitioning.check_batch_fits(batch_size, mesh)
  return multihost.local_batch_size(batch_size)


def initial_params_config(
  initial_checkpoint_path: str, model_config: Optional[model_files.Config]
) -> model_files.Config:
  """The config to fine-tune with: the initial model's, with the requested
  dropout and layout; other differences (dims, exits) are errors."""
  initial, _ = model_files.read_model_config(initial_checkpoint_path)
  if model_config is None:
    return initial
  free = ('dropout_rate', *layout.LAYOUT_FIELDS)
  if (
    dataclasses.replace(initial, **{k: getattr(model_config, k) for k in free})
    != model_config
  ):
    diff = {
      k: (v, getattr(model_config, k))
      for k, v in dataclasses.asdict(initial).items()
      if k not in free and getattr(model_config, k) != v
    }
    raise checkpoints.CheckpointError(
      f'{initial_checkpoint_path} holds another architecture than the '
      f'model config (initial, requested): {diff}'
    )
  return model_config


def _model_stage(
  model_dir,
  task,
  model_config,
  loss: settings.LossSettings,
  initial_checkpoint_path=None,
  remat_policy='none',
  scan_layers=False,
):
  """Checks and writes the model dir's files; the stage-1 objective."""
  if initial_checkpoint_path:
    model_config = initial_params_config(initial_checkpoint_path, model_config)
  model_config = dataclasses.replace(model_config, scan_layers=scan_layers)
  model_files.check_compatible(model_dir, model_config)
  pipeline.check_ready(task, 'train')  # before anything is written
  pipeline.check_vocab_fits(task, model_config.vocab_size)
  if multihost.is_primary():
    files.makedirs(model_dir)
    model_files.write_model_files(
      model_dir,
      model_config,
      pipeline.vocabulary_path(task),
      gin.operative_config_str(),
      pipeline.max_feature_lengths(task),
    )
  model = model_files.model_for(
    model_config,
    loss_weighting=loss.weighting,
    z_loss=loss.z_loss,
    exit_loss=loss.exit_loss,
    remat_policy=remat_policy,
  )
  objective = trainer.model_objective(model)
  if not initial_checkpoint_path:
    return objective
  # Used only when model_dir holds no checkpoint yet: a resumed fine-tune
  # restores its own latest step instead.
  load = lambda shardings: model_files.load_params(
    initial_checkpoint_path, model_config, shardings=shardings
  )[0]
  return dataclasses.replace(objective, load=load)


def _classifier_stage(model_dir, mesh, rules):
  """The stage-2 objective over the latest backbone in `model_dir`, placed
  on the mesh like a stage-1 run's parameters."""
  config, _ = model_files.read_model_config(model_dir)
  model = model_files.model_for(config)
  backbone, step = model_files.load_params(
    model_dir,
    config,
    shardings=partitioning.param_shardings(model.param_axes(), mesh, rules),
  )
  console.info(
    f'training the exit classifier on the frozen model of step {step}'
  )
  return trainer.classifier_objective(model, backbone)


def run(check_only: bool = False) -> None:
  train(check_only=check_only)
