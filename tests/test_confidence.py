"""confidence.py against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.decoding import confidence


def test_softmax_response_and_max():
  logits = np.random.RandomState(0).randn(3, 50).astype(np.float32) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.sort(probs, -1)[:, ::-1]
  conf, out_logits = confidence.softmax_response(
    jnp.asarray(logits), None, lambda h: h
  )
  np.testing.assert_allclose(conf, top[:, 0] - top[:, 1], rtol=1e-5)
  np.testing.assert_array_equal(out_logits, logits)
  conf, _ = confidence.softmax_max(jnp.asarray(logits), None, lambda h: h)
  np.testing.assert_allclose(conf, top[:, 0], rtol=1e-5)


def test_state_saturation_is_per_row_cosine():
  h = np.array([[1.0, 0.0], [3.0, 4.0]], np.float32)
  prev = np.array([[1.0, 1.0], [30.0, 40.0]], np.float32)
  conf, logits = confidence.state_saturation(jnp.asarray(h), jnp.asarray(prev))
  np.testing.assert_allclose(conf, [1 / np.sqrt(2), 1.0], rtol=1e-6)
  assert logits is None


def test_classifier_head_and_errors():
  params = {'kernel': jnp.array([[1.0], [-1.0]]), 'bias': jnp.array([0.5])}
  conf, _ = confidence.learned_classifier(
    jnp.array([[2.0, 1.0]]), None, classifier=params
  )
  np.testing.assert_allclose(conf, [1 / (1 + np.exp(-1.5))], rtol=1e-6)
  with pytest.raises(ValueError, match='needs trained classifier'):
    confidence.learned_classifier(jnp.ones((1, 2)), None)
  with pytest.raises(
    ValueError, match='valid: softmax, softmax_max, state, classifier, oracle'
  ):
    confidence.get('entropy')


def test_top2_compiles_without_a_vocabulary_sort():
  hlo = (
    jax.jit(lambda x: confidence.top2(x))
    .lower(jnp.ones((1, 32128)))
    .compile()
    .as_text()
  )
  assert 'sort(' not in hlo


def test_flops_accounting_by_hand():
  from calm_jax.analysis import flops
  from calm_jax.model import network

  cfg = network.T5Config(
    vocab_size=10,
    emb_dim=4,
    num_heads=1,
    head_dim=2,
    mlp_dim=3,
    num_encoder_layers=1,
    num_decoder_layers=2,
  )
  c = flops.layer_costs(cfg, input_length=5, cache_length=6)
  assert c.kv == 2 * 2 * 4 * 2  # 32
  assert c.rest == (
    (2 * 4 * 2 + 2 * 2 * 2 * 6 + 2 * 2 * 4)  # self: 80
    + (2 * 4 * 2 + 2 * 2 * 2 * 5 + 2 * 2 * 4)  # cross: 72
    + 3 * 2 * 4 * 3
  )  # mlp: 72
  assert c.head == 2 * 4 * 10
  assert c.encoder == 5 * ((4 * 2 * 4 * 2 + 2 * 2 * 2 * 5 + 72) + 2 * 32)
  static = flops.static_flops(
    cfg,
    batch_size=1,
    num_tokens=3,
    input_length=5,
    cache_length=6,
    include_encoder=True,
  )
  assert static == c.encoder + 3 * (2 * (32 + 224) + 80)
  assert (
    flops.static_flops(
      cfg, batch_size=1, num_tokens=3, input_length=5, cache_length=6
    )
    == static - c.encoder
  )
  # Tokens exiting at layers 1, 2, 1 with softmax checked at layer 1 only:
  # every token fills both layers' K/V; two reuse their exit logits.
  early = flops.early_exit_flops(
    cfg,
    [1, 2, 1],
    measure='softmax',
    allowed_exits=[1],
    batch_size=1,
    input_length=5,
    cache_length=6,
    include_encoder=True,
  )
  softmax = 2 * 4 * 10 + 3 * 10
  assert early == c.encoder + (3 * 2 * 32 + 4 * 224 + 3 * softmax + 1 * 80)
  state = flops.early_exit_flops(
    cfg,
    [2, 2, 2],
    measure='state',
    allowed_exits=[1],
    batch_size=1,
    input_length=5,
    cache_length=6,
    include_encoder=True,
  )
  assert state == static + 3 * 3 * 2 * 4
