"""network.py: exits, cache consistency, configuration."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import cli
from calm_jax.decoding import loops
from calm_jax.model import models
from calm_jax.model import network

TINY = network.T5Config(
  vocab_size=64,
  emb_dim=32,
  num_heads=2,
  head_dim=8,
  mlp_dim=48,
  num_encoder_layers=2,
  num_decoder_layers=4,
)


@pytest.fixture(scope='module')
def model_and_params():
  model = models.CalmModel(TINY)
  return model, model.init_params(jax.random.PRNGKey(0))['params']


def _inputs():
  rng = np.random.RandomState(0)
  enc = rng.randint(3, 64, size=(3, 7)).astype(np.int32)
  enc[1, 5:] = 0  # padding
  dec = rng.randint(3, 64, size=(3, 6)).astype(np.int32)
  dec[:, 0] = 0
  return jnp.asarray(enc), jnp.asarray(dec)


def test_exit_layers_follow_first_exit_and_interval():
  assert TINY.exit_layers == (1, 2, 3, 4)
  cfg = network.T5Config(num_decoder_layers=8, first_exit=2, exit_interval=3)
  assert cfg.exit_layers == (2, 5, 8)
  with pytest.raises(ValueError, match='first_exit'):
    network.T5Config(num_decoder_layers=4, first_exit=5)


def test_each_exit_is_final_norm_and_head_of_its_layer(model_and_params):
  model, params = model_and_params
  enc, dec = _inputs()
  module = model.module
  hidden = module.apply(
    {'params': params}, enc, dec, method=network.EncoderDecoder.decoder_hidden
  )
  logits = module.apply({'params': params}, enc, dec)
  assert logits.shape == (4, 3, 6, 64)
  dparams = params['decoder']
  scale = np.asarray(dparams['decoder_norm']['scale'])
  head = np.asarray(dparams['logits_dense'])
  for i in range(4):
    h = np.asarray(hidden[i])
    normed = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(
      np.asarray(logits[i]), normed @ head, rtol=1e-4, atol=1e-4
    )
  # The top exit is different from a lower one: the layers do something.
  assert not np.allclose(logits[0], logits[-1])


def test_step_by_step_decode_matches_teacher_forced_forward(model_and_params):
  """Every layer's hidden state, position by position, equals the full pass."""
  model, params = model_and_params
  enc, dec = _inputs()
  hidden = model.module.apply(
    {'params': params}, enc, dec, method=network.EncoderDecoder.decoder_hidden
  )
  length = dec.shape[1]
  fns = model.step_fns(params, enc, max_length=length)
  cache = loops.KVCache.zeros(4, (3, length, 2, 8), jnp.float32)
  for position in range(length):
    x = fns.embed(dec[:, position])
    for layer in range(4):
      x, cache = loops.full_depth_layer(
        fns, layer, x, cache, jnp.asarray(position)
      )
      np.testing.assert_allclose(
        np.asarray(x[:, 0]),
        np.asarray(hidden[layer, :, position]),
        rtol=2e-4,
        atol=2e-4,
      )


def test_layer_kv_is_projection_of_layer_input(model_and_params):
  """The K/V a skipped layer would write come from its own norm + K/V."""
  model, params = model_and_params
  enc, _ = _inputs()
  fns = model.step_fns(params, enc, max_length=4)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 1, 32))
  k, v = fns.layer_kv(2, x, 0)
  lp = params['decoder']['layers_2']
  scale = np.asarray(lp['pre_self_attention_norm']['scale'])
  xn = (
    np.asarray(x)
    / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + 1e-6)
    * scale
  )
  np.testing.assert_allclose(
    np.asarray(k),
    np.einsum('ble,ehd->blhd', xn, lp['self_attention']['key']),
    rtol=1e-4,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(v),
    np.einsum('ble,ehd->blhd', xn, lp['self_attention']['value']),
    rtol=1e-4,
    atol=1e-5,
  )


def test_param_axes_cover_every_param(model_and_params):
  model, params = model_and_params
  axes = model.param_axes()
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  flat_axes = dict(
    jax.tree_util.tree_leaves_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
  )
  for path, value in flat_params:
    assert len(flat_axes[path]) == value.ndim, path


# The layers below the jobs never import TensorFlow, SeqIO or gin; only
# the data pipeline, the SeqIO task registrations, the jobs and the command
# line (gin) do, with each job's `python -m calm_jax.<job>` entry module
# (cli.JOBS names them all, so a new job cannot be forgotten here).
TENSORFLOW_LAYER = (
  'calm_jax.data.pipeline',
  'calm_jax.tasks',
  'calm_jax.jobs',
  'calm_jax.cli',
)


def test_core_modules_import_without_tensorflow_or_gin():
  code = (
    'import pkgutil, sys, importlib, calm_jax\n'
    'names = [m.name for m in pkgutil.walk_packages(calm_jax.__path__, '
    '"calm_jax.")]\n'
    f'skip = {TENSORFLOW_LAYER!r}\n'
    f'commands = {tuple(cli.JOBS)!r}\n'
    'core = [n for n in names if not n.startswith(skip) and n.count(".") '
    '>= 1 and n.split(".")[1] not in commands]\n'
    'for n in core: importlib.import_module(n)\n'
    'bad = [m for m in ("tensorflow", "gin", "seqio") if m in sys.modules]\n'
    'print(len(core), bad); sys.exit(1 if bad or len(core) < 30 else 0)'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stdout + result.stderr
