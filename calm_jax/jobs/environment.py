"""Run-wide settings every job reads before it starts (gin configurables).

- `calm_jax.distributed`: joins a multi-process run before anything
  touches a device;
- `calm_jax.data_settings`: where the paper tasks read T5's vocabulary and
  TFDS data, and per-task feature lengths.
"""

import glob
import importlib.util
import os

import gin
import jax

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


# JAX plugins of other accelerators: with one installed, the platforms are
# JAX's to choose.
_GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin')


def _tpu_chip_present() -> bool:
  """TPU VMs expose their chips as /dev/accel* or VFIO groups."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def cpu_without_tpu_probe() -> bool:
  """On a machine with libtpu installed (the TPU extra) but no TPU chip
  and no GPU plugin, JAX would probe for a TPU at its first device use and
  print libtpu's errors before falling back to the CPU: there, JAX starts
  on the CPU. A JAX_PLATFORMS the user set is left alone. Whether it did."""
  if (
    'JAX_PLATFORMS' in os.environ or importlib.util.find_spec('libtpu') is None
  ):
    return False
  if _tpu_chip_present() or any(
    importlib.util.find_spec(name) for name in _GPU_PLUGINS
  ):
    return False
  jax.config.update('jax_platforms', 'cpu')
  return True


def setup(starts_tpu_compiler: bool = False) -> None:
  """Before a job starts: the platforms (the planner starts libtpu itself),
  the processes, the data settings."""
  if not starts_tpu_compiler:
    cpu_without_tpu_probe()
  distributed()
  data_settings()
