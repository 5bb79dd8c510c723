"""models.py: CALM's loss and full-depth prediction."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.model import models
from calm_jax.model import network


def test_linear_weights_sum_to_one_and_grow_with_depth():
  w = models.exit_loss_weights((1, 2, 3, 4, 5, 6, 7, 8), 'linear')
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w, np.arange(1, 9) / 36, rtol=1e-6)
  assert np.all(np.diff(w) > 0)
  np.testing.assert_allclose(
    models.exit_loss_weights((2, 4), 'uniform'), [0.5, 0.5]
  )
  g = models.exit_loss_weights((1, 2, 3), 'geometric')
  np.testing.assert_allclose(g, np.array([1, 2, 4]) / 7, rtol=1e-6)
  with pytest.raises(ValueError, match='linear, uniform, geometric'):
    models.exit_loss_weights((1,), 'cubic')


def test_calm_loss_is_weighted_masked_cross_entropy():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 2, 4, 5).astype(np.float32)  # [x, b, l, v]
  targets = rng.randint(0, 5, size=(2, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  weights = np.array([0.2, 0.3, 0.5], np.float32)
  loss, metrics = models.calm_loss(
    jnp.asarray(logits),
    jnp.asarray(targets),
    jnp.asarray(mask),
    jnp.asarray(weights),
    z_loss=1e-4,
  )
  log_z = np.log(np.exp(logits).sum(-1))
  target_logit = np.take_along_axis(logits, targets[None, ..., None], -1)[
    ..., 0
  ]
  ce = ((log_z - target_logit) * mask).sum((1, 2)) / mask.sum()
  z = (1e-4 * log_z**2 * mask).sum((1, 2)) / mask.sum()
  np.testing.assert_allclose(metrics['loss_per_exit'], ce, rtol=1e-5)
  np.testing.assert_allclose(loss, (weights * (ce + z)).sum(), rtol=1e-5)
  acc = ((logits.argmax(-1) == targets[None]) * mask).sum((1, 2)) / mask.sum()
  np.testing.assert_allclose(metrics['accuracy_per_exit'], acc, rtol=1e-6)


def test_full_depth_prediction_is_greedy_argmax_of_the_top_layer():
  cfg = network.T5Config(
    vocab_size=50,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_encoder_layers=1,
    num_decoder_layers=3,
  )
  model = models.CalmModel(cfg)
  params = model.init_params(jax.random.PRNGKey(1))['params']
  enc = jnp.array([[5, 6, 7, 1, 0], [8, 9, 10, 11, 1]])
  tokens = jax.jit(lambda p, e: model.predict_full_depth(p, e, 6))(params, enc)
  dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tokens[:, :-1]], 1)
  top = model.all_layer_logits(params, enc, dec_in)[-1]
  expected = np.asarray(jnp.argmax(top, -1))
  # Compare up to (and including) the first EOS of each row.
  for row, want in zip(np.asarray(tokens), expected):
    stop = list(row).index(1) + 1 if 1 in row else len(row)
    np.testing.assert_array_equal(row[:stop], want[:stop])
    assert np.all(row[stop:] == 0)


def test_exit_classifier_loss_is_class_balanced_per_layer():
  hidden = jnp.array([[[[1.0], [2.0], [-1.0], [0.5]]]])  # [x=1, b=1, l=4, e=1]
  # Layer argmax vs top argmax: agree at tokens 0 and 1 only.
  predictions = jnp.array([[[3, 4, 5, 6]], [[3, 4, 0, 0]]])
  mask = jnp.array([[1, 1, 1, 0]])
  classifier = {'kernel': jnp.array([[2.0]]), 'bias': jnp.array([0.0])}
  loss, metrics = models.exit_classifier_loss(
    classifier, hidden, predictions, mask
  )
  logits = np.array([2.0, 4.0, -2.0])
  labels = np.array([1.0, 1.0, 0.0])
  w_pos, w_neg = 0.5 / (2 / 3), 0.5 / (1 / 3)
  log_sig = lambda z: -np.log1p(np.exp(-z))
  bce = -(
    w_pos * labels * log_sig(logits) + w_neg * (1 - labels) * log_sig(-logits)
  )
  np.testing.assert_allclose(loss, bce.sum() / 3, rtol=1e-5)
  np.testing.assert_allclose(
    metrics['positive_rate_per_exit'], [2 / 3], rtol=1e-6
  )
  np.testing.assert_allclose(metrics['accuracy_per_exit'], [1.0])


def test_classifier_loss_leaves_the_backbone_without_gradient():
  cfg = network.T5Config(
    vocab_size=30,
    emb_dim=8,
    num_heads=1,
    head_dim=8,
    mlp_dim=8,
    num_encoder_layers=1,
    num_decoder_layers=3,
  )
  model = models.CalmModel(cfg)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  batch = {
    'encoder_input_tokens': jnp.array([[4, 5, 1]]),
    'decoder_input_tokens': jnp.array([[0, 6, 7]]),
    'decoder_loss_weights': jnp.array([[1, 1, 1]]),
  }
  from calm_jax.decoding import confidence

  classifier = confidence.init_classifier(8)
  grads = jax.grad(
    lambda c, p: model.classifier_loss(c, p, batch)[0], argnums=(0, 1)
  )(classifier, params)
  assert float(jnp.abs(grads[0]['kernel']).sum()) > 0
  assert all(
    float(jnp.abs(g).sum()) == 0 for g in jax.tree_util.tree_leaves(grads[1])
  )
  assert model.classifier_exit_layers() == (1, 2)


# --- the streamed loss against every exit's logits at once ---------------------

TINY_T5 = network.T5Config(
  vocab_size=40,
  emb_dim=16,
  num_heads=2,
  head_dim=8,
  mlp_dim=24,
  num_encoder_layers=1,
  num_decoder_layers=3,
)
TINY_LLAMA = dict(
  vocab_size=40,
  emb_dim=16,
  num_layers=3,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  mlp_dim=24,
  rope_theta=10000.0,
)
LOSS_BATCH = {
  'encoder_input_tokens': jnp.array([[4, 5, 6, 1], [7, 8, 1, 0]]),
  'decoder_input_tokens': jnp.array([[0, 9, 10, 11], [0, 12, 13, 0]]),
  'decoder_target_tokens': jnp.array([[9, 10, 11, 1], [12, 13, 1, 0]]),
  'decoder_loss_weights': jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
}


def _family(name: str, dtype: str, weighting: str, exit_loss: str = 'auto'):
  """(model, params, states fn, reference loss fn): states(params, batch)
  is what every layer's exit reads [L, b, l, e]; the reference holds every
  exit's logits [x, b, l, v] and scores them with `calm_loss`."""
  from calm_jax.model import llama

  options = dict(loss_weighting=weighting, exit_loss=exit_loss)
  tied = name != 'llama_untied'  # Llama's default ties the output layer
  if name == 't5':
    model = models.CalmModel(
      dataclasses.replace(TINY_T5, dtype=dtype), **options
    )

    def states(params, batch):
      return model.module.apply(
        {'params': params},
        batch['encoder_input_tokens'],
        batch['decoder_input_tokens'],
        method=network.EncoderDecoder.decoder_hidden,
      )

  else:
    model = llama.CalmLlama(
      llama.LlamaConfig(**TINY_LLAMA, dtype=dtype, tie_embeddings=tied),
      **options,
    )

    def states(params, batch):
      hidden = llama._target_states(model, params, batch)  # pylint: disable=protected-access
      return model.exit_states(params, hidden)

  def reference(params, batch):
    exits = jnp.asarray(model.config.exit_layers) - 1
    logits = model.head(params, states(params, batch)[exits])  # [x, b, l, v]
    return models.calm_loss(
      logits,
      batch['decoder_target_tokens'],
      batch['decoder_loss_weights'],
      model.exit_weights(),
      model.z_loss,
    )

  params = model.init_params(jax.random.PRNGKey(2))['params']
  return model, params, states, reference


NUMERICS = [
  ('float32', 'linear'),
  ('float32', 'geometric'),
  ('bfloat16', 'uniform'),
]
# `make test` keeps six of the 18 cases: each family with each way of
# computing the loss once, and each dtype and weighting at least twice.
DEFAULT_LOSS_CASES = {
  ('t5', 'streamed', 'float32', 'linear'),
  ('t5', 'fused', 'bfloat16', 'uniform'),
  ('llama', 'streamed', 'bfloat16', 'uniform'),
  ('llama', 'fused', 'float32', 'geometric'),
  ('llama_untied', 'streamed', 'float32', 'geometric'),
  ('llama_untied', 'fused', 'float32', 'linear'),
}


def _loss_cases():
  for family in ('t5', 'llama', 'llama_untied'):
    for exit_loss in ('streamed', 'fused'):
      for dtype, weighting in NUMERICS:
        case = (family, exit_loss, dtype, weighting)
        slow = () if case in DEFAULT_LOSS_CASES else (pytest.mark.slow,)
        yield pytest.param(*case, marks=slow)


@pytest.mark.parametrize('family,exit_loss,dtype,weighting', _loss_cases())
def test_the_streamed_and_fused_losses_and_gradients_equal_every_exit_at_once(
  family, exit_loss, dtype, weighting
):
  """Both ways of training the exits without their logits at once (the
  fused kernels run in Pallas's interpreter here) against `calm_loss`."""
  model, params, _, reference = _family(family, dtype, weighting, exit_loss)
  # bfloat16 keeps 8 bits of mantissa (one step is 2**-8 = 0.4%): the two
  # orders of summation may round one step apart, relative to the largest.
  tol = 1e-5 if dtype == 'float32' else 1e-2
  # The fused kernels feed dlogits to the gradient matmuls in bfloat16 (as a
  # TPU's default-precision matmul rounds float32 operands); the CPU
  # reference keeps them in float32: one more rounding step.
  grad_tol = 2 * tol if exit_loss == 'fused' and dtype == 'bfloat16' else tol

  def value_and_grad(loss_fn):
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, LOSS_BATCH
    )

  (loss, metrics), grads = value_and_grad(model.loss)
  (want_loss, want_metrics), want_grads = value_and_grad(reference)
  assert float(metrics['z_loss']) > 0  # the z-loss term is in both
  np.testing.assert_allclose(loss, want_loss, rtol=tol)
  for name in ('loss_per_exit', 'accuracy_per_exit', 'z_loss'):
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=tol)
  for got, want in zip(
    jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)
  ):
    scale = float(jnp.abs(want).max()) + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=grad_tol)


@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_the_classifier_stage_labels_with_every_exits_argmax(family):
  model, params, states, _ = _family(family, 'float32', 'linear')
  from calm_jax.decoding import confidence

  classifier = confidence.init_classifier(TINY_T5.emb_dim)
  loss, metrics = jax.jit(model.classifier_loss)(classifier, params, LOSS_BATCH)
  # The same labels from every exit's logits at once.
  hidden = states(params, LOSS_BATCH)
  exits = jnp.asarray(model.classifier_exit_layers()) - 1
  with_top = jnp.append(exits, hidden.shape[0] - 1)
  predictions = jnp.argmax(model.head(params, hidden[with_top]), -1)
  want_loss, want = models.exit_classifier_loss(
    classifier, hidden[exits], predictions, LOSS_BATCH['decoder_loss_weights']
  )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(
    metrics['positive_rate_per_exit'], want['positive_rate_per_exit']
  )


@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_every_remat_policy_gives_the_same_loss_and_gradients(family):
  model, params, _, _ = _family(family, 'float32', 'linear')
  grad = lambda m: jax.jit(jax.value_and_grad(m.loss, has_aux=True))(
    params, LOSS_BATCH
  )
  (want, _), want_grads = grad(model)
  for policy in ('minimal', 'full'):
    (loss, _), grads = grad(dataclasses.replace(model, remat_policy=policy))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    jax.tree_util.tree_map(
      lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
      grads,
      want_grads,
    )
    # One rematerialised call per layer, beside the streamed loss's own.
    jaxpr = lambda m: str(
      jax.make_jaxpr(jax.grad(lambda p: m.loss(p, LOSS_BATCH)[0]))(params)
    )
    layers = 4 if family == 't5' else 3  # encoder + decoder, or decoder
    replaced = dataclasses.replace(model, remat_policy=policy)
    assert (
      jaxpr(replaced).count('remat') == jaxpr(model).count('remat') + layers
    )
  with pytest.raises(ValueError, match='none, minimal, full'):
    jax.eval_shape(
      dataclasses.replace(model, remat_policy='most').loss, params, LOSS_BATCH
    )


def test_the_llama_loss_gathers_states_by_position_not_by_element():
  """The decoder-only loss picks the states that predict the targets
  [L, b, t, e] out of [L, b, s, e]. Its backward pass is a scatter-add; with
  one index per element (an index array broadcast over every axis) an 8B
  step at batch 32 needs more than 2^31 of them, which the TPU compiler
  refuses. Every scatter-add of embedding-wide rows must take one index per
  row."""
  model, params, _, _ = _family('llama', 'float32', 'linear')
  emb = TINY_LLAMA['emb_dim']
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: model.loss(p, LOSS_BATCH)[0]))(
    params
  )

  def scatters(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'scatter-add':
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from scatters(sub)

  rows = [e for e in scatters(jaxpr.jaxpr) if e.invars[2].aval.shape[-1] == emb]
  assert rows  # the gather of the target states, and the embedding's
  for eqn in rows:
    indices, updates = eqn.invars[1].aval, eqn.invars[2].aval
    index_tuples = indices.size // indices.shape[-1]
    assert index_tuples * emb <= updates.size, (indices, updates)
