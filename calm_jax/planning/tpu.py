"""The TPU compiler on a machine without a TPU: libtpu found, started
quietly, and a topology's devices to compile for.

libtpu compiles for any topology on a CPU machine; nothing runs on a chip.
It is found as an installed `libtpu` package or in the folder named by
CALM_LIBTPU_DIR (`make tpu-plan` installs it in `.tpu/`, outside the
environment the other jobs import from, so that they never start the TPU
runtime; see `jobs.environment`).
"""

import functools
import importlib.util
import os
import pathlib
import sys

from calm_jax import console
from calm_jax import errors
from calm_jax.planning import chips

LIBTPU_DIR_VARIABLE = 'CALM_LIBTPU_DIR'
DEFAULT_LIBTPU_DIR = pathlib.Path(__file__).resolve().parents[2] / '.tpu'


class NoTpuCompilerError(errors.UserError, RuntimeError):
  """libtpu is not installed where the planner looks."""


def _libtpu_folder() -> str | None:
  """The folder that holds the `libtpu` package, or None."""
  for folder in (os.environ.get(LIBTPU_DIR_VARIABLE), DEFAULT_LIBTPU_DIR):
    if folder and (pathlib.Path(folder) / 'libtpu').is_dir():
      return str(folder)
  spec = importlib.util.find_spec('libtpu')
  if spec is not None and spec.origin:
    return str(pathlib.Path(spec.origin).parents[1])
  return None


def start(topology_name: str) -> chips.Topology:
  """Makes libtpu importable and starts JAX's backends quietly, before
  anything else touches them: libtpu is told the slice it compiles for
  (it warns at start-up otherwise), and its start-up lines on a machine
  without a chip are hidden. Programs still run on the CPU."""
  topology = chips.parse_topology(topology_name)
  folder = _libtpu_folder()
  if folder is None:
    raise NoTpuCompilerError(
      'the TPU compiler (libtpu) is not installed: `make tpu-plan` installs '
      f'it in .tpu/, or set {LIBTPU_DIR_VARIABLE} to a folder made with '
      "`pip install --no-deps --target DIR 'libtpu==0.0.42.*'`"
    )
  if folder not in sys.path:
    sys.path.insert(0, folder)
  # What libtpu reads when it starts: the slice it is on, one host, and
  # that several processes may hold it at once (parallel tests).
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', topology.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax  # pylint: disable=g-import-not-at-top

  # A TPU program cannot be stored or loaded by a process with no TPU
  # client (libtpu refuses to deserialise it), and a persistent cache set
  # for CPU programs would receive them: the planner compiles afresh.
  jax.config.update('jax_enable_compilation_cache', False)
  with console.native_stderr_hidden():
    jax.devices()  # the TPU backend finds no chip here, the CPU is default
  return topology


@functools.lru_cache(maxsize=None)
def devices(topology_name: str) -> tuple:
  """The JAX devices of a TPU topology (compile targets, no hardware),
  e.g. 'v5e:16x16' -> 256 devices."""
  topology = start(topology_name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    with console.native_stderr_hidden():
      desc = topologies.get_topology_desc(
        platform='tpu', topology_name=topology.name
      )
  except Exception as e:  # pylint: disable=broad-except
    if 'INVALID_ARGUMENT' not in str(e):
      raise
    raise errors.SettingError(
      f'topology {topology.name}: the TPU compiler refuses it: '
      f'{errors.first_line(e)}'
    ) from e
  return tuple(desc.devices)
