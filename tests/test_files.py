"""files.py: whole-or-nothing writes under concurrent writers and readers."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from calm_jax.storage import files


def _writer(path: str, tag: int, rounds: int) -> int:
  errors = 0
  for i in range(rounds):
    try:
      files.atomic_write_json(path, {'tag': tag, 'i': i, 'pad': 'x' * 20000})
    except OSError:
      errors += 1
  return errors


def test_two_writers_and_a_reader_never_see_a_partial_file(tmp_path):
  path = str(tmp_path / 'record.json')
  files.atomic_write_json(path, {'tag': -1, 'i': 0, 'pad': ''})
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(2) as pool:
    pending = [pool.apply_async(_writer, (path, tag, 150)) for tag in (0, 1)]
    reads = partial = 0
    while not all(p.ready() for p in pending):
      with open(path) as f:
        text = f.read()
      reads += 1
      try:
        json.loads(text)
      except json.JSONDecodeError:
        partial += 1
    assert [p.get() for p in pending] == [0, 0]  # no writer failed
  assert reads > 0 and partial == 0
  assert json.loads(open(path).read())['i'] == 149
  assert [p for p in os.listdir(tmp_path) if p != 'record.json'] == []


def test_json_holds_no_nan_and_a_failed_write_leaves_nothing(tmp_path):
  path = tmp_path / 'summary.json'
  files.atomic_write_json(
    str(path), {'value': float('nan'), 'rows': [1.0, float('inf')]}
  )
  assert path.read_text() == (
    '{\n  "value": null,\n  "rows": [\n    1.0,\n    null\n  ]\n}\n'
  )
  files.atomic_write_jsonl(
    str(tmp_path / 'a.jsonl'), [{'x': float('nan')}, {'x': 1}]
  )
  assert (tmp_path / 'a.jsonl').read_text() == '{"x": null}\n{"x": 1}\n'

  def fail(tmp):
    open(tmp, 'w').write('half')
    raise RuntimeError('disk gone')

  with pytest.raises(RuntimeError):
    files.atomic_write(str(tmp_path / 'b.txt'), fail)
  assert sorted(os.listdir(tmp_path)) == ['a.jsonl', 'summary.json']


_KILLED_WRITER = """
import sys, time
from calm_jax.storage import files
def fill(staging):
  open(staging + '/params', 'w').write('half')
  print('filling', flush=True)
  time.sleep(600)
files.new_directory(sys.argv[1], fill)
"""


def test_a_killed_writers_staging_dir_is_removed_by_the_next(tmp_path, capsys):
  """kill -9 in the middle of a new directory (a convert) leaves a hidden
  staging dir; the next write of that directory removes it, in one line,
  and leaves a live writer's staging dir alone."""
  target = tmp_path / 'model'
  writer = subprocess.Popen(
    [sys.executable, '-c', _KILLED_WRITER, str(target)],
    stdout=subprocess.PIPE,
    text=True,
  )
  assert writer.stdout.readline().strip() == 'filling'
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  [left] = [p for p in os.listdir(tmp_path) if p.startswith('.model.')]
  live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    prefix = left[: left.rindex(str(writer.pid))]
    os.mkdir(tmp_path / f'{prefix}{live.pid}-busy')
    files.new_directory(str(target), lambda d: open(f'{d}/params', 'w').close())
  finally:
    live.kill()
    live.wait()
  assert sorted(os.listdir(tmp_path)) == sorted(
    ['model', f'{prefix}{live.pid}-busy']
  )
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f'warning: removed {tmp_path / left}: the staging')
  assert f'process {writer.pid} is gone' in line
