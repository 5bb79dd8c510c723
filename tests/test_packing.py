"""Packed training batches (SeqIO's packing feature converter): every
example's per-token losses equal those of the same example unpacked, for
both families, and no attention crosses from one example to another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
import test_models  # tests/test_models.py: the tiny Llama dims

from calm_jax.model import llama
from calm_jax.model import models
from calm_jax.model import network

LENGTHS = {'inputs': 16, 'targets': 10}
# (inputs, targets), each ending in EOS (1): three fit one packed row of
# 16/10, the fourth starts a second row.
EXAMPLES = [
  ([5, 6, 7, 1], [8, 9, 1]),
  ([10, 11, 12, 13, 14, 1], [15, 1]),
  ([16, 17, 1], [18, 19, 20, 1]),
  ([21, 22, 23, 24, 25, 26, 27, 1], [28, 29, 30, 1]),
]
T5 = network.T5Config(
  vocab_size=40,
  emb_dim=16,
  num_heads=2,
  head_dim=8,
  mlp_dim=32,
  num_encoder_layers=2,
  num_decoder_layers=3,
  dtype='float32',
)
LLAMA = llama.LlamaConfig(**test_models.TINY_LLAMA)


def converted(examples, pack: bool) -> dict:
  """The examples through SeqIO's encoder-decoder feature converter, all
  rows in one batch."""
  ds = tf.data.Dataset.from_generator(
    lambda: ({'inputs': i, 'targets': t} for i, t in examples),
    output_signature={
      'inputs': tf.TensorSpec([None], tf.int32),
      'targets': tf.TensorSpec([None], tf.int32),
    },
  )
  ds = seqio.EncDecFeatureConverter(pack=pack)(ds, LENGTHS)
  rows = list(ds.as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def per_example(batch, token_losses) -> list:
  """[L, b, t] per-token losses -> each example's [L, its target length],
  found by segment (packed) or row (unpacked)."""
  segments = batch.get(
    'decoder_segment_ids', (batch['decoder_target_tokens'] > 0).astype(int)
  )
  out = []
  for row in range(segments.shape[0]):
    for segment in range(1, segments[row].max() + 1):
      out.append(token_losses[:, row, segments[row] == segment])
  return out


def _cross_entropy(logits, targets):  # [L, b, t, v], [b, t] -> [L, b, t]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[None, ..., None], -1)[..., 0]
  return np.asarray(log_z - picked)


def t5_token_losses(model, params, batch):
  hidden = model.module.apply(
    {'params': params},
    batch['encoder_input_tokens'],
    batch['decoder_input_tokens'],
    method=network.EncoderDecoder.decoder_hidden,
    **models.segment_ids(batch),
  )
  return _cross_entropy(
    model.head(params, hidden), batch['decoder_target_tokens']
  )


def llama_token_losses(model, params, batch):
  states = llama._target_states(model, params, batch)  # pylint: disable=protected-access
  return _cross_entropy(
    model.head(params, states), batch['decoder_target_tokens']
  )


def shifted(targets, positions):
  """Teacher-forcing inputs of packed targets: 0 at each example's start."""
  inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1)
  return np.where(positions == 0, 0, inputs)


FAMILIES = {
  't5': (models.CalmModel(T5), t5_token_losses),
  'llama': (llama.CalmLlama(LLAMA), llama_token_losses),
}


@pytest.fixture(scope='module')
def batches():
  return converted(EXAMPLES, pack=False), converted(EXAMPLES, pack=True)


def test_the_converter_packs_the_examples_into_two_rows(batches):
  unpacked, packed = batches
  assert unpacked['decoder_target_tokens'].shape == (4, 10)
  assert packed['decoder_target_tokens'].shape == (2, 10)
  np.testing.assert_array_equal(packed['decoder_segment_ids'].max(1), [3, 1])
  # The same target tokens, in half the rows.
  assert (packed['decoder_loss_weights'] > 0).sum() == (
    unpacked['decoder_loss_weights'] > 0
  ).sum()


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_each_example_loses_what_it_loses_unpacked(batches, family):
  model, token_losses = FAMILIES[family]
  params = model.init_params(jax.random.PRNGKey(0))['params']
  unpacked, packed = batches
  alone = per_example(unpacked, token_losses(model, params, unpacked))
  together = per_example(packed, token_losses(model, params, packed))
  assert len(alone) == len(together) == len(EXAMPLES)
  for (_, targets), a, b in zip(EXAMPLES, alone, together):
    assert a.shape == b.shape == (3, len(targets))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  # CALM's loss (every exit, weighted, mean over the target tokens) too.
  np.testing.assert_allclose(
    model.loss(params, packed)[0],
    model.loss(params, unpacked)[0],
    rtol=1e-5,
  )


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_no_attention_crosses_from_one_example_to_another(batches, family):
  """Changing the second example of a packed row changes nothing of the
  first and the third."""
  model, token_losses = FAMILIES[family]
  params = model.init_params(jax.random.PRNGKey(1))['params']
  _, packed = batches
  changed = dict(packed)
  for key in ('encoder_input_tokens', 'decoder_target_tokens'):
    side = key.split('_')[0]
    second = packed[f'{side}_segment_ids'][0] == 2
    tokens = packed[key].copy()
    tokens[0, second] = np.where(tokens[0, second] == 1, 1, 33)
    changed[key] = tokens
  positions = packed['decoder_positions']
  # SeqIO's decoder inputs: the targets shifted right within each example.
  assert (
    shifted(packed['decoder_target_tokens'], positions)
    == packed['decoder_input_tokens']
  ).all()
  changed['decoder_input_tokens'] = shifted(
    changed['decoder_target_tokens'], positions
  )
  before = per_example(packed, token_losses(model, params, packed))
  after = per_example(changed, token_losses(model, params, changed))
  for index in (0, 2, 3):
    np.testing.assert_allclose(after[index], before[index], atol=1e-6)
  assert np.abs(after[1] - before[1]).max() > 1e-3  # it did change
