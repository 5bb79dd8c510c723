"""Scaling out: sharded training, checkpoints across meshes, sharded early
exit (8 simulated devices, in a subprocess: tests/mesh_checks.py), and the
multi-process helpers."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from calm_jax import models
from calm_jax import multihost
from calm_jax import network
from calm_jax import partitioning

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESHES = ('(8, 1)', '(4, 2)', '(2, 4)')


def device_env(count: int) -> dict:
  env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={count}',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return env


@pytest.fixture(scope='module')
def mesh_results():
  result = subprocess.run([sys.executable, 'tests/mesh_checks.py'], cwd=ROOT,
                          env=device_env(8), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_on_each_mesh_equals_one_device(mesh_results):
  reference = mesh_results['reference_losses']
  assert len(reference) == 3 and reference[2] < reference[0]
  for shape in MESHES:
    run = mesh_results['meshes'][shape]
    np.testing.assert_allclose(run['losses'], reference, rtol=1e-5)
    assert run['params_difference'] < 1e-5, shape
    assert run['opt_state_difference'] < 1e-6, shape


@pytest.mark.parametrize('shape, model_shards', [('(8, 1)', 1), ('(4, 2)', 2),
                                                 ('(2, 4)', 4)])
def test_parameters_are_sharded_by_the_rules(mesh_results, shape,
                                             model_shards):
  specs = mesh_results['meshes'][shape]['specs']
  # query [embed 32, heads 4, kv 8]: heads over 'model'.
  assert specs['query'] == {'spec': [None, 'model', None],
                            'shard_shape': [32, 4 // model_shards, 8]}
  # out [heads, kv, embed]; wi_0 [embed, mlp 64]; embedding [vocab 256, e].
  assert specs['out']['shard_shape'] == [4 // model_shards, 8, 32]
  assert specs['wi_0'] == {'spec': [None, 'model'],
                           'shard_shape': [32, 64 // model_shards]}
  assert specs['embedding'] == {'spec': ['model', None],
                                'shard_shape': [256 // model_shards, 32]}
  assert specs['norm'] == {'spec': [None], 'shard_shape': [32]}
  # Optimizer state shaped like a parameter is split like it.
  assert mesh_results['meshes'][shape]['opt_state_query_shards'] == [
      str([32, 4 // model_shards, 8])]


def test_checkpoint_saved_on_4x2_restores_on_8x1_and_one_device(
    mesh_results):
  for name, devices, model_shards in (('(8, 1)', 8, 1), ('one device', 1, 1)):
    restored = mesh_results['restore'][name]
    assert restored['step'] == restored['resumed_step'] == 3
    assert restored['difference'] == 0.0
    assert restored['state_difference'] == 0.0
    assert restored['query_devices'] == devices
    assert restored['query']['shard_shape'] == [32, 4 // model_shards, 8]


def test_early_exit_decode_on_4x2_equals_one_device(mesh_results):
  decode = mesh_results['decode']
  assert decode['distinct_exit_layers'] == [1, 2, 3, 4]  # a real spread
  assert decode['same_tokens'] and decode['same_exit_layers']
  assert decode['confidence_difference'] < 1e-5
  assert decode['layer_evals'][0] == decode['layer_evals'][1]
  # 16 rows over 4 'data' shards.
  assert decode['tokens'] == {'spec': ['data'], 'shard_shape': [4, 10]}


def test_optimizer_state_follows_the_parameters():
  cfg = network.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8,
                         mlp_dim=32, num_encoder_layers=1,
                         num_decoder_layers=2)
  model = models.CalmModel(cfg)
  params = jax.eval_shape(
      lambda: model.init_params(jax.random.PRNGKey(0))['params'])
  mesh = partitioning.make_mesh()
  shardings = partitioning.param_shardings(model.param_axes(), mesh)
  for optimizer in (optax.adamw(1e-3), optax.adafactor(1e-3)):
    state = jax.eval_shape(optimizer.init, params)
    picked = partitioning.shardings_like_params(state, params, shardings,
                                                mesh)
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
      {'a': 1}, {'b': 2}]


def test_distributed_settings_are_checked(monkeypatch):
  for name in (multihost.COORDINATOR_ENV, multihost.NUM_PROCESSES_ENV,
               multihost.PROCESS_ID_ENV):
    monkeypatch.delenv(name, raising=False)
  assert multihost.initialize() is False  # no coordinator: one process
  with pytest.raises(ValueError, match='CALM_NUM_PROCESSES'):
    multihost.initialize('127.0.0.1:1234')
  monkeypatch.setenv(multihost.NUM_PROCESSES_ENV, '2')
  monkeypatch.setenv(multihost.PROCESS_ID_ENV, '2')
  with pytest.raises(ValueError, match=r'process id 2 is not in \[0, 2\)'):
    multihost.initialize('127.0.0.1:1234')
