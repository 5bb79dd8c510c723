"""Every gin file parses and binds against the real configurables."""

import glob
import os

import gin
import pytest

from calm_jax import cli
from calm_jax.jobs import train
from calm_jax.model import network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(
  os.path.relpath(p, REPO)
  for p in glob.glob(os.path.join(REPO, 'gin', '**', '*.gin'), recursive=True)
)
# Values for the macros that files leave to the command line.
REQUIRED = [
  "--gin.MODEL_DIR='/tmp/model'",
  "--gin.MODEL_DIR='/tmp/m'",
  "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
  '--gin.DELTA=0.1',
  "--gin.INITIAL_CHECKPOINT_PATH='/tmp/init'",
]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _value(key: str):
  """A bound value, with macros (%NAME) resolved."""
  value = gin.query_parameter(key)
  while isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value


def _flags(path: str) -> list[str]:
  # A run file is a fragment: stack it after a model, as users do.
  model = (
    ['--gin_file=gin/models/calm_t5_1_1_tiny.gin']
    if path.startswith(os.path.join('gin', 'runs'))
    else []
  )
  return model + [f'--gin_file={path}']


def test_the_expected_files_exist():
  names = {os.path.basename(p) for p in GIN_FILES}
  for name in (
    'calm_t5_1_1_tiny',
    'calm_t5_1_1_small',
    'calm_t5_1_1_base',
    'pretrain',
    'finetune',
    'train_classifier',
    'decode',
    'calibrate',
    'cnn_dailymail',
    'wmt15_enfr',
    'squad',
  ):
    assert f'{name}.gin' in names


@pytest.mark.parametrize('path', GIN_FILES)
def test_gin_file_parses_and_binds(path):
  cli.parse(_flags(path) + REQUIRED)
  # Every binding names a registered configurable (gin checks on parse);
  # the configured model and optimizer must also construct.
  try:
    gin.query_parameter('MODEL_CONFIG')
    has_model = True
  except ValueError:
    has_model = False
  if has_model:
    config = train.T5Config()
    assert isinstance(config, network.T5Config)
    assert config.num_decoder_layers in (4, 8, 12)
  try:
    gin.query_parameter('calm_jax.make_optimizer.name')
  except ValueError:
    return
  train.make_optimizer()


@pytest.mark.parametrize(
  'name,task',
  [
    ('cnn_dailymail', 'cnn_dailymail_v3'),
    ('wmt15_enfr', 'wmt15_enfr'),
    ('squad', 'squad_v010_allanswers'),
  ],
)
def test_paper_experiments_hold_the_whole_recipe(name, task):
  cli.parse(
    [f'--gin_file=gin/experiments/{name}.gin', "--gin.MODEL_DIR='runs/x'"]
  )
  assert train.T5Config() == network.T5Config(
    vocab_size=32128,
    emb_dim=512,
    num_heads=6,
    head_dim=64,
    mlp_dim=1024,
    num_encoder_layers=8,
    num_decoder_layers=8,
    dropout_rate=0.1,
  )
  for selector in ('train', 'calibrate', 'DecodeInputs'):
    assert _value(f'calm_jax.{selector}.mixture_or_task_name') == task
  assert _value('calm_jax.train.initial_checkpoint_path')
  assert _value('calm_jax.LossSettings.weighting') == 'linear'
  assert _value('calm_jax.calibrate.delta') == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
  tau = _value('calm_jax.ExitSettings.tau')
  assert tau == (None if name == 'squad' else 4.0)
  assert _value('calm_jax.decode.calibration_record') == (
    f'{task}_softmax_textual_delta0.25_eps0.05'
  )


def test_paper_task_names_are_registered():
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  for task in ('cnn_dailymail_v3', 'wmt15_enfr', 'squad_v010_allanswers'):
    assert pipeline.task_rates(task) == {task: 1.0}


@pytest.mark.parametrize(
  'size, emb_dim, dims, scan',
  [('large', 1024, 1, False), ('xl', 2048, 2, True), ('xxl', 4096, 2, True)],
)
def test_the_large_experiments_keep_the_recipe_at_their_size(
  size, emb_dim, dims, scan
):
  """CNN/DM at large, xl and xxl: the paper's task, batch and recipe, the
  size's dims, and the layout t5x runs it in."""
  cli.parse(
    [f'--gin_file=gin/experiments/cnn_dailymail_{size}.gin']
    + ["--gin.MODEL_DIR='/tmp/model'"]
  )
  assert _value('calm_jax.train.model_config').emb_dim == emb_dim
  assert _value('calm_jax.train.mixture_or_task_name') == 'cnn_dailymail_v3'
  assert _value('calm_jax.train.batch_size') == 128
  assert _value('calm_jax.train.parameter_partitioning_dims') == dims
  assert _value('calm_jax.train.scan_layers') is scan
  assert _value('calm_jax.train.initial_checkpoint_path') == (
    f'runs/t5_1_1_{size}'
  )
  assert _value('calm_jax.ExitSettings.confidence') == 'softmax'
