"""Decode entry point, classifier stage and Python API on a tiny model."""

import json
import shutil

import jax
import numpy as np
import pytest

import entry_points  # tests/entry_points.py

_run = entry_points.run_module


@pytest.fixture(scope='module')
def model_dir(tiny_model_dir, tmp_path_factory):
  """This module's copy of the session's tiny model (the train command,
  then the classifier stage): its records and outputs stay here."""
  path = tmp_path_factory.mktemp('tiny') / 'model'
  shutil.copytree(tiny_model_dir, path)
  assert (path / 'classifier' / '2').is_dir()
  assert sorted(p.name for p in (path / 'checkpoints').iterdir()) == ['3']
  return path


def test_decode_writes_jsonl_and_summary(model_dir, tmp_path):
  out = tmp_path / 'decode'
  result = _run(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    "--gin.CONFIDENCE='classifier'",
    '--gin.THRESHOLD=0.5',
    '--gin.calm_jax.DecodeInputs.num_examples=6',
    '--gin.calm_jax.RunSettings.batch_size=4',
    f"--gin.OUTPUT_DIR='{out}'",
    f"--gin.EXIT_MAP='{tmp_path / 'maps'}'",
    '--gin.calm_jax.OutputSettings.exit_map_examples=3',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = (out / 'synth_qa.jsonl').read_text().splitlines()
  assert len(lines) == 6
  record = json.loads(lines[0])
  assert set(record) == {
    'inputs',
    'targets',
    'prediction',
    'tokens',
    'exit_layers',
    'confidences',
  }
  assert len(record['tokens']) == len(record['exit_layers'])
  assert record['tokens'][-1] == '</s>' or len(record['tokens']) == 6
  records = [json.loads(line) for line in lines[:3]]
  page = (tmp_path / 'maps' / 'synth_qa.html').read_text()
  assert page.count('data-layer=') == sum(len(r['tokens']) for r in records)
  assert (tmp_path / 'maps' / 'synth_qa.png').stat().st_size > 1000
  assert record['inputs'].startswith('question: ')
  assert len(record['exit_layers']) == len(record['confidences']) >= 1
  assert all(1 <= l <= 4 for l in record['exit_layers'])
  summary = json.loads((out / 'summary.json').read_text())
  task = summary['tasks']['synth_qa']
  assert task['metric'] == 'f1' and 0 <= task['value'] <= 100
  assert 1 <= task['avg_decoder_layers'] <= 4
  assert summary['threshold'] == 0.5 and summary['threshold_source'] == 'given'


def test_decode_rejects_unknown_measure(model_dir):
  result = _run(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    "--gin.CONFIDENCE='entropy'",
  )
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    "error: unknown confidence 'entropy'; valid: "
    'softmax, softmax_max, state, classifier, oracle'
  ), last
  assert 'softmax, softmax_max, state, classifier, oracle' in last


def test_python_api_generate(model_dir):
  import calm_jax  # pylint: disable=g-import-not-at-top
  from calm_jax.tasks import synthetic  # pylint: disable=g-import-not-at-top

  lm = calm_jax.load(str(model_dir))
  texts = [synthetic.generate('qa', 'test', i)['inputs'] for i in range(3)]
  full = lm.generate(texts, batch_size=2, max_length=4)
  assert len(full) == 3
  for result in full:  # no calibration record: full depth
    assert result.exit_layers and set(result.exit_layers) == {4}
    assert isinstance(result.text, str)
  early = lm.generate(
    texts, threshold=0.0, confidence='state', batch_size=2, max_length=4
  )
  assert all(set(r.exit_layers) == {2} for r in early)
  clf = lm.generate(
    texts, threshold=0.0, confidence='classifier', batch_size=4, max_length=4
  )
  assert all(set(r.exit_layers) == {1} for r in clf)
  assert np.all([0 <= c <= 1 for r in clf for c in r.confidences])
  # Exits disabled: no token was decided by an exit test.
  assert all(c is None for r in full for c in r.confidences)


def _calibrate(model_dir, *extra):
  return _run(
    'calm_jax.calibrate',
    '--gin_file=gin/runs/calibrate.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.calm_jax.calibrate.num_examples=12',
    '--gin.calm_jax.calibrate.grid_step=0.25',
    *extra,
  )


def test_calibrate_writes_a_record_that_decode_uses(model_dir, tmp_path):
  result = _calibrate(
    model_dir,
    '--gin.DELTA=0.3',
    '--gin.EPSILON=0.2',
    "--gin.CONFIDENCE='state'",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  calibration_dir = model_dir / 'calibration'
  [path] = calibration_dir.glob('synth_qa_state_textual_delta0.3_eps0.2_*.json')
  record = json.loads(path.read_text())
  assert record['n'] == 12 and record['confidence'] == 'state'
  table = record['table']
  assert table[0]['threshold'] == 1.0 and table[0]['empirical_risk'] == 0.0
  certified = [row['threshold'] for row in table if row['rejected']]
  assert record['threshold'] == (certified[-1] if certified else None)
  cached = list((calibration_dir / 'cache').glob('*.json'))
  assert len(cached) == 1 + len(table)  # full depth + each tested threshold

  # A second delta reuses every cached decode.
  before = {p: p.stat().st_mtime for p in cached}
  again = _calibrate(
    model_dir,
    '--gin.DELTA=0.5',
    '--gin.EPSILON=0.2',
    "--gin.CONFIDENCE='state'",
  )
  assert again.returncode == 0, again.stderr[-2000:]
  for path, mtime in before.items():
    assert path.stat().st_mtime == mtime

  out = tmp_path / 'decode'
  decoded = _run(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    "--gin.CONFIDENCE='state'",
    '--gin.calm_jax.DecodeInputs.num_examples=4',
    f"--gin.OUTPUT_DIR='{out}'",
  )
  assert decoded.returncode == 0, decoded.stderr[-2000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert (
    'synth_qa_state_textual_delta0.5_eps0.2_' in summary['threshold_source']
  )


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--gin.DELTA=1.5'], 'delta=1.5 is out of range: valid (0, 1)'),
    (
      ['--gin.DELTA=0.2', '--gin.EPSILON=0'],
      'epsilon=0 is out of range: valid (0, 1)',
    ),
    (
      ['--gin.DELTA=0.2', "--gin.calm_jax.calibrate.split='nope'"],
      "has no split 'nope'",
    ),
    (['--gin.DELTA=0.2', "--gin.CONSISTENCY='bleurt'"], 'unknown consistency'),
  ],
)
def test_calibrate_bad_input_changes_nothing(model_dir, extra, message):
  before = sorted(str(p) for p in model_dir.rglob('*'))
  result = _calibrate(model_dir, *extra)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, last
  assert sorted(str(p) for p in model_dir.rglob('*')) == before


def test_calibrate_refuses_a_measure_the_model_lacks(model_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  bare = tmp_path / 'bare'
  shutil.copytree(
    model_dir, bare, ignore=shutil.ignore_patterns('classifier', 'calibration')
  )
  before = sorted(str(p) for p in bare.rglob('*'))
  result = _calibrate(bare, '--gin.DELTA=0.2', "--gin.CONFIDENCE='classifier'")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'has no exit classifier' in last, last
  assert sorted(str(p) for p in bare.rglob('*')) == before


@pytest.mark.slow
def test_bf16_training_writes_a_bf16_model_dir(tmp_path):
  path = tmp_path / 'bf16'
  result = _run(
    'calm_jax.train',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    f"--gin.MODEL_DIR='{path}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.BATCH_SIZE=8',
    '--gin.TRAIN_STEPS=2',
    "--gin.calm_jax.T5Config.dtype='bfloat16'",
    '--gin.calm_jax.LogSettings.progress=False',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  from calm_jax.model import model_files  # pylint: disable=g-import-not-at-top

  config, _ = model_files.read_model_config(str(path))
  assert config.dtype == 'bfloat16'
  params, step = model_files.load_params(str(path), config)
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
  assert step == 2
  assert all(x.dtype == np.float32 and np.all(np.isfinite(x)) for x in leaves)


@pytest.mark.slow
def test_bf16_calibrate_decode_and_generate(model_dir, tmp_path):
  # The float32-trained model run with bfloat16 activations, in process.
  import calm_jax  # pylint: disable=g-import-not-at-top
  from calm_jax.jobs import calibrate  # pylint: disable=g-import-not-at-top
  from calm_jax.jobs import decode  # pylint: disable=g-import-not-at-top
  from calm_jax.jobs import settings  # pylint: disable=g-import-not-at-top
  from calm_jax.tasks import synthetic  # pylint: disable=g-import-not-at-top

  bf16 = settings.RunSettings(batch_size=4, dtype='bfloat16')
  record = calibrate.calibrate(
    model_dir=str(model_dir),
    mixture_or_task_name='synth_qa',
    delta=0.3,
    epsilon=0.2,
    num_examples=8,
    grid_step=0.5,
    exits=settings.ExitSettings(confidence='softmax'),
    runtime=bf16,
  )
  assert record.dtype == 'bfloat16' and record.n == 8
  assert (model_dir / 'calibration' / f'{record.name}.json').is_file()
  summary = decode.decode(
    model_dir=str(model_dir),
    threshold=0.0,
    inputs=settings.DecodeInputs(
      mixture_or_task_name='synth_qa', num_examples=4
    ),
    exits=settings.ExitSettings(confidence='classifier'),
    output=settings.OutputSettings(output_dir=str(tmp_path / 'decode')),
    runtime=bf16,
  )
  assert summary.dtype == 'bfloat16'
  assert summary.tasks['synth_qa']['avg_decoder_layers'] == 1.0
  texts = [synthetic.generate('qa', 'test', i)['inputs'] for i in range(3)]
  f32 = calm_jax.load(str(model_dir)).generate(
    texts, threshold=1.5, batch_size=4, max_length=4
  )
  bf16_lm = calm_jax.load(str(model_dir), dtype='bfloat16')
  assert bf16_lm.config.dtype == 'bfloat16'
  bf16 = bf16_lm.generate(texts, threshold=1.5, batch_size=4, max_length=4)
  assert [r.text for r in bf16] == [r.text for r in f32]
  state = bf16_lm.generate(
    texts, threshold=0.0, confidence='state', batch_size=4, max_length=4
  )
  assert all(set(r.exit_layers) == {2} for r in state)
