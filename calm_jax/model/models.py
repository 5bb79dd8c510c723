"""Glue between the network and the jobs: CALM's loss, prediction, scoring.

No nn.Module is defined here; `CalmModel` pairs a `network.EncoderDecoder`
with pure functions over its parameters.
"""

import dataclasses
import functools
from typing import Any
from typing import Callable
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import arguments
from calm_jax.decoding import confidence
from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.model import fused_loss
from calm_jax.model import network

Array = jax.Array
Params = Mapping[str, Any]


def exit_loss_weights(
  exit_layers: tuple[int, ...], weighting: str = 'linear'
) -> np.ndarray:
  """Weights of the per-exit losses, summing to 1.

  linear: w_i proportional to the layer index i (CALM's choice, higher layers
  weigh more); uniform: equal; geometric: w_i proportional to 2**i.
  """
  arguments.check(weighting=weighting)
  layers = np.asarray(exit_layers, np.float64)
  if weighting == 'linear':
    raw = layers
  elif weighting == 'uniform':
    raw = np.ones_like(layers)
  else:  # geometric
    raw = 2.0 ** (layers - layers.max())
  return (raw / raw.sum()).astype(np.float32)


def cross_entropy_with_z_loss(
  logits: Array, targets: Array, z_loss: float
) -> tuple[Array, Array]:
  """Token cross-entropy and z-loss (z_loss * log(Z)^2), both [...]."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[
    ..., 0
  ]
  return log_z - target_logit, z_loss * jnp.square(log_z)


def exit_sums(
  logits: Array, targets: Array, mask: Array, z_loss: float
) -> tuple[Array, Array, Array]:
  """Masked sums over the last two axes [..., b, l] of cross-entropy, z-loss
  and correct argmax: one number per exit in the leading axes (the body of
  `streamed_calm_loss`'s exit loop, given one exit's logits)."""
  ce, z = cross_entropy_with_z_loss(logits, targets, z_loss)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return tuple((t * mask).sum(axis=(-2, -1)) for t in (ce, z, correct))


def _weighted_loss(
  sums: tuple[Array, Array, Array], weights: Array, num_tokens: Array
) -> tuple[Array, dict[str, Array]]:
  per_exit_ce, per_exit_z, per_exit_accuracy = (s / num_tokens for s in sums)
  loss = jnp.sum(weights * (per_exit_ce + per_exit_z))
  return loss, {
    'loss': loss,
    'cross_entropy': jnp.sum(weights * per_exit_ce),
    'z_loss': jnp.sum(weights * per_exit_z),
    'loss_per_exit': per_exit_ce,
    'accuracy_per_exit': per_exit_accuracy,
    'num_tokens': num_tokens,
  }


def calm_loss(
  exit_logits: Array,
  targets: Array,
  loss_mask: Array,
  weights: Array,
  z_loss: float = 1e-4,
) -> tuple[Array, dict[str, Array]]:
  """CALM's weighted per-exit loss over every exit's logits at once (the
  reference `streamed_calm_loss` is tested against; training streams).

  Args:
    exit_logits: [x, b, l, v] logits of each exit.
    targets: [b, l] target ids.
    loss_mask: [b, l] 1 for real target tokens, 0 for padding.
    weights: [x] per-exit weights summing to 1.
    z_loss: coefficient of the log-partition penalty.

  Returns:
    (scalar loss, metrics) with per-exit `loss_i` and `accuracy_i` [x].
  """
  mask = loss_mask.astype(jnp.float32)
  sums = exit_sums(exit_logits, targets[None], mask[None], z_loss)
  return _weighted_loss(sums, weights, jnp.maximum(mask.sum(), 1.0))


def streamed_calm_loss(
  head: Callable[[Array], Array],
  exit_hidden: Array,
  targets: Array,
  loss_mask: Array,
  weights: Array,
  z_loss: float = 1e-4,
  unroll: int | bool = 1,
) -> tuple[Array, dict[str, Array]]:
  """`calm_loss(head(exit_hidden), ...)` with one exit's logits alive at a
  time, forward and backward.

  A scan over the exits sums each exit's terms; its body is rematerialised,
  so the backward pass recomputes that exit's logits from its hidden state
  instead of keeping [x, b, l, v] float32 logits (and their softmax) from
  the forward. The price is one more head matmul per exit. The head's
  gradient accumulates in the scan's carry.

  Args:
    head: hidden [b, l, e] -> float32 logits [b, l, v] (norm and output
      layer, closed over their parameters).
    exit_hidden: [x, b, l, e] what each exit's head reads.
    targets, loss_mask, weights, z_loss: as in `calm_loss`.
  """
  mask = loss_mask.astype(jnp.float32)

  @jax.checkpoint
  def one_exit(h):  # [b, l, e] -> three scalars
    return exit_sums(head(h), targets, mask, z_loss)

  _, sums = jax.lax.scan(
    lambda c, h: (c, one_exit(h)), None, exit_hidden, unroll=unroll
  )
  return _weighted_loss(sums, weights, jnp.maximum(mask.sum(), 1.0))


def fused_calm_loss(
  head_operands: Callable[[Array], tuple[Array, Array]],
  exit_hidden: Array,
  targets: Array,
  loss_mask: Array,
  weights: Array,
  z_loss: float = 1e-4,
) -> tuple[Array, dict[str, Array]]:
  """`streamed_calm_loss` with the output layer and the cross-entropy fused
  (`fused_loss.token_losses`): every exit in one call, no logits in memory.

  Args:
    head_operands: hidden [..., e] -> (normed states [..., e], output layer
      [e, v]), both in the matmul dtype: the head before its matmul.
    exit_hidden, targets, loss_mask, weights, z_loss: as in
      `streamed_calm_loss`.
  """
  mask = loss_mask.astype(jnp.float32)
  normed, kernel = head_operands(exit_hidden)
  per_token = fused_loss.token_losses(normed, kernel, targets, z_loss)
  sums = tuple((t * mask).sum(axis=(-2, -1)) for t in per_token)
  return _weighted_loss(sums, weights, jnp.maximum(mask.sum(), 1.0))


def exits_loss(
  model, params: Params, exit_hidden: Array, batch: Mapping[str, Array]
) -> tuple[Array, dict[str, Array]]:
  """CALM's loss of a model's exits reading exit_hidden [x, b, l, e], the
  way `model.exit_loss` asks (fused kernels or the streamed head); either
  family's model (`head`, `head_operands`, `exit_weights`, `z_loss`)."""
  args = (
    exit_hidden,
    batch['decoder_target_tokens'],
    batch['decoder_loss_weights'],
    model.exit_weights(),
    model.z_loss,
  )
  if fused_loss.use_fused(model.exit_loss, embed=exit_hidden.shape[-1]):
    return fused_calm_loss(
      functools.partial(model.head_operands, params), *args
    )
  return streamed_calm_loss(functools.partial(model.head, params), *args)


SEGMENT_KEYS = ('encoder_segment_ids', 'decoder_segment_ids')


def segment_ids(batch: Mapping[str, Array]) -> dict[str, Array]:
  """A packed batch's segment ids (SeqIO's packing feature converter
  writes them; an unpacked batch has none)."""
  return {k: batch[k] for k in SEGMENT_KEYS if k in batch}


def exit_predictions(head: Callable[[Array], Array], states: Array) -> Array:
  """Greedy tokens [x, b, l] of the exits reading states [x, b, l, e], one
  exit's logits at a time (what the classifier stage labels with)."""
  return jax.lax.map(lambda h: jnp.argmax(head(h), axis=-1), states)


def exit_classifier_loss(
  classifier: Params, hidden: Array, predictions: Array, loss_mask: Array
) -> tuple[Array, dict[str, Array]]:
  """Class-balanced BCE of the exit classifier, averaged over exit layers.

  Args:
    classifier: the classifier's parameters.
    hidden: [x, b, l, e] raw states of the layers that may exit.
    predictions: [x + 1, b, l] argmax of those layers and, last, the top's.
    loss_mask: [b, l] real target tokens.

  Label: 1 where a layer's argmax equals the top layer's. Positives and
  negatives weigh half each within every layer, whatever their counts.
  """
  labels = (predictions[:-1] == predictions[-1:]).astype(jnp.float32)
  mask = loss_mask[None].astype(jnp.float32)
  num_tokens = jnp.maximum(mask.sum(), 1.0)
  positive_rate = (labels * mask).sum((1, 2)) / num_tokens  # [x]
  w_pos = 0.5 / jnp.clip(positive_rate, 1e-3, None)[:, None, None]
  w_neg = 0.5 / jnp.clip(1 - positive_rate, 1e-3, None)[:, None, None]
  logit = confidence.classifier_logit(classifier, hidden)  # [x, b, l]
  bce = -(
    w_pos * labels * jax.nn.log_sigmoid(logit)
    + w_neg * (1 - labels) * jax.nn.log_sigmoid(-logit)
  )
  per_layer = (bce * mask).sum((1, 2)) / num_tokens
  correct = ((logit > 0) == (labels > 0.5)) * mask
  return per_layer.mean(), {
    'loss': per_layer.mean(),
    'loss_per_exit': per_layer,
    'accuracy_per_exit': correct.sum((1, 2)) / num_tokens,
    'positive_rate_per_exit': positive_rate,
  }


@dataclasses.dataclass(frozen=True)
class ModelStepFns:
  """`loops.StepFns` over one model's parameters and one encoded batch."""

  module: network.EncoderDecoder
  params: Params
  cross_kv: tuple[tuple[Array, Array], ...]  # layers x ([b, s, h, d],) * 2
  encoder_mask: Array  # [b, 1, 1, s]
  max_length: int

  @property
  def num_layers(self) -> int:
    return self.module.config.num_decoder_layers

  def _decoder(self, method, *args, **kwargs):
    return self.module.apply(
      {'params': self.params},
      *args,
      **kwargs,
      method=lambda m, *a, **k: method(m.decoder, *a, **k),
    )

  def embed(self, tokens: Array) -> Array:
    return self._decoder(network.Decoder.embed, tokens)

  def layer_kv(
    self, layer: int, x: Array, position: Array
  ) -> tuple[Array, Array]:
    del position  # T5's relative position bias is added at the query
    return self._decoder(network.Decoder.layer_kv, layer, x)

  def layer_step(
    self,
    layer: int,
    x: Array,
    keys: Array,
    values: Array,
    position: Array,
    rows: Array | None = None,
  ) -> Array:
    length = keys.shape[1]  # the cache's (the speculative loop's is longer)
    if jnp.ndim(position) == 0:  # one query position for every row
      bias = self._decoder(network.Decoder.step_bias, position, length)
      mask = (jnp.arange(length) <= position)[None, None, None, :]
    else:  # each row's own: [r] or a block [r, g]
      queries = position[:, None] if jnp.ndim(position) == 1 else position
      bias = self._decoder(network.Decoder.query_bias, queries, length)
      mask = (jnp.arange(length)[None, None, :] <= queries[:, :, None])[:, None]
    cross_k, cross_v = self.cross_kv[layer]
    cross_mask = self.encoder_mask
    if rows is not None:  # a bucket of rows: gather their encoder context
      cross_k, cross_v, cross_mask = (
        cross_k[rows],
        cross_v[rows],
        cross_mask[rows],
      )
    return self._decoder(
      network.Decoder.layer_step,
      layer,
      x,
      keys,
      values,
      cross_k,
      cross_v,
      self_bias=bias,
      self_mask=mask,
      cross_mask=cross_mask,
    )

  def exit_hidden(self, h: Array, layer) -> Array:
    del layer  # T5's exits read the raw state
    return h

  def logits(self, h: Array) -> Array:
    return self._decoder(network.Decoder.logits, h)


@dataclasses.dataclass(frozen=True)
class CalmModel:
  """A multi-exit T5 and the pure functions the jobs need around it."""

  config: network.T5Config
  loss_weighting: str = 'linear'
  z_loss: float = 1e-4
  remat_policy: str = 'none'  # the train step's (`layers.REMAT_POLICIES`)
  exit_loss: str = 'auto'  # `fused_loss.EXIT_LOSS_MODES`

  @property
  def module(self) -> network.EncoderDecoder:
    return network.EncoderDecoder(self.config)

  def init_params(
    self, rng: Array, input_length: int = 8, target_length: int = 8
  ) -> Params:
    """Random parameters (plain arrays; logical axes via `param_axes`)."""
    return nn.meta.unbox(self._init_boxed(rng, input_length, target_length))

  def param_axes(self) -> Params:
    """Logical axis names of every parameter (a PartitionSpec pytree)."""
    boxed = jax.eval_shape(lambda: self._init_boxed(jax.random.PRNGKey(0)))
    return nn.get_partition_spec(boxed)['params']

  def _init_boxed(self, rng, input_length=8, target_length=8):
    enc = jnp.ones((1, input_length), jnp.int32)
    dec = jnp.ones((1, target_length), jnp.int32)
    return self.module.init(rng, enc, dec)

  def exit_weights(self) -> np.ndarray:
    return exit_loss_weights(self.config.exit_layers, self.loss_weighting)

  def loss(
    self,
    params: Params,
    batch: Mapping[str, Array],
    *,
    dropout_rng: Array | None = None,
  ) -> tuple[Array, dict]:
    """Weighted per-exit loss of a feature-converted EncDec batch."""
    deterministic = dropout_rng is None
    rngs = {} if deterministic else {'dropout': dropout_rng}
    hidden = self.module.apply(
      {'params': params},
      batch['encoder_input_tokens'],
      batch['decoder_input_tokens'],
      deterministic=deterministic,
      remat_policy=self.remat_policy,
      rngs=rngs,
      method=network.EncoderDecoder.decoder_hidden,
      **segment_ids(batch),
    )  # [L, b, l, e]
    exits = jnp.asarray(self.config.exit_layers) - 1
    return exits_loss(self, params, hidden[exits], batch)

  def head(self, params: Params, states: Array) -> Array:
    """The exit head (final norm, output layer) on states [..., e]."""
    return self.module.apply(
      {'params': params}, states, method=network.EncoderDecoder.head
    )

  def head_operands(self, params: Params, states: Array) -> tuple[Array, Array]:
    """The exit head before its matmul: (normed states, output layer
    [e, v]) in the matmul dtype (what the fused loss multiplies)."""
    return self.module.apply(
      {'params': params}, states, method=network.EncoderDecoder.head_operands
    )

  def classifier_loss(
    self, classifier: Params, params: Params, batch: Mapping[str, Array]
  ) -> tuple[Array, dict]:
    """Stage 2: the exit classifier's loss; the backbone gets no gradient."""
    hidden = jax.lax.stop_gradient(
      self.module.apply(
        {'params': params},
        batch['encoder_input_tokens'],
        batch['decoder_input_tokens'],
        method=network.EncoderDecoder.decoder_hidden,
        **segment_ids(batch),
      )
    )  # [L, b, l, e]
    exits = jnp.asarray(self.classifier_exit_layers()) - 1
    with_top = jnp.append(exits, self.config.num_decoder_layers - 1)
    predictions = exit_predictions(
      functools.partial(self.head, params), hidden[with_top]
    )
    return exit_classifier_loss(
      classifier, hidden[exits], predictions, batch['decoder_loss_weights']
    )

  def exit_config(self, confidence: str, **options) -> loops.ExitConfig:
    """The early-exit settings of this model for a measure: exits on the
    trained grid (first_exit, exit_interval) above the measure's floor,
    with `ExitConfig.create`'s options (min_exit, tau, propagation,
    sampling, bucket_sizes). Every job builds its ExitConfig here."""
    return loops.ExitConfig.create(
      self.config.num_decoder_layers,
      confidence=confidence,
      first_exit=self.config.first_exit,
      exit_interval=self.config.exit_interval,
      **options,
    )

  def classifier_exit_layers(self) -> tuple[int, ...]:
    """Exits below the top: where the classifier is trained and used."""
    return tuple(
      l for l in self.config.exit_layers if l < self.config.num_decoder_layers
    )

  def all_layer_logits(
    self, params: Params, encoder_tokens: Array, decoder_input_tokens: Array
  ) -> Array:
    """Teacher-forced logits of every decoder layer [L, b, l, v]."""
    module = self.module
    hidden = module.apply(
      {'params': params},
      encoder_tokens,
      decoder_input_tokens,
      method=network.EncoderDecoder.decoder_hidden,
    )
    layers = tuple(range(1, self.config.num_decoder_layers + 1))
    return module.apply(
      {'params': params},
      hidden,
      layers,
      method=network.EncoderDecoder.exit_logits,
    )

  def target_logits(
    self, params: Params, encoder_tokens: Array, target_tokens: Array
  ) -> Array:
    """Teacher-forced logits of every decoder layer at each target position
    [L, b, t, v] (the decoder reads the targets shifted right)."""
    shifted = jnp.concatenate(
      [jnp.zeros_like(target_tokens[:, :1]), target_tokens[:, :-1]], 1
    )
    return self.all_layer_logits(params, encoder_tokens, shifted)

  def encode_context(
    self, params: Params, encoder_tokens: Array
  ) -> tuple[tuple[tuple[Array, Array], ...], Array]:
    """What decoding needs of the inputs: per-layer cross K/V and the mask."""
    module = self.module
    encoded = module.apply(
      {'params': params}, encoder_tokens, method=network.EncoderDecoder.encode
    )
    cross_kv = module.apply(
      {'params': params}, encoded, method=lambda m, e: m.decoder.cross_kv(e)
    )
    return cross_kv, network.key_padding_mask(encoder_tokens)

  def step_fns(
    self, params: Params, encoder_tokens: Array, max_length: int, context=None
  ) -> ModelStepFns:
    """The decode callbacks; encodes the inputs unless `context` (from
    `encode_context`) is given, as benchmarks of the loop alone do."""
    if context is None:
      context = self.encode_context(params, encoder_tokens)
    cross_kv, mask = context
    return ModelStepFns(
      module=self.module,
      params=params,
      cross_kv=cross_kv,
      encoder_mask=mask,
      max_length=max_length,
    )

  @staticmethod
  def _batch_size(encoder_tokens: Array | None, context) -> int:
    """Rows of a decode: of the inputs, or of their encoded context."""
    if encoder_tokens is not None:
      return encoder_tokens.shape[0]
    return context[1].shape[0]  # the encoder mask [b, 1, 1, s]

  def _cache_args(self) -> dict:
    return dict(
      cache_shape=(self.config.num_heads, self.config.head_dim),
      cache_dtype=self.config.jnp_dtype,
    )

  def decode_static(
    self,
    params: Params,
    encoder_tokens: Array,
    max_length: int,
    *,
    eos_id: int = 1,
    sampling: loops.Sampling = loops.Sampling(),
    rng: Array | None = None,
    oracle: bool = False,
    context=None,
  ) -> loops.DecodeOutput:
    """Full-depth decode of [b, s] inputs, or of their `context` (from
    `encode_context`; encoder_tokens may then be None), optionally with
    the oracle's exit layers."""
    fns = self.step_fns(params, encoder_tokens, max_length, context)
    return loops.static_decode(
      fns,
      batch_size=self._batch_size(encoder_tokens, context),
      max_length=max_length,
      eos_id=eos_id,
      sampling=sampling,
      rng=rng,
      oracle=oracle,
      **self._cache_args(),
    )

  def decode_early_exit(
    self,
    params: Params,
    encoder_tokens: Array,
    max_length: int,
    *,
    exit_config: loops.ExitConfig,
    threshold: Array,
    eos_id: int = 1,
    classifier: Params | None = None,
    rng: Array | None = None,
    forced_exit_layers: Array | None = None,
    context=None,
  ) -> loops.DecodeOutput:
    """CALM decode of [b, s] inputs or of their `context`, as in
    `decode_static` (jit it with exit_config static)."""
    fns = self.step_fns(params, encoder_tokens, max_length, context)
    return loops.early_exit_decode(
      fns,
      exit_config,
      threshold=threshold,
      batch_size=self._batch_size(encoder_tokens, context),
      max_length=max_length,
      eos_id=eos_id,
      classifier=classifier,
      rng=rng,
      forced_exit_layers=forced_exit_layers,
      **self._cache_args(),
    )

  def decode_speculative(
    self,
    params: Params,
    encoder_tokens: Array | None,
    max_length: int,
    *,
    draft: speculative.DraftConfig,
    threshold: Array,
    eos_id: int = 1,
    classifier: Params | None = None,
    rng: Array | None = None,
    context=None,
  ) -> speculative.SpecOutput:
    """The exact mode: the full model's output, drafted by its exits."""
    fns = self.step_fns(params, encoder_tokens, max_length, context)
    return speculative.speculative_decode(
      fns,
      draft,
      threshold=threshold,
      batch_size=self._batch_size(encoder_tokens, context),
      max_length=max_length,
      eos_id=eos_id,
      classifier=classifier,
      rng=rng,
      **self._cache_args(),
    )

  def predict_full_depth(
    self,
    params: Params,
    encoder_tokens: Array,
    max_length: int,
    eos_id: int = 1,
  ) -> Array:
    """Greedy full-depth decoding [b, s] -> [b, max_length]."""
    return self.decode_static(
      params, encoder_tokens, max_length, eos_id=eos_id
    ).tokens
