"""t5x-style command lines for the entry points.

  --gin_file=PATH        (repeatable) config files, stacked in order
  --gin.NAME=VALUE       (repeatable) bindings, e.g. --gin.MODEL_DIR="'runs/x'"
  --gin_search_paths=A,B where `include` and --gin_file look for files

Every user error ends as one line on stderr and a non-zero exit. Any entry
point accepts any config: the configurables of all of them are registered
before parsing, so one experiment file can hold a task's training, decoding
and calibration settings.
"""
import importlib
import os
import pathlib
import sys
from typing import Callable, Sequence

import gin

from calm_jax.parallel import multihost
from calm_jax.tasks import data_settings as settings

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The jobs' configurables: every entry point accepts any of them.
CONFIGURABLE_MODULES = ('calm_jax.jobs.train', 'calm_jax.jobs.decode',
                        'calm_jax.jobs.calibrate', 'calm_jax.jobs.demo')


@gin.configurable(module='calm_jax')
def data_settings(t5_vocabulary: str | None = None,
                  tfds_data_dir: str | None = None,
                  task_feature_lengths: dict | None = None) -> None:
  """Run-wide data settings (see tasks/data_settings.py): where the paper
  tasks read T5's vocabulary and TFDS data (None: the CALM_T5_VOCAB /
  TFDS_DATA_DIR environment, else T5's defaults), and per-task lengths,
  e.g. {'cnn_dailymail_v3': {'inputs': 1024, 'targets': 128}}."""
  settings.set_overrides(t5_vocabulary=t5_vocabulary,
                         tfds_data_dir=tfds_data_dir,
                         task_feature_lengths=task_feature_lengths)


@gin.configurable(module='calm_jax')
def distributed(coordinator_address: str | None = None,
                num_processes: int | None = None,
                process_id: int | None = None,
                coordinator_bind_address: str | None = None,
                auto: bool = False) -> bool:
  """Joins a multi-process run before anything touches a device (see
  multihost.initialize): from these bindings, else the CALM_COORDINATOR_*
  / CALM_NUM_PROCESSES / CALM_PROCESS_ID environment, else one process.
  `auto=True` lets JAX find a TPU pod slice or a SLURM / MPI cluster."""
  return multihost.initialize(coordinator_address, num_processes, process_id,
                              coordinator_bind_address, auto)


class UsageError(ValueError):
  """Bad command line or config."""


def split_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """argv -> (gin files, bindings, search paths); unknown flags are errors."""
  files, bindings, paths = [], [], []
  for arg in argv:
    if arg.startswith('--gin_file='):
      files.append(arg.split('=', 1)[1])
    elif arg.startswith('--gin.'):
      name, _, value = arg[len('--gin.'):].partition('=')
      if not value:
        raise UsageError(f'{arg!r}: expected --gin.NAME=VALUE')
      bindings.append(f'{name} = {value}')
    elif arg.startswith('--gin_search_paths='):
      paths += [p for p in arg.split('=', 1)[1].split(',') if p]
    else:
      raise UsageError(f'unknown flag {arg!r}; use --gin_file=..., '
                       '--gin.NAME=VALUE, --gin_search_paths=...')
  return files, bindings, paths


def _resolve(path: str, search_paths: Sequence[str]) -> str:
  for root in ['', *search_paths]:
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  raise UsageError(f'gin file not found: {path} (searched: '
                   f'{", ".join(["."] + list(search_paths))})')


def _register_configurables() -> None:
  for module in CONFIGURABLE_MODULES:
    importlib.import_module(module)


def parse(argv: Sequence[str]) -> None:
  """Parses gin files and bindings from argv (program name excluded)."""
  files, bindings, paths = split_flags(argv)
  paths = [*paths, str(REPO_ROOT)]
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [_resolve(f, paths) for f in files]
  _register_configurables()
  try:
    gin.parse_config_files_and_bindings(files, bindings,
                                        finalize_config=True)
  except (ValueError, IOError, SyntaxError) as e:
    message = ' '.join(str(e).split('\n')[:1]) or type(e).__name__
    raise UsageError(f'bad gin config: {message}') from e


def run(main: Callable[[], object], argv: Sequence[str] | None = None,
        user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """Parses flags, runs main(); user errors print one line and exit 2."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    parse(argv)
    distributed()
    data_settings()
    main()
  except (UsageError, *user_errors) as e:
    text = str(e).strip().splitlines()
    print(f'error: {text[0] if text else type(e).__name__}', file=sys.stderr)
    sys.exit(2)
