"""A researcher's own SeqIO task: calibrated and decoded without editing
the package (metrics from the task, lengths from gin or a registration)."""

import json
import sys
import textwrap

import pytest

from calm_jax.data import task_info
from calm_jax.scoring import metrics

import entry_points  # tests/entry_points.py

# A user module: a SeqIO task over in-memory examples, scored with the QA
# metric, and no call into calm_jax at all.
USER_MODULE = """
import seqio
import tensorflow as tf
from calm_jax.scoring import metrics
from calm_jax.tasks import synthetic, synthetic_tasks

def _examples(split, shuffle_files, seed=None):
  rows = [synthetic.generate('qa', split, i) for i in range(40)]
  return tf.data.Dataset.from_tensor_slices(
      {k: [r[k] for r in rows] for k in ('inputs', 'targets')})

if 'my_qa' not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      'my_qa', source=seqio.FunctionDataSource(
          _examples, splits=('train', 'validation')),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=synthetic_tasks.OUTPUT_FEATURES,
      metric_fns=[metrics.squad])
"""


@pytest.fixture
def user_task(tmp_path, monkeypatch):
  (tmp_path / 'my_tasks.py').write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  gin_file = tmp_path / 'my_task.gin'
  gin_file.write_text(
    textwrap.dedent("""
      import my_tasks
      calm_jax.data_settings.task_feature_lengths = {
          'my_qa': {'inputs': 32, 'targets': 4}}
  """)
  )
  yield gin_file
  sys.modules.pop('my_tasks', None)


@pytest.mark.slow
def test_an_unregistered_task_needs_only_its_lengths(
  user_task, tiny_model_dir, tmp_path
):
  import shutil  # pylint: disable=g-import-not-at-top

  model_dir = tmp_path / 'model'
  shutil.copytree(tiny_model_dir, model_dir)
  common = [
    f'--gin_file={user_task}',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='my_qa'",
  ]
  calibrated = entry_points.run_module(
    'calm_jax.calibrate',
    '--gin_file=gin/runs/calibrate.gin',
    *common,
    '--gin.DELTA=0.3',
    '--gin.EPSILON=0.2',
    '--gin.calm_jax.calibrate.num_examples=8',
    '--gin.calm_jax.calibrate.grid_step=0.5',
  )
  assert calibrated.returncode == 0, calibrated.stderr[-2000:]
  [record] = (model_dir / 'calibration').glob('my_qa_softmax_*.json')
  assert json.loads(record.read_text())['fingerprint']['data']['my_qa'][
    'feature_lengths'
  ] == {'inputs': 32, 'targets': 4}
  out = tmp_path / 'out'
  decoded = entry_points.run_module(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    *common,
    '--gin.calm_jax.DecodeInputs.num_examples=3',
    f"--gin.OUTPUT_DIR='{out}'",
  )
  assert decoded.returncode == 0, decoded.stderr[-2000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['tasks']['my_qa']['metric'] == 'f1'  # its first metric
  assert 'my_qa_softmax_textual_delta0.3' in summary['threshold_source']


def test_registration_sets_headline_and_per_example_metric():
  task_info.register(
    'tmp_task', feature_lengths={'inputs': 8, 'targets': 2}, headline='em'
  )
  info = task_info.TaskMetrics('tmp_task', (metrics.squad,))
  assert task_info.feature_lengths('tmp_task') == {'inputs': 8, 'targets': 2}
  assert info.headline({'f1': 1.0, 'em': 1.0}) == 'em'
  with pytest.raises(task_info.DataError, match='no per-example metric'):
    info.per_example()  # em has no per-example form
  task_info.register('tmp_task', headline='em', per_example='f1')
  assert info.per_example() == 'f1'
  with pytest.raises(task_info.DataError, match='task_feature_lengths'):
    task_info.feature_lengths('tmp_task')
  with pytest.raises(task_info.DataError, match='unknown per-example'):
    task_info.register('tmp_task', per_example='bleurt')
