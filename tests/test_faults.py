"""Fault injection: divergence, damaged checkpoints, corrupt files and bad
flags stop cleanly, and the last good state survives."""

import json
import pathlib
import threading

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax import errors
from calm_jax.jobs import settings
from calm_jax.jobs import train
from calm_jax.model import model_files
from calm_jax.model import network
from calm_jax.storage import checkpoints
from calm_jax.storage import files
from calm_jax.training import trainer

import entry_points  # tests/entry_points.py

SIZE = 4096


def _objective():
  """Least squares of a vector to each batch's rows (4,096 values, so that
  its data file is the checkpoint's largest); NaN rows make the loss and
  gradients NaN."""

  def loss(params, batch, rng):
    del rng
    value = jnp.mean(jnp.square(params['w'] - batch['x']))
    return value, {'loss': value}

  return trainer.Objective(
    init=lambda rng: {'w': jnp.zeros(SIZE)}, loss=loss, exit_layers=()
  )


def _batches(bad_steps=()):
  def batches_from(start):
    for step in range(start + 1, 1000):
      x = np.random.RandomState(step).randn(2, SIZE).astype(np.float32)
      if step in bad_steps:
        x[0, 0] = np.nan
      yield {'x': x}

  return batches_from


def _train(model_dir, steps, bad_steps=(), **kwargs):
  kwargs = {'checkpoint_period': 3, 'keep_checkpoints': 3, **kwargs}
  return trainer.train_loop(
    objective=_objective(),
    optimizer=optax.sgd(0.1),
    model_dir=str(model_dir),
    batches_from=_batches(bad_steps),
    num_steps=steps,
    progress=False,
    log_every=100,
    **kwargs,
  )


def _steps(model_dir):
  root = pathlib.Path(model_dir) / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _params(model_dir, step=None):
  mgr = checkpoints.manager(str(model_dir))
  target = {'w': jnp.zeros(SIZE)}
  restored, step = checkpoints.restore_verified(mgr, step, params=target)
  mgr.close()
  return np.asarray(restored['params']['w']), step


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path):
  with pytest.raises(
    trainer.NonFiniteStepError,
    match=r'^step 5: the loss or the gradients are NaN .*'
    r'last good checkpoint: .*checkpoints/3\)',
  ):
    _train(tmp_path, 9, bad_steps=(5,))
  assert _steps(tmp_path) == [3]  # nothing saved after the bad step
  w, _ = _params(tmp_path)
  assert np.all(np.isfinite(w))
  # The next normal run resumes from the good step and finishes.
  state = _train(tmp_path, 9)
  assert int(state.step) == 9 and _steps(tmp_path) == [3, 6, 9]


def test_bad_steps_can_be_skipped_up_to_a_limit(tmp_path):
  state = _train(tmp_path / 'skip', 6, bad_steps=(2, 4), max_bad_steps=2)
  clean = _train(tmp_path / 'clean', 6)
  w = np.asarray(state.params['w'])
  assert np.all(np.isfinite(w))
  assert not np.allclose(w, np.asarray(clean.params['w']))  # 2 updates fewer
  with pytest.raises(trainer.NonFiniteStepError, match='^step 4'):
    _train(tmp_path / 'limit', 6, bad_steps=(2, 4), max_bad_steps=1)


def test_retention_keeps_only_finite_checkpoints(tmp_path):
  # keep 3: before the guard, three NaN periods pushed out every good one.
  _train(tmp_path, 9)
  with pytest.raises(trainer.NonFiniteStepError):
    _train(tmp_path, 18, bad_steps=range(10, 19))
  assert _steps(tmp_path) == [3, 6, 9]
  for step in (3, 6, 9):
    assert np.all(np.isfinite(_params(tmp_path, step)[0]))


def test_saving_non_finite_values_is_refused(tmp_path):
  mgr = checkpoints.manager(str(tmp_path))
  with pytest.raises(checkpoints.NonFiniteError, match='step 1: params'):
    checkpoints.save(
      mgr, 1, {'w': jnp.array([1.0, jnp.nan])}, {'m': jnp.zeros(2)}
    )
  mgr.close()
  assert _steps(tmp_path) == []


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array data file (OCDBT 'd/' files) of the parameters."""
  return max(
    (
      p
      for p in (step_dir / 'params').rglob('*')
      if p.is_file() and p.parent.name == 'd'
    ),
    key=lambda p: p.stat().st_size,
  )


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle, min(middle + 64, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize('damage', [_flip, _truncate])
def test_a_damaged_latest_checkpoint_is_reported_and_the_one_before_used(
  tmp_path, damage, capsys
):
  _train(tmp_path, 6)
  before, _ = _params(tmp_path, 3)
  damage(_largest_file(tmp_path / 'checkpoints' / '6'))
  w, step = _params(tmp_path)  # decode and generate load this way
  assert step == 3 and np.array_equal(w, before)
  assert 'checkpoints/6 is damaged' in capsys.readouterr().err
  with pytest.raises(checkpoints.CheckpointError, match='6 is damaged'):
    _params(tmp_path, 6)
  with pytest.raises(checkpoints.CheckpointError, match='6 is damaged'):
    _train(tmp_path, 9, restore_fallback=False)
  assert _steps(tmp_path) == [3, 6]  # nothing deleted
  # Training resumes from 3, moves 6 aside (kept), and saves 6 and 9 anew.
  state = _train(tmp_path, 9)
  assert int(state.step) == 9 and _steps(tmp_path) == [3, 6, 9]
  assert (tmp_path / 'damaged' / 'checkpoints-6').is_dir()
  assert _params(tmp_path)[1] == 9


def test_a_reader_beside_a_writer_keeping_one_step_never_fails(tmp_path):
  """Loads in a loop while training saves every step and keeps only the
  newest: a step deleted under a reader is listed again, not an error."""
  _train(tmp_path, 1, checkpoint_period=1, keep_checkpoints=1)
  training, loads, failures = threading.Event(), [], []

  def read():
    while training.is_set():
      try:
        w, step = _params(tmp_path)
        loads.append((step, bool(np.all(np.isfinite(w)))))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f'{type(e).__name__}: {errors.first_line(e)}')

  training.set()
  reader = threading.Thread(target=read)
  reader.start()
  try:
    _train(tmp_path, 120, checkpoint_period=1, keep_checkpoints=1)
  finally:
    training.clear()
    reader.join()
  assert not failures, (len(failures), len(loads), failures[:3])
  assert len(loads) > 20 and all(finite for _, finite in loads)
  assert len({step for step, _ in loads}) > 5  # it read a moving target


def test_checkpoints_without_a_manifest_are_checked_for_finite_values(tmp_path):
  _train(tmp_path, 3)
  manifest = pathlib.Path(f'{tmp_path}/checkpoints.manifests/3.json')
  assert set(json.loads(manifest.read_text())) == {
    'step',
    'params',
    'opt_state',
  }
  manifest.unlink()  # as written before manifests existed
  w, step = _params(tmp_path)
  assert step == 3 and np.all(np.isfinite(w))


def test_corrupt_json_names_the_file_and_the_fix(tmp_path):
  (tmp_path / 'model.json').write_text('{"config": {"vocab')
  with pytest.raises(
    checkpoints.CheckpointError,
    match=f'{tmp_path}/model.json is not valid JSON',
  ):
    model_files.read_model_config(str(tmp_path))
  (tmp_path / 'record.json').write_text('{"threshold": 0.')
  with pytest.raises(files.FileError, match='record.json is not valid JSON'):
    files.read_json(str(tmp_path / 'record.json'), what='calibration record')


@pytest.mark.parametrize(
  'meta, message',
  [
    (
      {'config': {'vocab_size': 64, 'colour': 'red'}, 'vocabulary': 'v'},
      r"unknown config fields \['colour'\]",
    ),
    ({'config': {'vocab_size': 64}}, 'lacks "config" or "vocabulary"'),
    (
      {'config': {'vocab_size': 64, 'first_exit': 0}, 'vocabulary': 'v'},
      'first_exit=0 is out of range: valid',
    ),
  ],
)
def test_a_model_json_with_bad_fields_is_one_named_error(
  tmp_path, meta, message
):
  (tmp_path / 'model.json').write_text(json.dumps(meta))
  with pytest.raises(
    checkpoints.CheckpointError, match=f'{tmp_path}/model.json.*{message}'
  ):
    model_files.read_model_config(str(tmp_path))


TINY = network.T5Config(
  vocab_size=1024,
  emb_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_encoder_layers=2,
  num_decoder_layers=4,
)


@pytest.mark.parametrize(
  'flags, message',
  [
    ({'num_train_steps': -5}, 'num_train_steps=-5 is out of range'),
    ({'num_train_steps': 0}, 'num_train_steps=0 is out of range'),
    ({'num_train_steps': 32.5}, 'num_train_steps must be an integer'),
    ({'batch_size': 0}, 'batch_size=0 is out of range'),
    ({'batch_size': 'eight'}, "batch_size must be an integer, got 'eight'"),
    (
      {'checkpointing': settings.CheckpointSettings(period=0)},
      r'CheckpointSettings.period=0 is out of range',
    ),
    (
      {'loss': settings.LossSettings(weighting='bogus')},
      r"unknown LossSettings.weighting 'bogus'; valid: linear, uniform",
    ),
    (
      {'loss': settings.LossSettings(z_loss=float('nan'))},
      r'LossSettings.z_loss must be a finite number, got nan',
    ),
  ],
)
def test_bad_training_flags_are_refused_before_anything_is_written(
  tmp_path, flags, message
):
  model_dir = tmp_path / 'model'
  settings = dict(
    model_dir=str(model_dir),
    mixture_or_task_name='synth_qa',
    model_config=TINY,
    optimizer=optax.sgd(0.1),
  )
  with pytest.raises(errors.SettingError, match=message):
    train.train(**{**settings, **flags})
  assert not model_dir.exists()


@pytest.mark.slow
def test_a_diverging_run_exits_2_and_the_next_run_works(tmp_path):
  model_dir = tmp_path / 'model'
  flags = [
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.BATCH_SIZE=8',
    '--gin.calm_jax.CheckpointSettings.period=3',
    '--gin.calm_jax.LogSettings.progress=False',
  ]
  diverged = entry_points.run_module(
    'calm_jax.train', *flags, '--gin.LEARNING_RATE=1e30', '--gin.TRAIN_STEPS=6'
  )
  assert diverged.returncode == 2, diverged.stderr[-2000:]
  last = diverged.stderr.strip().splitlines()[-1]
  assert last.startswith('error: step ') and 'NaN or infinite' in last, last
  assert not (model_dir / 'checkpoints').exists() or not any(
    p.name.isdigit() for p in (model_dir / 'checkpoints').iterdir()
  )
  normal = entry_points.run_module(
    'calm_jax.train', *flags, '--gin.TRAIN_STEPS=3'
  )
  assert normal.returncode == 0, normal.stderr[-2000:]
  assert _steps(model_dir) == [3]


# --- model dirs and their files, through the commands ----------------------

TRAIN = [
  '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
  '--gin_file=gin/runs/train.gin',
  "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
  '--gin.BATCH_SIZE=8',
  '--gin.TRAIN_STEPS=2',
  '--gin.calm_jax.LogSettings.progress=False',
]


def _last(result) -> str:
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('layout', ['file', 'under_file'])
def test_a_model_dir_that_cannot_be_a_directory_is_one_line(tmp_path, layout):
  blocker = tmp_path / 'blocker'
  blocker.write_text('not a directory')
  model_dir = blocker if layout == 'file' else blocker / 'model'
  result = entry_points.run_module(
    'calm_jax.train', *TRAIN, f"--gin.MODEL_DIR='{model_dir}'"
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert _last(result) == (
    f'error: MODEL_DIR {model_dir} cannot be a directory: {blocker} is a file'
  )
  assert blocker.read_text() == 'not a directory'


def _read_only(path: pathlib.Path):
  """Makes `path` unwritable even for root (immutable), or skips."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  path.chmod(0o555)
  if os.access(path, os.W_OK):
    if (
      subprocess.run(
        ['chattr', '+i', str(path)], capture_output=True, check=False
      ).returncode
      != 0
    ):
      pytest.skip('cannot make a directory read-only here')
  return lambda: (
    subprocess.run(
      ['chattr', '-i', str(path)], capture_output=True, check=False
    ),
    path.chmod(0o755),
  )


def test_a_read_only_model_dir_is_one_line_and_nothing_changes(
  tiny_model_dir, tmp_path
):
  import shutil  # pylint: disable=g-import-not-at-top

  model_dir = tmp_path / 'model'
  shutil.copytree(tiny_model_dir, model_dir)
  before = sorted(str(p) for p in model_dir.rglob('*'))
  restore = _read_only(model_dir)
  try:
    trained = entry_points.run_module(
      'calm_jax.train',
      *TRAIN,
      f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.TRAIN_STEPS=5',
    )
    decoded = entry_points.run_module(
      'calm_jax.decode',
      '--gin_file=gin/runs/decode.gin',
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
      '--gin.THRESHOLD=0.5',
    )
  finally:
    restore()
  for result in (trained, decoded):
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'is not writable' in _last(result), _last(result)
  assert sorted(str(p) for p in model_dir.rglob('*')) == before


def test_corrupt_records_and_cache_entries_are_named_or_decoded_again(
  tiny_model_dir, tmp_path
):
  import shutil  # pylint: disable=g-import-not-at-top

  model_dir = tmp_path / 'model'
  shutil.copytree(tiny_model_dir, model_dir)
  calibrate = [
    '--gin_file=gin/runs/calibrate.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.DELTA=0.3',
    '--gin.EPSILON=0.2',
    '--gin.calm_jax.calibrate.num_examples=4',
    '--gin.calm_jax.calibrate.grid_step=0.5',
  ]
  assert (
    entry_points.run_module('calm_jax.calibrate', *calibrate).returncode == 0
  )
  [record] = (model_dir / 'calibration').glob('synth_qa_*.json')
  cache = sorted((model_dir / 'calibration' / 'cache').glob('*.json'))
  cache[0].write_text(cache[0].read_text()[:40])  # truncated on disk
  again = entry_points.run_module('calm_jax.calibrate', *calibrate)
  assert again.returncode == 0, again.stderr[-2000:]
  assert (
    'warning: decode cache entry' in again.stderr
    and 'ignored; decoding again' in again.stderr
  )
  assert json.loads(cache[0].read_text())['outputs']  # written whole again
  record.write_text(record.read_text()[:30])
  decoded = entry_points.run_module(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
  )
  assert decoded.returncode == 2
  assert _last(decoded).startswith(
    f'error: calibration record {record} is not valid JSON'
  )
  record.unlink()  # the fix the message names; then decode works again
  assert (
    entry_points.run_module(
      'calm_jax.decode',
      '--gin_file=gin/runs/decode.gin',
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
      '--gin.calm_jax.DecodeInputs.num_examples=2',
    ).returncode
    == 0
  )


def test_files_go_through_epath(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top

  root = epath.Path(tmp_path) / 'dir'
  files.atomic_write_json(root / 'a.json', {'x': float('nan')})
  assert files.read_json(root / 'a.json') == {'x': None}
  assert files.listdir(root) == ['a.json']
  assert files.glob(str(root), '*.json') == [str(root / 'a.json')]
  files.copy_file(root / 'a.json', files.join(str(tmp_path), 'b', 'c.json'))
  assert files.read_json(tmp_path / 'b' / 'c.json') == {'x': None}
  files.move(tmp_path / 'b', tmp_path / 'moved' / 'b')
  assert files.exists(tmp_path / 'moved' / 'b' / 'c.json')
  assert files.local_copy(str(root / 'a.json')) == str(root / 'a.json')
  with pytest.raises(files.FileError, match='does not exist: write it'):
    files.read_text(
      tmp_path / 'none.txt', what='model file', recovery='write it'
    )
  assert not files.is_local('gs://bucket/model') and files.is_local(root)
