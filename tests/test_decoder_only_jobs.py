"""The decoder-only family through the jobs: trained with CALM's loss by the
train command on an embedded task, its exit classifier, decode of the
task, calibration and the Python API."""

import json

import numpy as np
import pytest

import calm_jax
from calm_jax.inference import loaded as loaded_lib
from calm_jax.model import llama
from calm_jax.model import llama_network

import entry_points  # tests/entry_points.py

_run = entry_points.run_module


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('llama') / 'model'
  common = [
    f"--gin.MODEL_DIR='{path}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.BATCH_SIZE=8',
    '--gin.calm_jax.LogSettings.progress=False',
  ]
  result = _run(
    'calm_jax.train',
    '--gin_file=gin/models/calm_llama_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    '--gin.TRAIN_STEPS=3',
    *common,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  result = _run(
    'calm_jax.train',
    '--gin_file=gin/runs/train_classifier.gin',
    '--gin.TRAIN_STEPS=2',
    *common,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return path


def test_the_model_dir_names_its_family_and_the_loss_fell(model_dir):
  meta = json.loads((model_dir / 'model.json').read_text())
  assert meta['family'] == 'llama'
  model = loaded_lib.load(str(model_dir))
  assert isinstance(model.config, llama.LlamaConfig)
  assert model.classifier is not None and model.step == 3


def test_the_lm_batch_puts_each_target_after_its_input():
  batch = {
    'encoder_input_tokens': np.array([[5, 6, 1, 0], [7, 1, 0, 0]]),
    'decoder_target_tokens': np.array([[8, 1, 0], [9, 4, 1]]),
  }
  lm = llama.lm_batch(batch)
  np.testing.assert_array_equal(
    lm['tokens'], [[5, 6, 1, 8, 1, 0, 0], [7, 1, 9, 4, 1, 0, 0]]
  )
  np.testing.assert_array_equal(
    lm['segments'], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
  )
  np.testing.assert_array_equal(
    lm['positions'][:, :5], [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
  )
  # The state before each target token predicts it (padding: weight 0).
  np.testing.assert_array_equal(lm['predict'][0, :2], [2, 3])
  np.testing.assert_array_equal(lm['predict'][1], [1, 2, 3])


def test_a_packed_lm_batch_puts_each_example_after_the_one_before():
  """Two examples packed in one row (SeqIO's segment ids and positions):
  each example's input then its target, positions from 0 per example."""
  batch = {
    'encoder_input_tokens': np.array([[5, 1, 7, 6, 1, 0]]),
    'encoder_segment_ids': np.array([[1, 1, 2, 2, 2, 0]]),
    'encoder_positions': np.array([[0, 1, 0, 1, 2, 0]]),
    'decoder_target_tokens': np.array([[8, 1, 9, 1, 0]]),
    'decoder_segment_ids': np.array([[1, 1, 2, 2, 0]]),
    'decoder_positions': np.array([[0, 1, 0, 1, 0]]),
  }
  lm = llama.lm_batch(batch)
  np.testing.assert_array_equal(
    lm['tokens'], [[5, 1, 8, 1, 7, 6, 1, 9, 1, 0, 0]]
  )
  np.testing.assert_array_equal(
    lm['positions'], [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0]]
  )
  np.testing.assert_array_equal(
    lm['segments'], [[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]]
  )
  np.testing.assert_array_equal(lm['predict'][:, :4], [[1, 2, 6, 7]])
  mask = np.asarray(llama_network.segment_causal_mask(lm['segments']))[0, 0]
  assert mask[3, :4].all() and not mask[3, 4:].any()  # example 1's end
  assert not mask[5, :4].any() and mask[5, 4:6].all()  # example 2 sees itself


def test_decode_and_calibrate_a_task_with_the_decoder_only_model(
  model_dir, tmp_path
):
  out = tmp_path / 'decode'
  flags = [
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.calm_jax.DecodeInputs.num_examples=4',
    '--gin.calm_jax.RunSettings.batch_size=4',
  ]
  result = _run(
    'calm_jax.decode',
    *flags,
    '--gin.THRESHOLD=0.0',
    f"--gin.OUTPUT_DIR='{out}'",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['tasks']['synth_qa']['avg_decoder_layers'] == 1.0
  calibrated = _run(
    'calm_jax.calibrate',
    '--gin_file=gin/runs/calibrate.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    '--gin.DELTA=0.3',
    '--gin.EPSILON=0.2',
    "--gin.CONFIDENCE='classifier'",
    '--gin.calm_jax.calibrate.num_examples=6',
    '--gin.calm_jax.calibrate.grid_step=0.5',
    '--gin.calm_jax.RunSettings.batch_size=4',
  )
  assert calibrated.returncode == 0, calibrated.stderr[-2000:]
  assert list((model_dir / 'calibration').glob('synth_qa_classifier_*.json'))
  # The record made on this dir is the one its decodes use (the fingerprint
  # read back from JSON matches the dir it was made on).
  certified = _run(
    'calm_jax.decode',
    *flags,
    "--gin.CONFIDENCE='classifier'",
    f"--gin.OUTPUT_DIR='{tmp_path / 'certified'}'",
  )
  assert certified.returncode == 0, certified.stderr[-2000:]
  assert 'synth_qa_classifier_' in certified.stderr + certified.stdout
  lm = calm_jax.load(str(model_dir))
  [result] = lm.generate(
    ['question: Who drives the bus? context: Anna drives the bus.'],
    task='synth_qa',
    confidence='classifier',
    max_length=3,
  )
  assert 'synth_qa_classifier_' in result.threshold_source


def test_generate_with_the_decoder_only_model(model_dir):
  lm = calm_jax.load(str(model_dir))
  [result] = lm.generate(
    ['question: Who drives the bus? context: Anna drives the bus.'],
    threshold=1.5,
    max_length=5,
  )
  assert len(result.tokens) <= 5 and set(result.exit_layers) == {4}
