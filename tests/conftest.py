"""Test-wide settings: no network (TFDS would retry downloads for minutes),
a persistent compilation cache, fast compiles, bf16 rounded at every op."""

import os
import pathlib
import socket
import sys

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# bfloat16 rounded at every op, as the bf16 tests compare two programs token
# for token (no effect on float32). Subprocesses inherit it.
if '--xla_allow_excess_precision' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_allow_excess_precision=false'
  ).strip()
# Tests compile many small programs; XLA's backend optimisation level 0
# compiles them about 30% faster (measured on test_decoding and test_bf16)
# and changes no result a test checks. CALM_TEST_FAST_COMPILE=0 compiles as
# the jobs do.
# LLVM's expensive passes off too: cold-cache `make test` 9:30 and 9:25
# with it, 10:07 without (all passing; spread between runs about 20 s).
FAST_COMPILE_FLAGS = (
  '--xla_backend_optimization_level=0',
  '--xla_llvm_disable_expensive_passes=true',
)
if os.environ.get('CALM_TEST_FAST_COMPILE', '1') != '0':
  for _flag in FAST_COMPILE_FLAGS:
    if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
      os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' ' + _flag
      ).strip()
# transformers must never look for files on the Hub.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# XLA programs are cached in the tests' venv (beside the interpreter), for
# this process and the subprocesses it starts: a program compiled once, in
# any test or any run, is loaded instead of compiled again. Set before JAX
# is imported; CALM_TEST_COMPILATION_CACHE=0 turns it off.
if os.environ.get('CALM_TEST_COMPILATION_CACHE', '1') != '0':
  _CACHE = pathlib.Path(sys.prefix) / 'jax-compilation-cache'
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(_CACHE))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

_real_connect = socket.socket.connect


def _local_only_connect(self, address):
  host = address[0] if isinstance(address, tuple) else address
  if isinstance(host, str) and (
    host.startswith('127.')
    or host in ('localhost', '::1')
    or self.family == socket.AF_UNIX
  ):
    return _real_connect(self, address)
  raise OSError(f'network disabled in tests (tried {address!r})')


@pytest.fixture(autouse=True, scope='session')
def no_network():
  socket.socket.connect = _local_only_connect
  yield
  socket.socket.connect = _real_connect


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory):
  """A tiny model trained for 3 steps on synth_qa, with an exit classifier
  (2 steps), made once per test session through the train command. Tests
  that write into a model dir take a copy (`shutil.copytree`)."""
  import entry_points  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp('tiny_model') / 'model'
  common = [
    f"--gin.MODEL_DIR='{path}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.BATCH_SIZE=8',
    '--gin.calm_jax.LogSettings.progress=False',
  ]
  result = entry_points.run_module(
    'calm_jax.train',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    '--gin.TRAIN_STEPS=3',
    *common,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  result = entry_points.run_module(
    'calm_jax.train',
    '--gin_file=gin/runs/train_classifier.gin',
    '--gin.TRAIN_STEPS=2',
    *common,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return path


# `make test` runs `-n 2 --dist loadfile`: xdist hands whole files to its two
# workers in collection order, so a long file collected late can run alone
# at the end while the other worker idles. The files that took 40 s or more
# in a cold-cache run on this 2-core machine go first, longest first.
LONGEST_FILES_FIRST = (
  'test_scale_out.py',
  'test_plan.py',
  'test_speculative.py',
  'test_scan_layers.py',
  'test_models.py',
  'test_llama.py',
  'test_bf16.py',
  'test_faults.py',
  'test_decoding.py',
  'test_engine.py',
  'test_provenance.py',
  'test_decoder_only_jobs.py',
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
