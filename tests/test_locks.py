"""One training per model dir: a second writer meets one line naming the
holder; a lock left by a killed process is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from calm_jax.storage import locks

import entry_points  # tests/entry_points.py

HOLD = (
  'import sys, time\n'
  'from calm_jax.storage import locks\n'
  'lock = locks.ModelDirLock(sys.argv[1], "training (model stage)")\n'
  'lock.acquire()\n'
  'print("held", flush=True)\n'
  'time.sleep(120)\n'
)


@pytest.fixture
def holder(tmp_path):
  """A second process holding the lock of tmp_path/model."""
  model_dir = tmp_path / 'model'
  process = subprocess.Popen(
    [sys.executable, '-c', HOLD, str(model_dir)],
    stdout=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline().strip() == 'held'
  yield model_dir, process
  process.kill()
  process.wait()


def test_a_second_writer_is_refused_naming_the_holder(holder):
  model_dir, process = holder
  with pytest.raises(
    locks.LockedError,
    match=rf'{model_dir} is in use: training \(model stage\) by pid '
    rf'{process.pid} on host {socket.gethostname()} \(since ',
  ):
    locks.ModelDirLock(str(model_dir)).acquire()


def test_the_train_command_stops_in_one_line_and_writes_nothing(holder):
  model_dir, process = holder
  result = entry_points.run_module(
    'calm_jax.train',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.TRAIN_STEPS=2',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {model_dir} is in use: training') and (
    f'pid {process.pid}' in last
  )
  assert os.listdir(model_dir) == [locks.LOCK_FILE]


def test_a_lock_left_by_a_killed_process_is_taken_over(holder, capsys):
  model_dir, process = holder
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert os.path.exists(model_dir / locks.LOCK_FILE)  # never released
  with locks.ModelDirLock(str(model_dir)) as lock:
    assert lock.held
    assert f'left by pid {process.pid}' in capsys.readouterr().err
  # Released: the file is gone, the dir (made by the holder) stays.
  assert os.listdir(model_dir) == []


def test_release_removes_what_only_the_lock_made(tmp_path):
  model_dir = tmp_path / 'new'
  with locks.ModelDirLock(str(model_dir)):
    assert os.listdir(model_dir) == [locks.LOCK_FILE]
  assert not model_dir.exists()
  with locks.ModelDirLock(str(model_dir)):
    (model_dir / 'model.json').write_text('{}')
  assert os.listdir(model_dir) == ['model.json']
