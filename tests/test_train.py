"""The train entry point on the tiny config, and its one-line errors."""

import json

import pytest

import entry_points  # tests/entry_points.py

TINY = [
  '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
  '--gin_file=gin/runs/train.gin',
  "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
  '--gin.BATCH_SIZE=8',
  '--gin.calm_jax.CheckpointSettings.period=3',
  '--gin.calm_jax.LogSettings.progress=False',
]


_run = entry_points.run_module


def _steps(model_dir):
  return sorted(
    int(p.name)
    for p in (model_dir / 'checkpoints').iterdir()
    if p.name.isdigit()
  )


def _tensorboard_tags(directory) -> set:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  tags = set()
  for path in directory.glob('events.out.tfevents*'):
    events = event_accumulator.EventAccumulator(str(path))
    events.Reload()
    tags |= set(events.Tags().get('scalars', [])) | set(
      events.Tags().get('tensors', [])
    )
  return tags


def test_train_writes_checkpoints_and_resumes(tmp_path):
  model_dir = tmp_path / 'model'
  flags = [*TINY, f"--gin.MODEL_DIR='{model_dir}'"]
  first = _run('calm_jax.train', *flags, '--gin.TRAIN_STEPS=4')
  assert first.returncode == 0, first.stderr[-2000:]
  assert _steps(model_dir) == [3, 4]
  meta = json.loads((model_dir / 'model.json').read_text())
  assert meta['config']['num_decoder_layers'] == 4
  assert (model_dir / 'vocab' / meta['vocabulary']).exists()
  assert 'TRAIN_STEPS = 4' in (model_dir / 'config.gin').read_text()
  assert list((model_dir / 'train').glob('events.out.tfevents*'))
  assert first.stderr.startswith(
    'compiling train step (batch 8, lengths 56/6) ...'
  )
  assert model_dir.joinpath('model.json').exists()

  # The console shows what TensorBoard gets: per-exit accuracy, learning
  # rate, and validation metrics every eval_every steps.
  second = _run(
    'calm_jax.train',
    *flags,
    '--gin.TRAIN_STEPS=6',
    '--gin.calm_jax.LogSettings.log_every=2',
    '--gin.calm_jax.LogSettings.eval_every=2',
    '--gin.calm_jax.LogSettings.eval_batches=1',
  )
  assert second.returncode == 0, second.stderr[-2000:]
  lines = second.stderr.splitlines()
  logged = [l for l in lines if l.startswith('step 6: ')]
  assert logged and 'lr 1.00e-03' in logged[0]
  assert logged[0].count('accuracy by exit') == 1
  assert len(logged[0].split('accuracy by exit ')[1].split()) == 4  # exits
  assert [l for l in lines if l.startswith('step 6 validation: loss ')]
  scalars = _tensorboard_tags(model_dir / 'train')
  assert {
    'learning_rate',
    'validation/loss',
    'accuracy_per_exit/layer_4',
  } <= scalars

  third = _run('calm_jax.train', *flags, '--gin.TRAIN_STEPS=7')
  assert third.returncode == 0, third.stderr[-2000:]
  assert _steps(model_dir) == [4, 6, 7]  # resumed at 6: saved 7 only

  # A model dir with other dims is refused, and left untouched.
  clash = _run(
    'calm_jax.train',
    *flags,
    '--gin.TRAIN_STEPS=9',
    '--gin.calm_jax.T5Config.emb_dim=64',
  )
  assert clash.returncode == 2
  assert clash.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'emb_dim' in clash.stderr
  assert _steps(model_dir) == [4, 6, 7]


# 80 s of subprocess training: in make test-slow. The default run keeps the
# rule's small cases: test_train_writes_checkpoints_and_resumes (resume) and
# test_scan_layers' layout checks (a dir keeps its layout and says how to
# change it).
@pytest.mark.slow
def test_a_scanned_run_trains_resumes_and_keeps_its_layout(tmp_path):
  """SCAN_LAYERS=True: stacked parameters and per-layer optimizer state
  are saved and resumed; the dir then refuses the other layout."""
  model_dir = tmp_path / 'model'
  flags = [*TINY, f"--gin.MODEL_DIR='{model_dir}'", '--gin.SCAN_LAYERS=True']
  first = _run('calm_jax.train', *flags, '--gin.TRAIN_STEPS=3')
  assert first.returncode == 0, first.stderr[-2000:]
  meta = json.loads((model_dir / 'model.json').read_text())
  assert meta['config']['scan_layers'] is True
  second = _run('calm_jax.train', *flags, '--gin.TRAIN_STEPS=4')
  assert second.returncode == 0, second.stderr[-2000:]
  assert _steps(model_dir) == [3, 4]
  unrolled = _run(
    'calm_jax.train',
    *TINY,
    f"--gin.MODEL_DIR='{model_dir}'",
    '--gin.TRAIN_STEPS=5',
  )
  assert unrolled.returncode == 2
  assert 'INITIAL_CHECKPOINT_PATH' in unrolled.stderr.splitlines()[-1]
  assert _steps(model_dir) == [3, 4]


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--gin.calm_jax.nope.x=1'], "No configurable matching 'calm_jax.nope'"),
    (['--gin_file=gin/models/missing.gin'], 'gin file not found'),
    (["--gin.MIXTURE_OR_TASK_NAME='no_such_task'"], 'unknown task'),
    (['--bogus'], 'unknown flag'),
    (['--gin.MESH_SHAPE=(2, 1)'], 'mesh shape (2, 1) does not hold 1 devices'),
  ],
)
def test_bad_input_is_one_line_error(tmp_path, extra, message):
  result = _run(
    'calm_jax.train', *TINY, f"--gin.MODEL_DIR='{tmp_path / 'm'}'", *extra
  )
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, result.stderr[-1500:]
  assert not (tmp_path / 'm' / 'checkpoints').exists()


def test_empty_training_data_is_an_error(tmp_path):
  from calm_jax.model import models
  from calm_jax.model import network
  from calm_jax.training import optim
  from calm_jax.training import trainer

  model = models.CalmModel(
    network.T5Config(
      vocab_size=16,
      emb_dim=8,
      num_heads=1,
      head_dim=8,
      mlp_dim=8,
      num_encoder_layers=1,
      num_decoder_layers=2,
    )
  )
  with pytest.raises(ValueError, match='no training data'):
    trainer.train_loop(
      objective=trainer.model_objective(model),
      optimizer=optim.make_optimizer(),
      model_dir=str(tmp_path),
      batches_from=lambda _: iter(()),
      num_steps=2,
      progress=False,
    )
  assert not any((tmp_path / 'checkpoints').glob('[0-9]*'))
