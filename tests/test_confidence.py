"""confidence.py against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import confidence


def test_softmax_response_and_max():
  logits = np.random.RandomState(0).randn(3, 50).astype(np.float32) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.sort(probs, -1)[:, ::-1]
  conf, out_logits = confidence.softmax_response(jnp.asarray(logits), None,
                                                 lambda h: h)
  np.testing.assert_allclose(conf, top[:, 0] - top[:, 1], rtol=1e-5)
  np.testing.assert_array_equal(out_logits, logits)
  conf, _ = confidence.softmax_max(jnp.asarray(logits), None, lambda h: h)
  np.testing.assert_allclose(conf, top[:, 0], rtol=1e-5)


def test_state_saturation_is_per_row_cosine():
  h = np.array([[1.0, 0.0], [3.0, 4.0]], np.float32)
  prev = np.array([[1.0, 1.0], [30.0, 40.0]], np.float32)
  conf, logits = confidence.state_saturation(jnp.asarray(h),
                                             jnp.asarray(prev))
  np.testing.assert_allclose(conf, [1 / np.sqrt(2), 1.0], rtol=1e-6)
  assert logits is None


def test_classifier_head_and_errors():
  params = {'kernel': jnp.array([[1.0], [-1.0]]), 'bias': jnp.array([0.5])}
  conf, _ = confidence.learned_classifier(jnp.array([[2.0, 1.0]]), None,
                                          classifier=params)
  np.testing.assert_allclose(conf, [1 / (1 + np.exp(-1.5))], rtol=1e-6)
  with pytest.raises(ValueError, match='needs trained classifier'):
    confidence.learned_classifier(jnp.ones((1, 2)), None)
  with pytest.raises(ValueError, match='valid: softmax, softmax_max, state, '
                     'classifier, oracle'):
    confidence.get('entropy')


def test_top2_compiles_without_a_vocabulary_sort():
  hlo = jax.jit(lambda x: confidence.top2(x)).lower(
      jnp.ones((1, 32128))).compile().as_text()
  assert 'sort(' not in hlo
