"""A fix hint is a command: each hint the code prints (in backticks) is run
as the user would run it, after the error that prints it. Also the bad
inputs of the last user round that still slipped through (issue 23)."""

import json
import re
import shutil

import pytest
from test_documented_commands import commands_in

import calm_jax
from calm_jax import errors
from calm_jax.data import input_files
from calm_jax.data import vocabularies
from calm_jax.storage import checkpoints
from calm_jax.storage import provenance
from calm_jax.training import trainer

import entry_points  # tests/entry_points.py
import job_calls  # tests/job_calls.py

_run = entry_points.run_module
DECODE = ['--gin_file=gin/runs/decode.gin']
TEXTS = ['question: Who drives the bus? context: Anna drives the bus.']


def hints(message: str) -> list[str]:
  """The commands and flags a message shows in backticks."""
  return re.findall(r'`([^`]+)`', message)


def _last_line(result) -> str:
  return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
  """A private copy of the session's tiny model (with a classifier)."""
  copy = tmp_path / 'model'
  shutil.copytree(tiny_model_dir, copy)
  return copy


@pytest.fixture(scope='module')
def lm(tiny_model_dir):
  return calm_jax.load(str(tiny_model_dir))


def test_the_required_setting_hint_runs():
  result = _run('calm_jax.decode', *DECODE)
  [flag] = hints(_last_line(result))
  assert flag == '--gin.MODEL_DIR=VALUE'
  fixed = _run(
    'calm_jax.decode',
    *DECODE,
    flag.replace('VALUE', "'runs/x'"),
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    check_only=True,
  )
  assert fixed.returncode == 0, fixed.stderr


def test_the_overwrite_hint_runs(model_dir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  flags = [
    *DECODE,
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    f"--gin.OUTPUT_DIR='{out}'",
    '--gin.THRESHOLD=0.5',
    '--gin.calm_jax.DecodeInputs.num_examples=2',
  ]
  refused = _run('calm_jax.decode', *flags)
  assert refused.returncode == 2 and 'holds another run' in _last_line(refused)
  [flag] = hints(_last_line(refused))
  assert _run('calm_jax.decode', *flags, flag).returncode == 0
  assert (out / 'run.json').is_file()


def test_the_classifier_hint_runs(model_dir):
  shutil.rmtree(model_dir / 'classifier')
  shutil.rmtree(model_dir / 'classifier.manifests', ignore_errors=True)
  refused = _run(
    'calm_jax.decode',
    *DECODE,
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    "--gin.CONFIDENCE='classifier'",
    '--gin.THRESHOLD=0.5',
  )
  assert refused.returncode == 2
  [command] = hints(_last_line(refused))
  [(module, args)] = commands_in(command)
  assert "--gin.MIXTURE_OR_TASK_NAME='synth_qa'" in args  # from config.gin
  trained = _run(
    module,
    *args,
    '--gin.TRAIN_STEPS=1',
    '--gin.BATCH_SIZE=4',
    '--gin.calm_jax.LogSettings.progress=False',
  )
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert (model_dir / 'classifier').is_dir()


@pytest.mark.slow
def test_the_recalibration_hint_reproduces_the_record(model_dir):
  record = job_calls.calibrate(
    model_dir=str(model_dir),
    mixture_or_task_name='synth_qa',
    delta=0.3,
    epsilon=0.2,
    confidence='state',
    num_examples=6,
    batch_size=4,
    grid_step=0.5,
  )
  # The model trains on (step 3 -> 4): the record no longer applies.
  retrained = _run(
    'calm_jax.train',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.TRAIN_STEPS=4',
    '--gin.BATCH_SIZE=8',
    '--gin.calm_jax.LogSettings.progress=False',
  )
  assert retrained.returncode == 0, retrained.stderr[-2000:]
  with pytest.raises(provenance.ProvenanceError) as refused:
    calm_jax.load(str(model_dir)).generate(TEXTS, confidence='state')
  [command] = hints(str(refused.value))
  [(module, args)] = commands_in(command)
  assert _run(module, *args).returncode == 0
  fresh = calm_jax.load(str(model_dir)).generate(TEXTS, confidence='state')
  assert record.name in fresh[0].threshold_source  # the same record, renewed


def test_a_hand_edited_record_is_refused_by_decode(model_dir):
  record = job_calls.calibrate(
    model_dir=str(model_dir),
    mixture_or_task_name='synth_qa',
    delta=0.3,
    epsilon=0.2,
    confidence='state',
    num_examples=6,
    batch_size=4,
    grid_step=0.25,
  )
  path = model_dir / 'calibration' / f'{record.name}.json'
  stored = json.loads(path.read_text())
  stored['threshold'] = 0.05
  path.write_text(json.dumps(stored))
  result = _run(
    'calm_jax.decode',
    *DECODE,
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    "--gin.CONFIDENCE='state'",
  )
  assert result.returncode == 2
  assert _last_line(result) == (
    f'error: calibration record {path} was changed after it was written: '
    'its content does not match its digest; a certificate cannot be edited '
    '(delete it and re-calibrate)'
  )


def test_a_missing_or_corrupt_vocabulary_is_one_line(model_dir):
  [vocab] = (model_dir / 'vocab').iterdir()
  vocab.write_bytes(b'not a sentencepiece model')
  with pytest.raises(
    checkpoints.CheckpointError, match=f'{vocab} was changed after it was'
  ):
    calm_jax.load(str(model_dir))  # its sha256 is in model.json
  _unseal(model_dir)  # a dir written before model.json held digests
  with pytest.raises(vocabularies.VocabularyError, match=f'{vocab} is missing'):
    calm_jax.load(str(model_dir))
  vocab.unlink()
  result = _run(
    'calm_jax.decode',
    *DECODE,
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.THRESHOLD=0.5',
  )
  assert result.returncode == 2
  assert _last_line(result).startswith(f'error: vocabulary {vocab} is missing')
  assert 'Traceback' not in result.stderr


def _unseal(model_dir) -> None:
  """model.json as written before it held its own digest and the files'."""
  meta = json.loads((model_dir / 'model.json').read_text())
  del meta[provenance.DIGEST], meta['files']
  (model_dir / 'model.json').write_text(json.dumps(meta))


def test_model_json_dims_that_do_not_match_the_checkpoint_are_one_line(
  model_dir,
):
  meta = json.loads((model_dir / 'model.json').read_text())
  meta['config']['emb_dim'] *= 2
  (model_dir / 'model.json').write_text(json.dumps(meta))
  with pytest.raises(
    checkpoints.CheckpointError, match='model.json was changed after it was'
  ):
    calm_jax.load(str(model_dir))  # the edit breaks its seal
  _unseal(model_dir)  # hand-written, with no seal: the checkpoint tells
  result = entry_points.run_subprocess(
    'calm_jax.decode',
    *DECODE,
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.THRESHOLD=0.5',
  )
  assert result.returncode == 2
  noise = [
    line
    for line in result.stderr.splitlines()
    if not re.match(r'[IWE]\d{4} |WARNING: All log messages', line)
  ]  # the C++ start-up lines of XLA aside
  assert noise == [
    f"error: {model_dir}/model.json does not describe the model dir's "
    f'checkpoint: checkpoint {model_dir}/checkpoints/3 holds params of '
    'other shapes than this model: decoder/decoder_norm/scale is stored as '
    f'(32,), the model has (64,) (78 arrays differ)'
  ], result.stderr[-3000:]


def test_generate_of_no_texts_is_no_results(lm):
  assert lm.generate([], threshold=0.5) == []


def test_a_lone_surrogate_is_one_line(lm, tmp_path):
  with pytest.raises(
    errors.SettingError,
    match=r'texts\[1\] is not valid '
    r'Unicode: a lone surrogate U\+D800 at character 3',
  ):
    lm.generate(['fine', 'bad\ud800'], threshold=0.5)
  path = tmp_path / 'in.jsonl'
  path.write_text('{"inputs": "ok"}\n{"inputs": "bad \\ud800 text"}\n')
  spec = input_files.InputFile(str(path))
  with pytest.raises(
    input_files.InputFileError, match=f'{path} line 2 is not valid Unicode'
  ):
    input_files.read_texts(spec)


def test_a_tsv_line_with_extra_columns_is_refused_with_its_number(tmp_path):
  path = tmp_path / 'in.tsv'
  path.write_text('a\tb\nc\td\te\n')
  with pytest.raises(
    input_files.InputFileError,
    match=f'{path} line 2 has 3 tab-separated columns',
  ):
    input_files.read_texts(input_files.InputFile(str(path)))


def test_decode_checks_its_settings_before_the_model_dir(tmp_path):
  result = _run(
    'calm_jax.decode',
    *DECODE,
    f"--gin.MODEL_DIR='{tmp_path / 'none'}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.THRESHOLD=-1',
  )
  assert _last_line(result) == (
    'error: threshold=-1 is out of range: valid [0, inf)'
  )
  result = _run(
    'calm_jax.decode',
    *DECODE,
    f"--gin.MODEL_DIR='{tmp_path / 'none'}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.calm_jax.RunSettings.batch_size=0',
  )
  assert _last_line(result) == 'error: batch_size=0 is out of range: valid >= 1'
  assert not (tmp_path / 'none').exists()


@pytest.mark.parametrize('value', ['nan', '1e999', "float('nan')"])
def test_a_non_finite_learning_rate_names_the_setting_and_writes_nothing(
  tmp_path, value
):
  model_dir = tmp_path / 'model'
  result = _run(
    'calm_jax.train',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    f'--gin.LEARNING_RATE={value}',
  )
  assert result.returncode == 2
  last = _last_line(result)
  assert 'LEARNING_RATE' in last or 'learning_rate' in last, last
  assert not model_dir.exists()


def test_the_max_bad_steps_hint_parses():
  guard = trainer._FiniteGuard(max_bad_steps=0, last_good=lambda: 'none')
  guard.add(5, False)
  with pytest.raises(trainer.NonFiniteStepError) as stopped:
    guard.check()
  [flag] = hints(str(stopped.value))
  result = _run(
    'calm_jax.train',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    "--gin.MODEL_DIR='runs/x'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    flag.replace('=N', '=2'),
    check_only=True,
  )
  assert result.returncode == 0, result.stderr
