"""The README's CNN/DailyMail recipe, end to end on mock TFDS data: a short
"pre-training", then the task's experiment file driving fine-tuning,
calibration and a calibrated early-exit decode. Slow (about a minute)."""

import json
import os

import gin
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from calm_jax import cli
from calm_jax.decoding import thresholds
from calm_jax.jobs import calibrate
from calm_jax.jobs import decode
from calm_jax.jobs import environment
from calm_jax.jobs import train
from calm_jax.model import model_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = 'cnn_dailymail_v3'
# The tiny model and short lengths keep it fast; the stand-in vocabulary
# (1,024 pieces + T5's 100 sentinels) replaces T5's.
SHARED = [
  '--gin.calm_jax.T5Config.vocab_size=1152',
  '--gin.BATCH_SIZE=2',
  "--gin.calm_jax.data_settings.t5_vocabulary='"
  + os.path.join(REPO, 'tasks', 'vocab', 'calm_synth.model')
  + "'",
  "--gin.calm_jax.data_settings.task_feature_lengths={'"
  + TASK
  + "': {'inputs': 48, 'targets': 12}}",
  '--gin.calm_jax.LogSettings.progress=False',
]


def _configure(flags: list[str]) -> None:
  """What an entry point does before running its job."""
  gin.clear_config()
  cli.parse(flags + SHARED)
  environment.data_settings()


def _max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.slow
def test_cnn_dailymail_recipe_on_mock_data(tmp_path):
  init_dir, model_dir = str(tmp_path / 'init'), str(tmp_path / 'cnn')
  try:
    with tfds.testing.mock_data(num_examples=8):
      _configure(
        [
          '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
          '--gin_file=gin/runs/pretrain.gin',
          f"--gin.MODEL_DIR='{init_dir}'",
          f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
          '--gin.TRAIN_STEPS=3',
          '--gin.calm_jax.train.seed=1',
        ]
      )
      train.train()
      _configure(
        [
          '--gin_file=gin/experiments/cnn_dailymail.gin',
          '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
          f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{init_dir}'",
          '--gin.TRAIN_STEPS=2',
          '--gin.DELTA=[0.1, 0.25]',
          '--gin.calm_jax.calibrate.num_examples=6',
          '--gin.calm_jax.RunSettings.batch_size=2',
          '--gin.calm_jax.DecodeInputs.num_examples=4',
          '--gin.calm_jax.RunSettings.batch_size=2',
          f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
        ]
      )
      config = train.T5Config()
      train.train()
      records = calibrate.calibrate()
      summary = decode.decode()
  finally:
    gin.clear_config()
    environment.data_settings()  # back to the defaults

  # Fine-tuning started from the initial model (seed 1), not from a fresh
  # init (seed 0): two small Adafactor steps stay close to the former.
  init_params, _ = model_files.load_params(init_dir, config)
  tuned, step = model_files.load_params(model_dir, config)
  fresh = model_files.model_for(config).init_params(jax.random.PRNGKey(0))[
    'params'
  ]
  assert step == 2
  assert _max_abs_diff(tuned, init_params) < 0.05
  assert _max_abs_diff(tuned, fresh) > 0.5

  assert [r.delta for r in records] == [0.1, 0.25]
  for record in records:
    assert record.task == TASK and record.tau == 4.0
    assert record.n == 6
    assert os.path.exists(
      os.path.join(model_dir, 'calibration', record.name + '.json')
    )
  result = summary.tasks[TASK]
  assert (
    f'{TASK}_softmax_textual_delta0.25_eps0.05_' in summary.threshold_source
  )
  # Six examples cannot certify anything at delta 0.25 (the best p-value,
  # e * 0.75**6 = 0.48, is above epsilon): the record says full depth.
  assert not records[1].certified
  assert summary.threshold == thresholds.EXITS_OFF
  assert result['metric'] == 'rougeL' and result['num_examples'] == 4
  assert 1 <= result['avg_decoder_layers'] <= config.num_decoder_layers
  assert set(result['scores']) == {'rouge1', 'rouge2', 'rougeL', 'rougeLsum'}
  with open(tmp_path / 'out' / f'{TASK}.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 4
  assert all(line['inputs'].startswith('summarize: ') for line in lines)
