"""Training entry point (t5x-style flags).

  python -m calm_jax.train \
    --gin_file=gin/models/calm_t5_1_1_tiny.gin --gin_file=gin/runs/train.gin \
    --gin.MODEL_DIR="'runs/x'" --gin.MIXTURE_OR_TASK_NAME="'synth_mix'"

Running the same command again resumes from the latest checkpoint at the same
data position; a finished run returns at once.
"""
import os
from typing import Mapping, Optional

import gin

from calm_jax import checkpoints
from calm_jax import gin_utils
from calm_jax import models
from calm_jax import network
from calm_jax import optim
from calm_jax import trainer

T5Config = gin.external_configurable(network.T5Config, module='calm_jax')
make_optimizer = gin.external_configurable(optim.make_optimizer,
                                           module='calm_jax')


@gin.configurable(module='calm_jax')
def train(*, model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          model_config: network.T5Config = gin.REQUIRED,
          optimizer=gin.REQUIRED,
          batch_size: int = 64, num_train_steps: int = 1000,
          checkpoint_period: int = 500, keep_checkpoints: int = 3,
          log_every: int = 50, seed: int = 0,
          loss_weighting: str = 'linear', z_loss: float = 1e-4,
          task_feature_lengths: Optional[Mapping[str, Mapping[str, int]]] = None,
          progress: bool = True) -> trainer.TrainState:
  """Trains a CALM model on a SeqIO task or mixture into `model_dir`."""
  from calm_jax import data  # TensorFlow only on the data path.
  from clu import metric_writers

  checkpoints.check_compatible(model_dir, model_config)
  vocab_path = data.vocabulary_path(mixture_or_task_name)
  data.check_vocab_fits(mixture_or_task_name, model_config.vocab_size)
  model = models.CalmModel(model_config, loss_weighting=loss_weighting,
                           z_loss=z_loss)
  os.makedirs(model_dir, exist_ok=True)
  checkpoints.write_model_files(model_dir, model_config, vocab_path,
                                gin.operative_config_str())
  writer = metric_writers.create_default_writer(
      os.path.join(model_dir, 'train'), just_logging=False,
      asynchronous=False)
  batches_from = lambda start: data.train_batches(
      mixture_or_task_name, batch_size=batch_size, seed=seed,
      start_step=start, lengths_override=task_feature_lengths)
  state = trainer.train_loop(
      model=model, optimizer=optimizer, model_dir=model_dir,
      batches_from=batches_from, num_steps=num_train_steps,
      checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints,
      log_every=log_every, seed=seed, writer=writer, progress=progress)
  writer.flush()
  return state


def user_errors() -> tuple[type[BaseException], ...]:
  from calm_jax import data
  return (data.DataError, checkpoints.CheckpointError, RuntimeError,
          ValueError)


def main() -> None:
  gin_utils.run(train, user_errors=user_errors())


if __name__ == '__main__':
  main()
