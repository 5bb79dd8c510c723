"""Scaling out: sharded training, checkpoints across meshes, sharded early
exit (8 simulated devices, in a subprocess: tests/mesh_checks.py), and the
multi-process helpers."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import pytest

from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESHES = ('(8, 1)', '(4, 2)', '(2, 4)')


def device_env(count: int) -> dict:
  env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
  # The test run's XLA flags (conftest.py), plus the device count.
  flags = [
    f
    for f in env.get('XLA_FLAGS', '').split()
    if not f.startswith('--xla_force_host_platform_device_count')
  ]
  env.update(
    XLA_FLAGS=' '.join(
      [*flags, f'--xla_force_host_platform_device_count={count}']
    ),
    JAX_PLATFORMS='cpu',
    TF_CPP_MIN_LOG_LEVEL='3',
  )
  return env


def _mesh_checks(*meshes: str) -> dict:
  result = subprocess.run(
    [sys.executable, 'tests/mesh_checks.py', *meshes],
    cwd=ROOT,
    env=device_env(8),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def mesh_results():
  """Training on (4, 2), which splits both 'data' and 'model', against one
  device; restore, decode and constraint checks."""
  return _mesh_checks('4x2')


@pytest.fixture(scope='module')
def all_mesh_results():
  return _mesh_checks('8x1', '4x2', '2x4')


def _same_training(results) -> None:
  reference = results['reference_losses']
  assert len(reference) == 3 and reference[2] < reference[0]
  for shape, run in results['meshes'].items():
    np.testing.assert_allclose(run['losses'], reference, rtol=1e-5)
    assert run['params_difference'] < 1e-5, shape
    assert run['opt_state_difference'] < 1e-6, shape


def test_training_on_a_mesh_equals_one_device(mesh_results):
  assert list(mesh_results['meshes']) == ['(4, 2)', '(4, 2) 2D']
  _same_training(mesh_results)


@pytest.mark.slow  # two more meshes: about 40 s
def test_training_on_each_mesh_equals_one_device(all_mesh_results):
  assert list(all_mesh_results['meshes']) == [*MESHES, '(4, 2) 2D']
  _same_training(all_mesh_results)


def test_2d_rules_split_parameters_over_data_too(mesh_results):
  """parameter_partitioning_dims=2: 'embed' over the 4 'data' shards as
  well, in parameters and the optimizer state shaped like them."""
  specs = mesh_results['meshes']['(4, 2) 2D']['specs']
  assert specs['query'] == {
    'spec': ['data', 'model', None],
    'shard_shape': [32 // 4, 4 // 2, 8],
  }
  assert specs['out'] == {
    'spec': ['model', None, 'data'],
    'shard_shape': [4 // 2, 8, 32 // 4],
  }
  assert specs['wi_0']['spec'] == ['data', 'model']
  assert specs['embedding'] == {
    'spec': ['model', 'data'],
    'shard_shape': [256 // 2, 32 // 4],
  }
  assert specs['norm'] == {'spec': ['data'], 'shard_shape': [32 // 4]}
  assert mesh_results['meshes']['(4, 2) 2D']['opt_state_query_shards'] == [
    str([8, 2, 8])
  ]


def test_parameters_are_sharded_by_the_rules(mesh_results):
  _sharded_by_the_rules(mesh_results, '(4, 2)', 2)


@pytest.mark.slow
@pytest.mark.parametrize('shape, model_shards', [('(8, 1)', 1), ('(2, 4)', 4)])
def test_parameters_are_sharded_by_the_rules_on_other_meshes(
  all_mesh_results, shape, model_shards
):
  _sharded_by_the_rules(all_mesh_results, shape, model_shards)


def _sharded_by_the_rules(mesh_results, shape, model_shards) -> None:
  specs = mesh_results['meshes'][shape]['specs']
  # query [embed 32, heads 4, kv 8]: heads over 'model'.
  assert specs['query'] == {
    'spec': [None, 'model', None],
    'shard_shape': [32, 4 // model_shards, 8],
  }
  # out [heads, kv, embed]; wi_0 [embed, mlp 64]; embedding [vocab 256, e].
  assert specs['out']['shard_shape'] == [4 // model_shards, 8, 32]
  assert specs['wi_0'] == {
    'spec': [None, 'model'],
    'shard_shape': [32, 64 // model_shards],
  }
  assert specs['embedding'] == {
    'spec': ['model', None],
    'shard_shape': [256 // model_shards, 32],
  }
  assert specs['norm'] == {'spec': [None], 'shard_shape': [32]}
  # Optimizer state shaped like a parameter is split like it.
  assert mesh_results['meshes'][shape]['opt_state_query_shards'] == [
    str([32, 4 // model_shards, 8])
  ]


def test_activations_carry_the_rules_only_under_them(mesh_results):
  # 2 encoder + 4 decoder layers: q, k, v of each attention (6 + 24), the
  # MLP hidden units of each layer (6), each layer's output (6).
  assert mesh_results['constraints'] == {
    'without_rules': 0,
    'with_rules': 42,
    'heads_layout': 30,
    'embed_layout': 6,
  }


def test_checkpoint_saved_on_4x2_restores_on_8x1_and_one_device(mesh_results):
  """Across meshes and across the 1D and 2D layouts, both ways."""
  for name, devices, shard_shape in (
    ('(8, 1)', 8, [32, 4, 8]),
    ('one device', 1, [32, 4, 8]),
    ('(4, 2) 2D', 8, [8, 2, 8]),
    ('2D onto (8, 1)', 8, [32, 4, 8]),
  ):
    restored = mesh_results['restore'][name]
    assert restored['step'] == restored['resumed_step'] == 3
    assert restored['difference'] == 0.0
    assert restored['state_difference'] == 0.0
    assert restored['query_devices'] == devices
    assert restored['query']['shard_shape'] == shard_shape


def test_early_exit_decode_on_4x2_equals_one_device(mesh_results):
  decode = mesh_results['decode']
  assert decode['distinct_exit_layers'] == [1, 2, 3, 4]  # a real spread
  assert decode['same_tokens'] and decode['same_exit_layers']
  assert decode['same_top_layer_tokens']
  assert decode['confidence_difference'] < 1e-5
  assert decode['layer_evals'][0] == decode['layer_evals'][1]
  # 16 rows over 4 'data' shards.
  assert decode['tokens'] == {'spec': ['data'], 'shard_shape': [4, 10]}


def _same_exact_mode(exact: dict, shapes, samplings) -> None:
  assert sorted(exact) == sorted(
    f'{name} {shape}' for name in samplings for shape in shapes
  )
  for case, run in exact.items():
    assert run['same_tokens'] and run['same_counts'], case
    assert run['layer_evals'][0] == run['layer_evals'][1], case
    assert run['accepted'] > 0, case  # drafts were kept: a real draft


def test_the_greedy_exact_mode_on_4x2_equals_one_device(mesh_results):
  _same_exact_mode(mesh_results['exact'], ['(4, 2)'], ['greedy'])


@pytest.mark.slow  # eight more exact-mode compiles
def test_the_exact_mode_on_each_mesh_equals_one_device(all_mesh_results):
  _same_exact_mode(
    all_mesh_results['exact'],
    ['(2, 1)', '(1, 2)', '(4, 2)'],
    ['greedy', 'sampled'],
  )


def test_the_fused_exit_loss_on_a_mesh_equals_one_device(mesh_results):
  """Vocabulary split over 'model' (log-sum-exp, target logit and argmax
  combined across devices), tokens over 'data' (the output layer's
  gradient summed across them), 1D and 2D rules."""
  runs = mesh_results['fused_loss']
  assert set(runs) == {'(4, 2) 1D', '(2, 4) 1D', '(4, 2) 2D'}
  for name, run in runs.items():
    assert run['layout'] == ['data', 'model'], name
    assert run['outputs_difference'] < 1e-5, name
    assert run['gradients_difference'] < 1e-5, name
    assert run['correct'] > 0, name  # the argmax check is not vacuous


def test_optimizer_state_follows_the_parameters():
  cfg = network.T5Config(
    vocab_size=64,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_encoder_layers=1,
    num_decoder_layers=2,
  )
  model = models.CalmModel(cfg)
  params = jax.eval_shape(
    lambda: model.init_params(jax.random.PRNGKey(0))['params']
  )
  mesh = partitioning.make_mesh()
  shardings = partitioning.param_shardings(model.param_axes(), mesh)
  for optimizer in (optax.adamw(1e-3), optax.adafactor(1e-3)):
    state = jax.eval_shape(optimizer.init, params)
    picked = partitioning.shardings_like_params(state, params, shardings, mesh)
    flat = jax.tree_util.tree_leaves_with_path(state)
    matched = 0
    for (path, leaf), sharding in zip(flat, jax.tree_util.tree_leaves(picked)):
      if 'wi_0' in jax.tree_util.keystr(path) and leaf.shape == (16, 32):
        assert sharding.spec == jax.sharding.PartitionSpec(None, 'model')
        matched += 1
      elif leaf.ndim == 0:
        assert sharding.spec == jax.sharding.PartitionSpec()
    # One wi_0 per layer: Adam keeps mu and nu of each, Adafactor one
    # unfactored second moment (its dims are under 128).
    layers = cfg.num_encoder_layers + cfg.num_decoder_layers
    assert matched == layers * (2 if 'mu' in str(state) else 1), matched


def test_batch_must_split_over_the_data_axis():
  mesh = partitioning.make_mesh()
  partitioning.check_batch_fits(3, mesh)  # one device takes any batch
  fake = type('FakeMesh', (), {'shape': {'data': 4, 'model': 2}})()
  with pytest.raises(ValueError, match="4 'data' shards; use a multiple"):
    partitioning.check_batch_fits(6, fake)


def test_interleave_undoes_the_process_sharding():
  items = list(range(11))
  shards = [items[i::3] for i in range(3)]  # what ShardInfo(i, 3) keeps
  assert multihost.interleave(shards) == items
  assert multihost.interleave([[], []]) == []
  # One process: gathering is the identity.
  assert multihost.gather_in_input_order([{'a': 1}, {'b': 2}]) == [
    {'a': 1},
    {'b': 2},
  ]


def test_distributed_settings_are_checked(monkeypatch):
  for name in (
    multihost.COORDINATOR_ENV,
    multihost.NUM_PROCESSES_ENV,
    multihost.PROCESS_ID_ENV,
  ):
    monkeypatch.delenv(name, raising=False)
  assert multihost.initialize() is False  # no coordinator: one process
  with pytest.raises(ValueError, match='CALM_NUM_PROCESSES'):
    multihost.initialize('127.0.0.1:1234')
  monkeypatch.setenv(multihost.NUM_PROCESSES_ENV, '2')
  monkeypatch.setenv(multihost.PROCESS_ID_ENV, '2')
  with pytest.raises(ValueError, match=r'process id 2 is not in \[0, 2\)'):
    multihost.initialize('127.0.0.1:1234')


# Two processes on this machine, 4 simulated devices each, against one
# process with 8: the train and decode entry points as users run them.
TRAIN = [
  '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
  '--gin_file=gin/runs/train.gin',
  "--gin.MIXTURE_OR_TASK_NAME='synth_mix'",
  '--gin.BATCH_SIZE=16',
  '--gin.TRAIN_STEPS=3',
  '--gin.calm_jax.train.shuffle=False',
  '--gin.calm_jax.LogSettings.progress=False',
  '--gin.MESH_SHAPE=(4, 2)',
]
DECODE = [
  '--gin_file=gin/runs/decode.gin',
  "--gin.MIXTURE_OR_TASK_NAME='synth_translate'",
  '--gin.calm_jax.DecodeInputs.num_examples=9',  # shards of 5 and 4
  '--gin.calm_jax.RunSettings.batch_size=8',
  '--gin.MESH_SHAPE=(4, 2)',
]


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_job(module: str, flags: list, processes: int) -> None:
  """Runs an entry point as `processes` processes sharing 8 devices."""
  port = _free_port()
  jobs, logs = [], []
  for index in range(processes):
    env = device_env(8 // processes)
    if processes > 1:
      env.update(
        {
          multihost.COORDINATOR_ENV: f'127.0.0.1:{port}',
          multihost.BIND_ENV: f'127.0.0.1:{port}',
          multihost.NUM_PROCESSES_ENV: str(processes),
          multihost.PROCESS_ID_ENV: str(index),
        }
      )
    # Files, not pipes: nobody reads a pipe while the processes run.
    logs.append(tempfile.TemporaryFile('w+'))
    jobs.append(
      subprocess.Popen(
        [sys.executable, '-m', module, *flags],
        cwd=ROOT,
        env=env,
        stdout=logs[-1],
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  _wait_all(jobs, logs, timeout=600)


def _wait_all(jobs: list, logs: list, timeout: float) -> None:
  """Waits for every process; the first to fail stops the others (a peer
  left waiting in a collective would otherwise hang until the timeout) and
  its output is the assertion's message."""
  deadline = time.monotonic() + timeout
  try:
    while any(job.poll() is None for job in jobs):
      failed = [j for j in jobs if j.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for job in jobs:
      if job.poll() is None:
        job.kill()
  for index, (job, log) in enumerate(zip(jobs, logs)):
    job.wait()
    log.seek(0)
    assert job.returncode == 0, f'process {index}: {log.read()[-3000:]}'


def _records(path: pathlib.Path) -> list:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # about 90 s: four jobs, each importing TF and compiling
def test_two_processes_train_and_decode_like_one(tmp_path):
  from calm_jax.model import model_files  # pylint: disable=g-import-not-at-top

  for processes in (1, 2):
    model_dir = tmp_path / f'model_{processes}'
    run_job(
      'calm_jax.train', [*TRAIN, f"--gin.MODEL_DIR='{model_dir}'"], processes
    )
    run_job(
      'calm_jax.decode',
      [
        *DECODE,
        f"--gin.MODEL_DIR='{tmp_path / 'model_1'}'",
        '--gin.THRESHOLD=0.02',
        f"--gin.OUTPUT_DIR='{tmp_path / f'decode_{processes}'}'",
      ],
      processes,
    )
  config, _ = model_files.read_model_config(str(tmp_path / 'model_1'))
  one, step = model_files.load_params(str(tmp_path / 'model_1'), config)
  two, step_two = model_files.load_params(str(tmp_path / 'model_2'), config)
  assert step == step_two == 3
  difference = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)
    )
  )
  assert difference < 1e-5

  single = _records(tmp_path / 'decode_1' / 'synth_translate.jsonl')
  double = _records(tmp_path / 'decode_2' / 'synth_translate.jsonl')
  assert len(single) == len(double) == 9
  for a, b in zip(single, double):
    assert (a['inputs'], a['prediction'], a['exit_layers']) == (
      b['inputs'],
      b['prediction'],
      b['exit_layers'],
    )
    as_array = lambda c: np.array([np.nan if x is None else x for x in c])
    np.testing.assert_allclose(
      as_array(a['confidences']), as_array(b['confidences']), atol=2e-4
    )
  layers = {l for r in single for l in r['exit_layers']}
  assert len(layers) > 1, layers  # the threshold makes exits differ


@pytest.mark.slow  # about a minute: three calibration jobs
def test_two_processes_calibrate_like_one(tmp_path):
  """Calibration decodes on two processes certify what one process does;
  a second two-process run takes every decode from the cache."""
  model_dir = tmp_path / 'model'
  run_job(
    'calm_jax.train',
    [*TRAIN, f"--gin.MODEL_DIR='{model_dir}'", '--gin.MESH_SHAPE=None'],
    1,
  )
  shutil.copytree(model_dir, tmp_path / 'copy')
  flags = [
    '--gin_file=gin/runs/calibrate.gin',
    "--gin.MIXTURE_OR_TASK_NAME='synth_translate'",
    '--gin.DELTA=0.25',
    '--gin.calm_jax.calibrate.num_examples=9',
    '--gin.calm_jax.RunSettings.batch_size=8',
    '--gin.calm_jax.calibrate.grid_step=0.25',
    '--gin.EPSILON=0.2',
    '--gin.MESH_SHAPE=(4, 2)',
  ]
  name = 'synth_translate_softmax_textual_delta0.25_eps0.2_*.json'
  records = []
  for processes, directory in (
    (1, model_dir),
    (2, tmp_path / 'copy'),
    (2, tmp_path / 'copy'),
  ):
    run_job(
      'calm_jax.calibrate',
      [*flags, f"--gin.MODEL_DIR='{directory}'"],
      processes,
    )
    [path] = (directory / 'calibration').glob(name)
    records.append(json.loads(path.read_text()))
  cache = sorted(
    p.name for p in (tmp_path / 'copy' / 'calibration' / 'cache').iterdir()
  )
  assert cache == sorted(
    p.name for p in (model_dir / 'calibration' / 'cache').iterdir()
  )
  for record in records[1:]:
    assert record['fingerprint'] == records[0]['fingerprint']
    assert record['threshold'] == records[0]['threshold']
    assert record['table'] == records[0]['table']
  assert len(records[0]['table']) > 1  # the fixed-sequence test went on


def test_process_shares_of_a_split_interleave_back_to_it():
  from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top

  shares = [engine.process_share(7, i, 3) for i in range(3)]
  assert [len(s) for s in shares] == [3, 2, 2]
  assert multihost.interleave(shares) == list(range(7))


def test_training_shards_split_each_global_batch():
  """Unshuffled, the processes' rows of a step are the one-process batch."""
  import seqio  # pylint: disable=g-import-not-at-top

  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  whole = next(pipeline.train_batches('synth_qa', batch_size=8, shuffle=False))
  halves = [
    next(
      pipeline.train_batches(
        'synth_qa', batch_size=4, shuffle=False, shard=seqio.ShardInfo(i, 2)
      )
    )
    for i in range(2)
  ]
  rows = lambda b: sorted(map(tuple, b['encoder_input_tokens'].tolist()))
  assert rows(whole) == sorted(rows(halves[0]) + rows(halves[1]))
  assert rows(halves[0]) != rows(halves[1])
