"""bfloat16 activations over float32 parameters (t5x's default on TPU/GPU):
every decoding path, the training loss and its gradients, on a tiny model."""

import dataclasses
import functools
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.decoding import confidence
from calm_jax.decoding import loops
from calm_jax.decoding import thresholds
from calm_jax.model import models
from calm_jax.model import network

F32 = network.T5Config(
  vocab_size=40,
  emb_dim=32,
  num_heads=2,
  head_dim=8,
  mlp_dim=48,
  num_encoder_layers=2,
  num_decoder_layers=4,
)
BF16 = dataclasses.replace(F32, dtype='bfloat16')
MAX_LENGTH = 7


@pytest.fixture(scope='module')
def params():
  params = models.CalmModel(F32).init_params(jax.random.PRNGKey(0))['params']
  # A large logit scale spreads confidences (as in test_decoding).
  params['decoder']['logits_dense'] = params['decoder']['logits_dense'] * 4
  return params


def _inputs(batch, seed=0):
  enc = np.random.RandomState(seed).randint(3, 40, (batch, 6)).astype(np.int32)
  enc[:, -1] = 1
  return jnp.asarray(enc)


@functools.lru_cache(maxsize=None)
def _early(config, exit_config):
  model = models.CalmModel(config)
  return jax.jit(
    lambda p, c, e, t: model.decode_early_exit(
      p, e, MAX_LENGTH, exit_config=exit_config, threshold=t, classifier=c
    )
  )


def _classifier():
  kernel = jax.random.normal(jax.random.PRNGKey(3), (F32.emb_dim, 1))
  return {'kernel': kernel, 'bias': jnp.zeros((1,))}


def test_unknown_dtype_is_refused():
  with pytest.raises(
    ValueError, match="unknown dtype 'float16'; valid: float32, bfloat16"
  ):
    dataclasses.replace(F32, dtype='float16')


def test_activations_are_bf16_and_logits_float32(params):
  fns = models.CalmModel(BF16).step_fns(params, _inputs(2), MAX_LENGTH)
  x = fns.embed(jnp.zeros((2,), jnp.int32))
  k, v = fns.layer_kv(0, x, 0)
  keys = jnp.zeros((2, MAX_LENGTH, 2, 8), jnp.bfloat16).at[:, :1].set(k)
  out = fns.layer_step(0, x, keys, keys, jnp.asarray(0))
  assert (x.dtype, k.dtype, v.dtype, out.dtype) == (jnp.bfloat16,) * 4
  assert fns.logits(out[:, 0]).dtype == jnp.float32
  assert fns.cross_kv[0][0].dtype == jnp.bfloat16
  # The float32 model computes the same function, to bfloat16 precision.
  f32 = models.CalmModel(F32).all_layer_logits(
    params, _inputs(2), _inputs(2, seed=1)
  )
  bf16 = models.CalmModel(BF16).all_layer_logits(
    params, _inputs(2), _inputs(2, seed=1)
  )
  assert bf16.dtype == jnp.float32
  scale = float(jnp.abs(f32).max())
  assert float(jnp.abs(f32 - bf16).max()) < 0.05 * scale


@pytest.mark.parametrize(
  'measure, propagation',
  [
    ('softmax', 'hidden'),
    # softmax_max differs from softmax only in the top-1 read, and 'none'
    # from 'kv_copy' only in what skipped rows get: both in make test-slow.
    pytest.param('softmax_max', 'hidden', marks=pytest.mark.slow),
    ('state', 'hidden'),
    ('classifier', 'hidden'),
    ('softmax', 'kv_copy'),
    pytest.param('softmax', 'none', marks=pytest.mark.slow),
  ],
)
def test_every_measure_and_propagation_decodes_in_bf16(
  params, measure, propagation
):
  cfg = loops.ExitConfig.create(4, confidence=measure, propagation=propagation)
  classifier = _classifier() if measure == 'classifier' else None
  out = _early(BF16, cfg)(params, classifier, _inputs(5), 0.5)
  layers = np.asarray(out.exit_layers)
  real = layers > 0
  assert out.confidences.dtype == jnp.float32
  exited = real & (layers < 4)
  assert np.all(np.isfinite(np.asarray(out.confidences)[exited]))
  assert np.all(np.isnan(np.asarray(out.confidences)[real & (layers == 4)]))
  assert layers[real].min() >= confidence.lowest_exit_layer(measure)
  assert layers[real].max() <= 4
  assert np.all(np.asarray(out.tokens)[real] < F32.vocab_size)


@pytest.mark.parametrize('measure', ['softmax', 'state'])
def test_bf16_disabled_exits_equal_static_decode(params, measure):
  # Exact bfloat16 rounding at every op (tests/conftest.py sets
  # --xla_allow_excess_precision=false): XLA's default may keep a fused
  # intermediate in float32 in one program and not the other.
  batch = 4
  cfg = loops.ExitConfig(
    confidence=measure, exit_layers=thresholds.allowed_exit_layers(4)
  )
  early = _early(BF16, cfg)(params, None, _inputs(batch), 1.5)
  model = models.CalmModel(BF16)
  static = jax.jit(lambda p, e: model.decode_static(p, e, MAX_LENGTH))(
    params, _inputs(batch)
  )
  np.testing.assert_array_equal(early.tokens, static.tokens)
  np.testing.assert_array_equal(early.exit_layers, static.exit_layers)


def test_bf16_oracle_keeps_the_full_models_tokens(params):
  model = models.CalmModel(BF16)
  oracle = jax.jit(
    lambda p, e: model.decode_static(p, e, MAX_LENGTH, oracle=True)
  )(params, _inputs(4, seed=5))
  static = jax.jit(lambda p, e: model.decode_static(p, e, MAX_LENGTH))(
    params, _inputs(4, seed=5)
  )
  np.testing.assert_array_equal(oracle.tokens, static.tokens)


def test_bf16_training_loss_and_gradients_are_float32_and_close(params):
  targets = np.asarray(_inputs(3, seed=2))
  batch = {
    'encoder_input_tokens': _inputs(3),
    'decoder_input_tokens': jnp.asarray(
      np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], 1)
    ),
    'decoder_target_tokens': jnp.asarray(targets),
    'decoder_loss_weights': jnp.asarray(targets > 0),
  }
  losses = {}
  for config in (F32, BF16):
    model = models.CalmModel(config)
    (loss, _), grads = jax.value_and_grad(model.loss, has_aux=True)(
      params, batch
    )
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    losses[config.dtype] = float(loss)
  assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=0.02)
  # Classifier stage: its loss runs on bf16 hidden states, in float32.
  model = models.CalmModel(BF16)
  loss, _ = model.classifier_loss(_classifier(), params, batch)
  assert loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))


@pytest.mark.slow
def test_bf16_agrees_with_f32_on_the_demo_model():
  from calm_jax import api  # pylint: disable=g-import-not-at-top
  from calm_jax.jobs import bench  # pylint: disable=g-import-not-at-top

  demo_dir = inspect.signature(bench.bench).parameters['demo_model_dir'].default
  if not os.path.exists(os.path.join(demo_dir, 'model.json')):
    pytest.skip('no demo model: run make demo first')
  lm = api.CalmLM(demo_dir)
  for task, result in bench.dtype_agreement(lm, examples=48).items():
    assert result['token_agreement'] >= 0.95, (task, result)
