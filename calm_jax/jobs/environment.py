"""Run-wide settings every job reads before it starts (gin configurables).

- `calm_jax.distributed`: joins a multi-process run before anything
  touches a device;
- `calm_jax.data_settings`: where the paper tasks read T5's vocabulary and
  TFDS data, and per-task feature lengths.
"""

import gin

from calm_jax.parallel import multihost
from calm_jax.tasks import data_settings as settings

READS = ('calm_jax.data_settings', 'calm_jax.distributed')


@gin.configurable(module='calm_jax')
def data_settings(
  t5_vocabulary: str | None = None,
  tfds_data_dir: str | None = None,
  task_feature_lengths: dict | None = None,
) -> None:
  """Run-wide data settings (see calm_jax.tasks.data_settings): where the
  paper tasks read T5's vocabulary and TFDS data (None: the CALM_T5_VOCAB /
  TFDS_DATA_DIR environment, else T5's defaults), and per-task lengths,
  e.g. {'cnn_dailymail_v3': {'inputs': 1024, 'targets': 128}}."""
  settings.set_overrides(
    t5_vocabulary=t5_vocabulary,
    tfds_data_dir=tfds_data_dir,
    task_feature_lengths=task_feature_lengths,
  )


@gin.configurable(module='calm_jax')
def distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  coordinator_bind_address: str | None = None,
  auto: bool = False,
) -> bool:
  """Joins a multi-process run before anything touches a device (see
  multihost.initialize): from these bindings, else the CALM_COORDINATOR_*
  / CALM_NUM_PROCESSES / CALM_PROCESS_ID environment, else one process.
  `auto=True` lets JAX find a TPU pod slice or a SLURM / MPI cluster."""
  return multihost.initialize(
    coordinator_address,
    num_processes,
    process_id,
    coordinator_bind_address,
    auto,
  )


def setup() -> None:
  distributed()
  data_settings()
