"""A job's first line is its own: no TensorFlow or libtpu start-up lines on
stderr of a CPU machine, and a warning worth acting on still shows."""

import os
import subprocess
import sys

import pytest

from calm_jax import console
from calm_jax.planning import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stderr_of(code: str, **env) -> subprocess.CompletedProcess:
  clean = {
    k: v
    for k, v in os.environ.items()
    if k not in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS', 'PYTHONPATH')
  }
  return subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env={**clean, **env},
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )


def test_the_data_pipeline_starts_tensorflow_quietly():
  result = _stderr_of('from calm_jax.data import pipeline')
  assert result.stderr == ''


@pytest.mark.skipif(
  not (tpu.DEFAULT_LIBTPU_DIR / 'libtpu').is_dir(),
  reason='libtpu is not in .tpu/ (make tpu-plan installs it)',
)
def test_with_libtpu_installed_a_cpu_machine_starts_on_the_cpu():
  code = (
    'from calm_jax.jobs import environment\n'
    'assert environment.cpu_without_tpu_probe()\n'
    'import jax; print(jax.devices()[0].platform)'
  )
  result = _stderr_of(code, PYTHONPATH=str(tpu.DEFAULT_LIBTPU_DIR))
  assert (result.stdout.strip(), result.stderr) == ('cpu', '')


def test_start_up_noise_is_hidden_and_other_lines_kept(capfd):
  with console.native_stderr_hidden(console.START_UP_NOISE):
    os.write(
      2,
      b'WARNING: All log messages before absl::InitializeLog() is called '
      b'are written to STDERR\n'
      b'I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\n'
      b'E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: '
      b'INTERNAL: CUDA error\n'
      b'W0000 00:00:1.0 1 disk.cc:1] the disk is nearly full\n',
    )
  assert capfd.readouterr().err == (
    'W0000 00:00:1.0 1 disk.cc:1] the disk is nearly full\n'
  )
