"""The command line: absl flags plus gin, one-line user errors, bugs kept."""

import subprocess
import sys
import time

import gin
import pytest

from calm_jax import cli
from calm_jax import errors

import entry_points  # tests/entry_points.py

_run = entry_points.run_module
DECODE = ['--gin_file=gin/runs/decode.gin', "--gin.MODEL_DIR='/nonexistent'"]


def _last_line(result) -> str:
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  'command',
  ['calm_jax.decode', 'calm_jax.train', 'calm_jax.calibrate', 'calm_jax.bench'],
)
def test_help_prints_at_once_without_tensorflow(command):
  code = (
    f'import sys, time; start = time.perf_counter(); '
    f'import runpy; sys.argv = ["x", "--help"]\n'
    f'try:\n  runpy.run_module("{command}", run_name="__main__")\n'
    f'except SystemExit as e:\n  code = e.code\n'
    f'print("TF", "tensorflow" in sys.modules, "JAX", "jax" in '
    f'sys.modules, "CODE", code, "SECONDS", time.perf_counter() - start)'
  )
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    check=False,
    timeout=60,
  )
  wall = time.perf_counter() - start
  assert result.returncode == 0, result.stderr
  assert 'flags:' in result.stdout and '--gin_file' in result.stdout
  assert result.stdout.splitlines()[0].strip()  # the command's summary
  assert 'TF False JAX False CODE 0' in result.stdout
  assert wall < 3.0, wall


def test_convert_and_flag_errors_do_not_load_tensorflow(tmp_path):
  """Every job is registered with gin before a config is parsed; none of
  them loads the SeqIO pipeline until it reads data."""
  code = (
    'import sys\nfrom calm_jax import cli\n'
    'codes = [cli.run_command("convert", "", ["--gin.MODEL_DIR=\'%s\'", '
    '"--gin.FROM_HF=\'%s\'"]), cli.run_command("decode", "", '
    '["--gin_file=gin/runs/decode.gin", "--gin.MODEL_DIR=\'m\'", '
    '"--gin.MIXTURE_OR_TASK_NAME=\'synth_qa\'", '
    '"--gin.THRESHOLD=-1"])]\n'
    'print("CODES", codes, "TF", "tensorflow" in sys.modules)'
    % (tmp_path / 'model', tmp_path / 'no_checkpoint')
  )
  result = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    check=False,
    timeout=120,
    cwd=entry_points.ROOT,
  )
  assert 'CODES [2, 2] TF False' in result.stdout, result.stderr[-2000:]
  assert 'no Hugging Face checkpoint at' in result.stderr
  assert 'threshold=-1 is out of range' in result.stderr


def test_a_misspelt_macro_exits_2_naming_the_close_match():
  result = _run('calm_jax.decode', *DECODE, '--gin.THRESHHOLD=0.9')
  assert result.returncode == 2
  assert _last_line(result).startswith(
    'error: --gin.THRESHHOLD is not used by calm_jax.decode (did you mean '
    'THRESHOLD?)'
  ), result.stderr


def test_a_misspelt_parameter_or_configurable_names_the_close_match():
  result = _run(
    'calm_jax.decode', *DECODE, '--gin.calm_jax.decode.thresold=0.9'
  )
  assert result.returncode == 2
  line = _last_line(result)
  assert "doesn't have a parameter named 'thresold'" in line
  assert '(did you mean threshold?)' in line
  assert "in the binding 'calm_jax.decode.thresold = 0.9'" in line
  result = _run(
    'calm_jax.decode', *DECODE, '--gin.calm_jax.DecodeInput.split="test"'
  )
  assert 'did you mean calm_jax.DecodeInputs' in _last_line(result)


def test_a_binding_the_job_does_not_read_is_an_error():
  result = _run('calm_jax.decode', *DECODE, '--gin.calm_jax.train.seed=3')
  assert result.returncode == 2
  assert _last_line(result).startswith(
    'error: --gin.calm_jax.train.seed: calm_jax.decode does not read '
    'calm_jax.train; it reads calm_jax.decode, '
  )


def test_gin_errors_name_the_file_and_line(tmp_path):
  bad = tmp_path / 'bad.gin'
  bad.write_text("include 'gin/runs/decode.gin'\nMODEL_DIR = 'x'\nfoo bar\n")
  result = _run('calm_jax.decode', f'--gin_file={bad}')
  assert result.returncode == 2
  line = _last_line(result)
  assert line.startswith('error: bad gin config: ') and 'line 3' in line
  assert str(bad) in line
  bad.write_text("MODEL_DIR = ('x'\n")
  result = _run('calm_jax.decode', f'--gin_file={bad}')
  assert result.returncode == 2 and 'unbalanced' in _last_line(result)


def test_required_settings_and_unknown_flags_are_one_line():
  result = _run('calm_jax.decode', '--gin_file=gin/runs/decode.gin')
  assert _last_line(result) == (
    'error: MODEL_DIR is required: set it with `--gin.MODEL_DIR=VALUE`'
  )
  # A run file without the model file its %MODEL_CONFIG comes from, and a
  # macro no file binds: one line each, not gin's traceback.
  result = _run('calm_jax.train', '--gin_file=gin/runs/train.gin')
  assert result.returncode == 2
  assert _last_line(result).startswith(
    'error: %MODEL_CONFIG is used but never set: stack a gin/models/*.gin'
  )
  result = _run(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    '--gin.MODEL_DIR=%NOWHERE',
  )
  assert result.returncode == 2
  assert _last_line(result) == (
    'error: %NOWHERE is used but never set: set it with `--gin.NOWHERE=VALUE`'
  )
  result = _run('calm_jax.decode', '--gin_fil=x.gin')
  assert result.returncode == 2
  assert _last_line(result).startswith(
    'error: unknown flag --gin_fil (did you mean gin_file?)'
  )
  result = _run('calm_jax.decode', '--gin.NAME')
  assert _last_line(result) == (
    "error: '--gin.NAME': expected --gin.NAME=VALUE"
  )


def test_bugs_keep_their_traceback(monkeypatch):
  from calm_jax.jobs import decode  # pylint: disable=g-import-not-at-top

  def broken():
    raise KeyError('an internal bug')

  monkeypatch.setattr(decode, 'run', broken)
  with pytest.raises(KeyError, match='an internal bug'):
    cli.run_command(
      'decode', '', ['--gin_file=gin/runs/decode.gin', "--gin.MODEL_DIR='x'"]
    )
  result = _run(
    'calm_jax.decode', '--gin_file=gin/runs/decode.gin', "--gin.MODEL_DIR='x'"
  )
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and 'KeyError' in result.stderr


def test_user_errors_are_one_class():
  from calm_jax.data import task_info  # pylint: disable=g-import-not-at-top
  from calm_jax.storage import checkpoints  # pylint: disable=g-import-not-at-top
  from calm_jax.storage import files  # pylint: disable=g-import-not-at-top
  from calm_jax.storage import provenance  # pylint: disable=g-import-not-at-top

  for error in (
    errors.SettingError,
    task_info.DataError,
    checkpoints.CheckpointError,
    files.FileError,
    provenance.ProvenanceError,
    cli.UsageError,
    errors.SettingError,
  ):
    assert issubclass(error, errors.UserError), error


def test_parse_leaves_a_fresh_config():
  cli.parse(['--gin_file=gin/runs/decode.gin', "--gin.MODEL_DIR='a'"])
  assert gin.query_parameter('calm_jax.decode.model_dir')
  cli.parse(
    [
      '--gin_file=gin/runs/calibrate.gin',
      "--gin.MODEL_DIR='b'",
      "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
      '--gin.DELTA=0.1',
    ]
  )
  with pytest.raises(ValueError):
    gin.query_parameter('calm_jax.decode.threshold')
  gin.clear_config()
