"""Typed, versioned records: calibration certificates verify themselves, and
unknown versions or edits are refused by name (no model needed)."""

import dataclasses
import json

import numpy as np
import pytest

from calm_jax.calibration import ltt
from calm_jax.calibration import records
from calm_jax.evaluation import decode_records

GRID = ltt.descending_grid(1.0, 0.0, 0.05)


def _record(risk_at=lambda t: 0.3 * (1 - t), n=400, delta=0.25):
  """A record of LTT over losses whose mean falls as the threshold rises."""
  result = ltt.fixed_sequence_test(
    GRID,
    lambda t: (np.full(n, risk_at(t)), 1 + 7 * t),
    delta=delta,
    epsilon=0.05,
  )
  fingerprint = records.fingerprint(
    model={'params': 'abc'},
    data={'synth_qa': {'split': 'validation'}},
    decode={'confidence': 'softmax'},
    consistency='textual',
    delta=delta,
    epsilon=0.05,
    grid_step=0.05,
  )
  return records.new_record(
    result,
    task='synth_qa',
    record_fingerprint=fingerprint,
    tau=None,
    checkpoint_step=7,
    dtype='float32',
    extra={'split': 'validation', 'min_exit': 1},
  )


def _written(tmp_path, record) -> tuple[str, dict]:
  path = records.write(str(tmp_path), record)
  return path, json.loads(open(path).read())


def _rewrite(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f)


def test_a_record_reads_back_equal_and_verified(tmp_path):
  record = _record()
  assert record.certified and 0 < record.threshold < 1
  path, obj = _written(tmp_path, record)
  assert obj['schema_version'] == 2 and obj['digest'] == record.digest()
  assert obj['certified'] is True
  assert records.read(path) == record
  assert records.all_records(str(tmp_path)) == [(path, record)]


def test_a_hand_edited_threshold_is_refused_by_name(tmp_path):
  record = _record()
  path, obj = _written(tmp_path, record)
  obj['threshold'] = round(record.threshold - 0.05, 2)
  _rewrite(path, obj)
  with pytest.raises(records.RecordError, match=f'{path} was changed after'):
    records.read(path)
  # Even with a digest recomputed to match, the threshold must be the one
  # its own table certifies.
  edited = dataclasses.replace(record, threshold=obj['threshold'])
  _rewrite(path, edited.to_json())
  with pytest.raises(
    records.RecordError,
    match=rf'states threshold {obj["threshold"]} but its test table '
    rf'certifies {record.threshold}',
  ):
    records.read(path)


def test_an_edited_risk_in_the_table_is_refused(tmp_path):
  record = _record()
  path, obj = _written(tmp_path, record)
  table = [dict(row) for row in record.table]
  table[0]['empirical_risk'] = 0.2  # its p-value no longer follows
  edited = dataclasses.replace(record, table=tuple(table))
  _rewrite(path, edited.to_json())
  with pytest.raises(records.RecordError, match='row 1 .* does not follow'):
    records.read(path)


def test_version_1_records_read_and_are_checked_against_their_table(
  tmp_path,
):
  record = _record()
  legacy = {
    k: v
    for k, v in record.to_json().items()
    if k not in ('schema_version', 'digest', 'extra')
  }
  legacy.update(split='validation', min_exit=1)
  path = tmp_path / 'calibration' / 'old.json'
  path.parent.mkdir()
  _rewrite(path, legacy)
  old = records.read(str(path))
  assert old.schema_version == 1 and old.threshold == record.threshold
  assert old.extra == {'split': 'validation', 'min_exit': 1}
  legacy['threshold'] = 0.05
  _rewrite(path, legacy)
  with pytest.raises(records.RecordError, match='states threshold 0.05'):
    records.read(str(path))


def test_an_unknown_schema_version_is_refused_naming_the_file(tmp_path):
  path, obj = _written(tmp_path, _record())
  _rewrite(path, {**obj, 'schema_version': 3})
  with pytest.raises(records.RecordError, match=f'{path} has schema_version 3'):
    records.read(path)


def test_no_certified_threshold_is_a_record_too(tmp_path):
  record = _record(risk_at=lambda t: 0.5)
  assert record.threshold is None and not record.certified
  path, _ = _written(tmp_path, record)
  assert records.read(path) == record


def test_the_recalibration_hint_is_a_full_command():
  hint = records.calibrate_command('runs/m', _record())
  assert hint == (
    'python -m calm_jax.calibrate --gin_file=gin/runs/calibrate.gin '
    '--gin.MODEL_DIR="\'runs/m\'" --gin.MIXTURE_OR_TASK_NAME="\'synth_qa\'" '
    '--gin.DELTA=0.25 --gin.EPSILON=0.05 --gin.CONSISTENCY="\'textual\'" '
    '--gin.CONFIDENCE="\'softmax\'"'
  )


def test_decode_records_are_versioned(tmp_path):
  run = decode_records.DecodeRun(
    model={'step': 1},
    data={},
    decode={'confidence': 'state'},
    threshold=0.5,
    threshold_source='given',
    seed=None,
  )
  path = tmp_path / 'run.json'
  _rewrite(path, run.to_json())
  assert decode_records.read_run(str(path)) == run
  _rewrite(path, run.fingerprint())  # written before schema_version
  assert decode_records.read_run(str(path)).fingerprint() == run.fingerprint()
  _rewrite(path, {**run.to_json(), 'schema_version': 9})
  with pytest.raises(
    decode_records.DecodeRecordError, match=f'{path} has schema_version 9'
  ):
    decode_records.read_run(str(path))
