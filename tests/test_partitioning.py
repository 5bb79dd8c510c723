"""partitioning.py on 8 simulated CPU devices (in a subprocess, since the
device count is fixed when JAX starts)."""
import os
import subprocess
import sys
import textwrap

import pytest

from calm_jax import partitioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from calm_jax import models, network, partitioning
    assert jax.device_count() == 8
    cfg = network.T5Config(vocab_size=1024, emb_dim=32, num_heads=4,
                           head_dim=8, mlp_dim=64, num_encoder_layers=2,
                           num_decoder_layers=4)
    model = models.CalmModel(cfg)
    params = model.init_params(jax.random.PRNGKey(0))['params']
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 1024, (8, 6)).astype(np.int32)
    batch = {'encoder_input_tokens': rng.integers(2, 1024, (8, 10)
                                                  ).astype(np.int32),
             'decoder_target_tokens': targets,
             'decoder_input_tokens': np.concatenate(
                 [np.zeros((8, 1), np.int32), targets[:, :-1]], 1),
             'decoder_loss_weights': np.ones((8, 6), np.float32)}
    loss_fn = jax.jit(lambda p, b: model.loss(p, b)[0])
    reference = float(loss_fn(params, batch))
    for shape in [(8, 1), (4, 2), (2, 4)]:
      mesh = partitioning.make_mesh(shape)
      shardings = partitioning.param_shardings(model.param_axes(), mesh)
      sharded = jax.device_put(params, shardings)
      enc = sharded['encoder']['layers_0']
      assert enc['attention']['query'].sharding.spec == P(None, 'model',
                                                          None), shape
      assert enc['mlp']['wo'].sharding.spec == P('model', None), shape
      assert sharded['token_embedder']['embedding'].sharding.spec == P(
          'model', None), shape
      assert sharded['decoder']['decoder_norm']['scale'].sharding.spec == (
          P(None,)), shape
      placed = jax.device_put(batch, partitioning.batch_sharding(mesh))
      loss = float(loss_fn(sharded, placed))
      assert abs(loss - reference) < 1e-5 * max(1, abs(reference)), (
          shape, loss, reference)
    print('ok')
''')


def test_mesh_shape_must_hold_the_devices():
  with pytest.raises(ValueError, match=r'does not hold 1 devices'):
    partitioning.make_mesh((2, 1))
  assert partitioning.make_mesh().shape == {'data': 1, 'model': 1}


def test_params_shard_by_the_rules_and_the_loss_is_unchanged():
  env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')
