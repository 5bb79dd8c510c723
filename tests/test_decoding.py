"""decoding.py: the loops with a fake model, and CALM on tiny random models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.decoding import loops
from calm_jax.decoding import thresholds
from calm_jax.model import models
from calm_jax.model import network

VOCAB = 6
EOS = 1
# Next token after each previous token, per row: row 0 says 3 4 5 EOS,
# row 1 says 5 EOS.
NEXT = np.array([[3, 0, 0, 4, 5, 1], [5, 0, 0, 0, 0, 1]])
# How much each layer adds to the logit of the right token, per row: row 0
# grows confident fast, row 1 slowly.
STRENGTH = np.array([2.0, 0.8])


@dataclasses.dataclass(frozen=True)
class FakeFns:
  """Hidden state = [logits (V) | one-hot previous token (V)]."""

  num_layers: int = 4

  def embed(self, tokens):
    return jnp.concatenate(
      [jnp.zeros((tokens.shape[0], VOCAB)), jax.nn.one_hot(tokens, VOCAB)], -1
    )[:, None]

  def exit_hidden(self, h, layer):
    return h

  def layer_kv(self, layer, x, position):
    return x[:, :, None, :], x[:, :, None, :]  # heads 1, head dim 2V

  def layer_step(self, layer, x, keys, values, position, rows=None):
    rows = jnp.arange(x.shape[0]) if rows is None else rows
    prev = jnp.argmax(x[:, 0, VOCAB:], -1)
    target = jnp.asarray(NEXT)[rows, prev]
    boost = jnp.asarray(STRENGTH)[rows][:, None] * jax.nn.one_hot(target, VOCAB)
    return x.at[:, 0, :VOCAB].add(boost)

  def logits(self, h):
    return h[..., :VOCAB]


def _softmax_response(logit_gap):
  """top1 - top2 when one logit is `logit_gap` above V - 1 zeros."""
  return (np.exp(logit_gap) - 1) / (np.exp(logit_gap) + VOCAB - 1)


def _fake_decode(threshold, **cfg):
  cfg = loops.ExitConfig(exit_layers=(1, 2, 3), **cfg)
  return jax.jit(
    lambda t: loops.early_exit_decode(
      FakeFns(),
      cfg,
      threshold=t,
      batch_size=2,
      max_length=6,
      cache_shape=(1, 2 * VOCAB),
      eos_id=EOS,
    )
  )(threshold)


@pytest.mark.parametrize('bucket_sizes', [None, (2,)])
def test_fake_model_exact_tokens_exit_layers_and_padding(bucket_sizes):
  threshold = 0.5
  out = _fake_decode(threshold, bucket_sizes=bucket_sizes)
  # Layer at which each row first reaches the threshold (else the top, 4).
  expected_layer = []
  for strength in STRENGTH:
    passing = [
      l for l in (1, 2, 3) if _softmax_response(strength * l) >= threshold
    ]
    expected_layer.append(passing[0] if passing else 4)
  assert expected_layer == [1, 3]
  np.testing.assert_array_equal(
    out.tokens, [[3, 4, 5, 1, 0, 0], [5, 1, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
    out.exit_layers, [[1, 1, 1, 1, 0, 0], [3, 3, 0, 0, 0, 0]]
  )
  np.testing.assert_allclose(
    out.confidences[0, :4], _softmax_response(2.0), rtol=1e-5
  )
  np.testing.assert_allclose(
    out.confidences[1, :2], _softmax_response(2.4), rtol=1e-5
  )
  assert int(out.layer_evals) == 4 * 1 + 2 * 3


def test_fake_model_disabled_exits_and_threshold_zero():
  disabled = _fake_decode(1.01)
  np.testing.assert_array_equal(
    disabled.exit_layers, [[4, 4, 4, 4, 0, 0], [4, 4, 0, 0, 0, 0]]
  )
  assert int(disabled.layer_evals) == 6 * 4
  eager = _fake_decode(0.0)
  np.testing.assert_array_equal(
    eager.exit_layers, [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(eager.tokens, disabled.tokens)


TINY = network.T5Config(
  vocab_size=40,
  emb_dim=32,
  num_heads=2,
  head_dim=8,
  mlp_dim=48,
  num_encoder_layers=2,
  num_decoder_layers=4,
)
MAX_LENGTH = 7


@pytest.fixture(scope='module')
def tiny():
  model = models.CalmModel(TINY)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  # A large logit scale makes argmaxes stable and confidences spread out.
  params = jax.tree_util.tree_map(lambda x: x, params)
  params['decoder']['logits_dense'] = params['decoder']['logits_dense'] * 4
  return model, params


def _inputs(batch, seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(3, 40, size=(batch, 6)).astype(np.int32)
  enc[:, -1] = EOS
  return jnp.asarray(enc)


@functools.lru_cache(maxsize=None)
def _early_fn(model, cfg):
  return jax.jit(
    lambda p, e, t: model.decode_early_exit(
      p, e, MAX_LENGTH, exit_config=cfg, threshold=t
    )
  )


def _static(model, params, enc, **kwargs):
  return jax.jit(lambda p, e: model.decode_static(p, e, MAX_LENGTH, **kwargs))(
    params, enc
  )


@pytest.mark.parametrize(
  'measure, batch',
  [
    ('softmax', 1),
    ('state', 3),
    ('softmax', 8),
    # The rest of the grid: the same rule at other shapes.
    pytest.param('state', 1, marks=pytest.mark.slow),
    pytest.param('softmax', 3, marks=pytest.mark.slow),
    pytest.param('state', 8, marks=pytest.mark.slow),
  ],
)
def test_disabled_exits_equal_static_decode(tiny, batch, measure):
  model, params = tiny
  enc = _inputs(batch)
  cfg = loops.ExitConfig(
    confidence=measure, exit_layers=thresholds.allowed_exit_layers(4)
  )
  early = _early_fn(model, cfg)(params, enc, 1.5)
  static = _static(model, params, enc)
  np.testing.assert_array_equal(early.tokens, static.tokens)
  np.testing.assert_array_equal(early.exit_layers, static.exit_layers)
  assert int(early.layer_evals) == int(static.layer_evals)


@pytest.mark.parametrize(
  'measure, first, interval, min_exit, want',
  [
    ('softmax', 1, 1, 1, 1),
    ('softmax', 1, 2, 2, 3),
    ('softmax', 2, 1, 1, 2),
    ('state', 1, 1, 1, 2),
    ('softmax_max', 1, 1, 3, 3),
  ],
)
def test_threshold_zero_exits_at_first_allowed_layer(
  tiny, measure, first, interval, min_exit, want
):
  model, params = tiny
  layers = thresholds.allowed_exit_layers(
    4,
    first_exit=first,
    exit_interval=interval,
    min_exit=max(min_exit, 2 if measure == 'state' else 1),
  )
  cfg = loops.ExitConfig(confidence=measure, exit_layers=layers)
  out = _early_fn(model, cfg)(params, _inputs(3), 0.0)
  real = np.asarray(out.tokens) > 0
  real[:, 0] = True  # the first token is always produced
  layers_used = np.asarray(out.exit_layers)
  assert np.all(layers_used[real] == want)
  assert np.all(layers_used[~real] == 0)


def _every_layer(measure: str) -> loops.ExitConfig:
  return loops.ExitConfig(
    confidence=measure, exit_layers=thresholds.allowed_exit_layers(4)
  )


def test_batch_rows_decode_as_they_would_alone(tiny):
  model, params = tiny
  enc = _inputs(5, seed=3)
  cfg = _every_layer('softmax')
  batched = _early_fn(model, cfg)(params, enc, 0.2)
  layers = np.asarray(batched.exit_layers)
  assert len(set(layers[layers > 0].tolist())) > 1  # a real mix of exits
  for row in range(5):
    alone = _early_fn(model, cfg)(params, enc[row : row + 1], 0.2)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[row])
    np.testing.assert_array_equal(
      alone.exit_layers[0], batched.exit_layers[row]
    )


def test_confidence_is_the_exit_test_value_and_nan_through_the_top(tiny):
  model, params = tiny
  enc = _inputs(5, seed=3)
  cfg = _every_layer('softmax')
  early = _early_fn(model, cfg)(params, enc, 0.2)
  layers, conf = np.asarray(early.exit_layers), np.asarray(early.confidences)
  exited = (layers > 0) & (layers < 4)
  assert exited.any() and (layers == 4).any()
  assert np.all(conf[exited] >= 0.2)  # the value that passed the test
  assert np.all(np.isnan(conf[layers == 4]))
  # The static decoder and exits disabled agree: no token had an exit test.
  for out in (
    _static(model, params, enc),
    _early_fn(model, cfg)(params, enc, 1.5),
  ):
    real = np.asarray(out.exit_layers) > 0
    assert np.all(np.isnan(np.asarray(out.confidences)[real]))


def test_oracle_keeps_full_model_tokens(tiny):
  model, params = tiny
  enc = _inputs(4, seed=5)
  oracle = _static(model, params, enc, oracle=True)
  static = _static(model, params, enc)
  np.testing.assert_array_equal(oracle.tokens, static.tokens)
  layers = np.asarray(oracle.exit_layers)
  real = layers > 0
  assert layers[real].min() >= 1 and layers[real].max() <= 4
  assert layers[real].mean() < 4  # some tokens are right before the top


def _climb_after_exit(fns, hidden, propagation):
  """A batch of one row that exited at layer 1 with state `hidden`."""
  k1, v1 = fns.layer_kv(0, hidden, 0)
  return loops.Climb(
    hidden=hidden,
    active=jnp.array([False]),
    exit_layer=jnp.array([1]),
    confidence=jnp.array([0.9]),
    token=jnp.array([-1]),
    exit_kv=(k1, v1),
    evals=jnp.zeros((), jnp.int32),
  )


@pytest.mark.parametrize('propagation', ['hidden', 'kv_copy', 'none'])
def test_skipped_layer_cache_gets_propagated_kv(tiny, propagation):
  model, params = tiny
  fns = model.step_fns(params, _inputs(1), MAX_LENGTH)
  hidden = jax.random.normal(jax.random.PRNGKey(7), (1, 1, TINY.emb_dim))
  climb = _climb_after_exit(fns, hidden, propagation)
  cache = loops.KVCache.zeros(4, (1, MAX_LENGTH, 2, 8), jnp.float32)
  cfg = loops.ExitConfig(exit_layers=(1, 2, 3), propagation=propagation)
  position = jnp.asarray(2)
  after, cache = loops.climb_layer(
    fns, cfg, 2, climb, cache, position, jnp.asarray(0.5), None
  )
  k, v = cache.keys[2][:, 2:3], cache.values[2][:, 2:3]
  want = {
    'hidden': fns.layer_kv(2, hidden, 0),
    'kv_copy': climb.exit_kv,
    'none': (jnp.zeros_like(k), jnp.zeros_like(v)),
  }[propagation]
  np.testing.assert_allclose(k, want[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v, want[1], rtol=1e-6, atol=1e-6)
  # The exited row's state stays frozen and no layer evaluation is counted.
  np.testing.assert_array_equal(after.hidden, hidden)
  assert int(after.evals) == 0


def test_decaying_threshold_values():
  at = lambda base, t, tau: float(
    thresholds.threshold_at(base, jnp.asarray(t), 10, tau)
  )
  assert at(0.9, 0, 4.0) == pytest.approx(0.9 * 0.9 + 0.1)
  assert at(0.9, 5, 4.0) == pytest.approx(0.81 + 0.1 * np.exp(-2.0))
  assert at(0.5, 10, 4.0) == pytest.approx(0.45 + 0.1 * np.exp(-4.0))
  assert at(0.9, 7, None) == pytest.approx(0.9)
  assert at(1.0, 0, 4.0) == pytest.approx(1.0)
  assert at(1.01, 9, 4.0) == np.inf and at(1.01, 0, None) == np.inf


def test_allowed_exit_layers():
  assert thresholds.allowed_exit_layers(8) == (1, 2, 3, 4, 5, 6, 7)
  assert thresholds.allowed_exit_layers(8, first_exit=2, exit_interval=2) == (
    2,
    4,
    6,
  )
  assert thresholds.allowed_exit_layers(
    8, first_exit=1, exit_interval=3, min_exit=3
  ) == (4, 7)
  with pytest.raises(ValueError):
    thresholds.allowed_exit_layers(8, exit_interval=0)


def test_bucket_sizes():
  cfg = loops.ExitConfig()
  assert cfg.buckets(16) == (1, 2, 4, 8, 16)
  assert cfg.buckets(6) == (1, 2, 3, 6)
  assert cfg.buckets(1) == (1,)
  assert loops.ExitConfig(bucket_sizes=(4, 32)).buckets(16) == (4, 16)


def test_sampling_modes():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
  rng = jax.random.PRNGKey(0)
  greedy = loops.select_tokens(logits, rng, loops.Sampling())
  np.testing.assert_array_equal(greedy, [1, 0])
  top1 = loops.select_tokens(logits, rng, loops.Sampling(1.0, top_k=1))
  np.testing.assert_array_equal(top1, [1, 0])
  nucleus = loops.select_tokens(logits, rng, loops.Sampling(1.0, top_p=0.5))
  np.testing.assert_array_equal(nucleus, [1, 0])
  draws = jax.vmap(
    lambda k: loops.select_tokens(logits, k, loops.Sampling(1.0))
  )(jax.random.split(rng, 2000))
  np.testing.assert_allclose(
    (np.asarray(draws)[:, 0] == 1).mean(), 0.6, atol=0.04
  )


def test_disabled_threshold_drops_the_confidence_checks():
  cfg = loops.ExitConfig(confidence='softmax', exit_layers=(1, 2, 3))
  assert cfg.for_threshold(1.5).exit_layers == ()
  assert cfg.for_threshold(0.9) is cfg
  out = _fake_decode(1.01)  # checks or not, the same tokens and layers
  cfg_none = loops.ExitConfig(exit_layers=())
  none = jax.jit(
    lambda t: loops.early_exit_decode(
      FakeFns(),
      cfg_none,
      threshold=t,
      batch_size=2,
      max_length=6,
      cache_shape=(1, 2 * VOCAB),
      eos_id=EOS,
    )
  )(1.01)
  np.testing.assert_array_equal(out.tokens, none.tokens)
  np.testing.assert_array_equal(out.exit_layers, none.exit_layers)
