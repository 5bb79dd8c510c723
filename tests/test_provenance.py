"""The certified promise end to end: records and cached decodes carry the
fingerprint of what they certify, stale ones are refused, outputs never
overwrite another run, and every user argument is checked."""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest

import calm_jax
from calm_jax import api
from calm_jax import errors
from calm_jax.decoding import thresholds
from calm_jax.model import llama
from calm_jax.storage import provenance
from calm_jax.tasks import data_settings
from calm_jax.tasks import synthetic

import entry_points  # tests/entry_points.py
import job_calls  # tests/job_calls.py

ROOT = entry_points.ROOT


_run = entry_points.run_module


def _train_classifier(path, steps):
  result = _run(
    'calm_jax.train',
    '--gin_file=gin/runs/train_classifier.gin',
    f"--gin.MODEL_DIR='{path}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.BATCH_SIZE=8',
    f'--gin.TRAIN_STEPS={steps}',
    '--gin.calm_jax.LogSettings.progress=False',
  )
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope='module')
def trained(tiny_model_dir):
  """A tiny model (3 steps) with an exit classifier (2 steps)."""
  return tiny_model_dir


@pytest.fixture
def model_dir(trained, tmp_path):
  """A private copy, so that tests' records and caches do not meet."""
  copy = tmp_path / 'model'
  shutil.copytree(trained, copy)
  return copy


def _calibrate(model_dir, task='synth_qa', **kwargs):
  settings = dict(
    delta=0.3,
    epsilon=0.2,
    confidence='softmax',
    num_examples=8,
    batch_size=4,
    grid_step=0.5,
  )
  settings.update(kwargs)
  return job_calls.calibrate(
    model_dir=str(model_dir), mixture_or_task_name=task, **settings
  )


def _cache_files(model_dir):
  return sorted((model_dir / 'calibration' / 'cache').glob('*.json'))


def _texts(task='qa', n=3):
  return [synthetic.generate(task, 'test', i)['inputs'] for i in range(n)]


@pytest.mark.slow
def test_retrained_classifier_decodes_afresh_and_refuses_the_old_record(
  model_dir,
):
  first = _calibrate(model_dir, confidence='classifier')
  cached = _cache_files(model_dir)
  lm = calm_jax.load(str(model_dir))
  assert lm.generate(_texts(), confidence='classifier')[0].threshold == (
    first.threshold if first.threshold is not None else thresholds.EXITS_OFF
  )

  _train_classifier(model_dir, 6)  # the classifier trains on: 2 -> 6
  retrained = calm_jax.load(str(model_dir))
  with pytest.raises(
    provenance.ProvenanceError,
    match=r'certified on another model \(classifier: .*'
    r're-calibrate',
  ):
    retrained.generate(_texts(), confidence='classifier')
  with pytest.raises(provenance.ProvenanceError, match='classifier'):
    job_calls.decode(
      model_dir=str(model_dir),
      mixture_or_task_name='synth_qa',
      confidence='classifier',
      num_examples=2,
    )
  # A record for another measure does not depend on the classifier.
  _calibrate(model_dir, confidence='state')

  second = _calibrate(model_dir, confidence='classifier')
  new_entries = set(_cache_files(model_dir)) - set(cached)
  assert any('_full_' not in p.name for p in new_entries)  # decoded afresh
  assert second.name == first.name  # same settings: replaces it
  assert (
    second.fingerprint['model']['classifier']
    != first.fingerprint['model']['classifier']
  )
  result = calm_jax.load(str(model_dir)).generate(
    _texts(), confidence='classifier'
  )
  assert second.name in result[0].threshold_source


@pytest.mark.slow
def test_records_are_per_task_and_generate_says_which_it_used(model_dir):
  lm = calm_jax.load(str(model_dir))
  none = lm.generate(_texts(), max_length=4)
  assert none[0].threshold == thresholds.EXITS_OFF
  assert none[0].threshold_source.startswith('full depth: no calibration')

  translate = _calibrate(model_dir, task='synth_translate')
  only = lm.generate(_texts(), max_length=4)  # the only task with records
  assert translate.name in only[0].threshold_source
  qa = lm.generate(_texts(), task='synth_qa', max_length=4)
  assert (
    qa[0].threshold == thresholds.EXITS_OFF
  )  # no record for QA: not borrowed

  _calibrate(model_dir, task='synth_qa')
  with pytest.raises(
    provenance.ProvenanceError,
    match=r'several tasks \(synth_qa, synth_translate\): '
    'pass task=',
  ):
    lm.generate(_texts(), max_length=4)
  qa = lm.generate(_texts(), task='synth_qa')
  assert 'synth_qa_softmax' in qa[0].threshold_source
  # Without max_length, the record's certified target length (synth_qa: 6).
  assert all(len(r.tokens) <= 6 for r in qa)
  assert any(len(r.tokens) > 4 for r in qa)  # more than max_length above


def test_record_names_hold_every_setting(model_dir):
  small = _calibrate(model_dir, num_examples=4)
  large = _calibrate(model_dir, num_examples=8)
  other_grid = _calibrate(model_dir, num_examples=8, grid_step=0.25)
  names = {small.name, large.name, other_grid.name}
  assert len(names) == 3
  stored = sorted(p.stem for p in (model_dir / 'calibration').glob('*.json'))
  assert stored == sorted(names)
  for name in names:
    record = json.loads(
      (model_dir / 'calibration' / f'{name}.json').read_text()
    )
    assert record['fingerprint']['data']['synth_qa']['num_examples'] in (4, 8)


def test_cache_misses_when_feature_lengths_change(model_dir):
  _calibrate(model_dir)
  before = set(_cache_files(model_dir))
  _calibrate(model_dir)  # same settings: every decode from the cache
  assert set(_cache_files(model_dir)) == before
  data_settings.set_overrides(
    task_feature_lengths={'synth_qa': {'inputs': 32, 'targets': 6}}
  )
  try:
    record = _calibrate(model_dir)
  finally:
    data_settings.set_overrides()
  assert len(set(_cache_files(model_dir)) - before) >= 2  # full + a threshold
  assert record.fingerprint['data']['synth_qa']['feature_lengths'] == {
    'inputs': 32,
    'targets': 6,
  }


def _decode(model_dir, **kwargs):
  settings = dict(
    model_dir=str(model_dir),
    mixture_or_task_name='synth_qa',
    num_examples=2,
    batch_size=2,
    threshold=0.5,
  )
  settings.update(kwargs)
  return job_calls.decode(**settings)


def test_decode_outputs_never_overwrite_another_run(model_dir, tmp_path):
  _decode(model_dir)
  _decode(model_dir, temperature=0.7, top_k=5)
  _decode(model_dir, min_exit=2)
  dirs = sorted(p.name for p in (model_dir / 'decode').iterdir())
  assert len(dirs) == 3, dirs
  for name in dirs:
    run = json.loads((model_dir / 'decode' / name / 'run.json').read_text())
    assert run['threshold'] == 0.5

  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('not a decode')
  with pytest.raises(
    provenance.ProvenanceError, match='holds another run.*overwrite=True'
  ):
    _decode(model_dir, output_dir=str(mine))
  assert sorted(p.name for p in mine.iterdir()) == ['notes.txt']
  _decode(model_dir, output_dir=str(mine), overwrite=True)
  _decode(model_dir, output_dir=str(mine))  # the same run again is fine
  with pytest.raises(provenance.ProvenanceError, match='temperature'):
    _decode(model_dir, output_dir=str(mine), temperature=0.5)
  with pytest.raises(errors.SettingError, match='is a file'):
    _decode(model_dir, output_dir=str(mine / 'notes.txt'))


def test_a_record_is_refused_for_other_decode_settings(model_dir):
  _calibrate(model_dir)
  with pytest.raises(
    provenance.ProvenanceError, match='other decode settings.*propagation'
  ):
    _decode(model_dir, threshold=None, propagation='kv_copy')
  summary = _decode(model_dir, threshold=None)
  assert 'synth_qa_softmax' in summary.threshold_source


@pytest.mark.parametrize(
  'call, message',
  [
    (lambda lm: lm.generate('one text'), 'texts must be a list of strings'),
    (
      lambda lm: lm.generate(['a'], batch_size=-1),
      r'batch_size=-1 is out of range: valid >= 1',
    ),
    (
      lambda lm: lm.generate(['a'], threshold=math.nan),
      'threshold must be a finite number, got nan',
    ),
    (
      lambda lm: lm.generate(['a'], threshold=-0.1),
      r'threshold=-0.1 is out of range',
    ),
    (
      lambda lm: lm.generate(['a'], min_exit=99),
      r'min_exit=99 is out of range: valid \[1, 4\]',
    ),
    (
      lambda lm: lm.generate(['a'], temperature=-1.0),
      r'temperature=-1.0 is out of range',
    ),
    (
      lambda lm: lm.generate(['a'], max_length=0),
      r'max_length=0 is out of range: valid >= 1',
    ),
    (lambda lm: lm.generate(['a'], top_p=0.0), r'top_p=0.0 is out of range'),
  ],
)
def test_generate_refuses_bad_arguments(trained, call, message):
  with pytest.raises(errors.SettingError, match=message):
    call(_lm(trained))


def _lm(path, cache={}):  # pylint: disable=dangerous-default-value
  if path not in cache:
    cache[path] = calm_jax.load(str(path))
  return cache[path]


def test_decode_and_calibrate_refuse_bad_arguments(trained):
  with pytest.raises(errors.SettingError, match='threshold must be a finite'):
    _decode(trained, threshold=math.nan)
  with pytest.raises(errors.SettingError, match='min_exit=99'):
    _decode(trained, min_exit=99)
  with pytest.raises(errors.SettingError, match='grid_step=0'):
    _calibrate(trained, grid_step=0)
  with pytest.raises(errors.SettingError, match='delta must be a finite'):
    _calibrate(trained, delta='abc')
  assert not (trained / 'decode').exists()
  assert not (trained / 'calibration').exists()


def test_long_inputs_are_truncated_with_a_count_and_small_calls_stay_small(
  trained, caplog
):
  lm = _lm(trained)
  long_text = ' '.join(['the'] * 600)
  with caplog.at_level(logging.WARNING):
    results = lm.generate(
      [long_text, 'short', long_text],
      threshold=1.5,
      max_length=3,
      max_input_length=64,
    )
  assert len(results) == 3
  assert '2 of 3 inputs were longer than max_input_length=64' in caplog.text
  assert lm.encode([long_text], 64).shape == (1, 64)
  with pytest.raises(errors.SettingError, match='truncate=False'):
    lm.generate([long_text], max_input_length=64, truncate=False)
  assert api._rows_per_call(1, 4096) == 1
  assert api._rows_per_call(5, 4096) == 8
  assert api._rows_per_call(100, 16) == 16
  one = lm.generate(['short'], threshold=1.5, batch_size=4096, max_length=3)
  assert len(one) == 1


@pytest.mark.slow  # about a minute: two calibration processes at once
def test_two_calibrations_of_one_model_dir_at_once(model_dir):
  def start(delta, confidence):
    return subprocess.Popen(
      [
        sys.executable,
        '-m',
        'calm_jax.calibrate',
        '--gin_file=gin/runs/calibrate.gin',
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
        f'--gin.DELTA={delta}',
        '--gin.EPSILON=0.2',
        f"--gin.CONFIDENCE='{confidence}'",
        '--gin.calm_jax.calibrate.num_examples=8',
        '--gin.calm_jax.calibrate.grid_step=0.25',
      ],
      cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  jobs = [start(0.3, 'softmax'), start(0.5, 'softmax')]
  for job in jobs:
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-2000:]
  records = sorted((model_dir / 'calibration').glob('*.json'))
  assert len(records) == 2
  for path in records:
    record = json.loads(path.read_text())
    assert record['fingerprint']['model']['params']
    assert record['n'] == 8 and record['table']
  for path in _cache_files(model_dir):
    assert json.loads(path.read_text())['fingerprint']
  assert not [p for p in model_dir.rglob('*.tmp')]


def test_a_fingerprint_equals_itself_after_a_json_round_trip():
  """Records hold fingerprints as JSON: a tuple in a config (Llama's
  exit_layer_list) comes back a list, and must still match the dir it was
  made on, in every comparison and in the changes a refusal names."""
  current = {'config': dataclasses.asdict(llama.LlamaConfig()), 'n': 1}
  stored = json.loads(json.dumps(current))
  assert stored != current  # the bug's shape: [] is not ()
  assert provenance.same(stored, current)
  assert provenance.changes(stored, current) == []
  assert provenance.changes(stored, {**current, 'n': 2}) == ['n: 1 -> 2']
