"""T5 1.1 encoder-decoder whose every decoder layer is a possible exit.

Training calls the whole model and gets the hidden state of every decoder
layer; an exit's logits are `logits_dense(decoder_norm(h_i))`, the same final
norm and untied head as the top layer, so exits add no parameters.

Decoding uses the per-layer methods of `Decoder` (`layer_kv`, `layer_step`,
`step_bias`, `logits`): the early-exit loop in `decoding/loops.py` computes each
layer's keys/values for the current position outside any branch, writes them
to its cache, and runs the rest of the layer only for rows that still need it.

Einsum letters: b batch, l decoder length, s encoder length, t cache length,
h heads, d head dim, e embed, v vocab, x exits.
"""

import dataclasses
import functools
from typing import Optional
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import arguments
from calm_jax.decoding import thresholds
from calm_jax.model import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Model dimensions and exit layout (T5 1.1 small by default).

  `first_exit` and `exit_interval` pick which decoder layers (1-based) are
  trained as exits: first_exit, first_exit + interval, ...; the top layer is
  always an exit.
  """

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  first_exit: int = 1
  exit_interval: int = 1
  # Parameter layout, not a model property: True stacks each stack's layer
  # parameters on a leading 'layers' axis and runs the layers as one scan
  # (t5x's scan_layers: compile time independent of depth). Outputs are
  # the same either way; `model/layout.py` converts between the two.
  scan_layers: bool = False
  # Activation dtype (`arguments.DTYPES`). Parameters are float32 in every
  # case (t5x's default); bfloat16 runs matmuls in bfloat16 with float32
  # accumulation, while norm statistics, attention softmax, logits and
  # confidences are float32.
  dtype: str = 'float32'
  # Attention scores and softmax in float32 whatever `dtype` (True), or in
  # the activation dtype as t5x's T5 1.1 trains (False).
  float32_attention_logits: bool = True

  def __post_init__(self):
    arguments.check(
      first_exit=self.first_exit,
      exit_interval=self.exit_interval,
      dtype=self.dtype,
      num_layers=self.num_decoder_layers,
    )

  @property
  def exit_layers(self) -> tuple[int, ...]:
    """1-based decoder layers that emit a prediction in training."""
    return thresholds.trained_exit_layers(
      self.num_decoder_layers,
      first_exit=self.first_exit,
      exit_interval=self.exit_interval,
    )

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


def _attention(cfg: T5Config) -> layers.MultiHeadAttention:
  return layers.MultiHeadAttention(
    embed_dim=cfg.emb_dim,
    num_heads=cfg.num_heads,
    head_dim=cfg.head_dim,
    dropout_rate=cfg.dropout_rate,
    dtype=cfg.jnp_dtype,
    float32_logits=cfg.float32_attention_logits,
  )


def _norm(cfg: T5Config) -> layers.RMSNorm:
  return layers.RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.jnp_dtype)


def _mlp(cfg: T5Config) -> layers.GatedMLP:
  return layers.GatedMLP(
    embed_dim=cfg.emb_dim,
    mlp_dim=cfg.mlp_dim,
    dropout_rate=cfg.dropout_rate,
    dtype=cfg.jnp_dtype,
  )


def _relpos(cfg: T5Config, *, bidirectional: bool):
  return layers.RelativePositionBias(
    num_heads=cfg.num_heads,
    bidirectional=bidirectional,
    num_buckets=cfg.relative_attention_num_buckets,
    max_distance=cfg.relative_attention_max_distance,
  )


def key_padding_mask(tokens: Array) -> Array:
  """[b, s] tokens -> [b, 1, 1, s] mask, True where a key is a real token."""
  return (tokens > 0)[:, None, None, :]


def same_segment(query_segments: Array, key_segments: Array) -> Array:
  """Segment ids [b, q] and [b, k] of a packed batch (SeqIO's: 1, 2, ...
  per example in a row, 0 for padding) -> [b, 1, q, k], True where query
  and key belong to the same example."""
  return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def attention_masks(
  encoder_tokens: Array,
  decoder_input_tokens: Array,
  encoder_segment_ids: Optional[Array] = None,
  decoder_segment_ids: Optional[Array] = None,
) -> tuple[Array, Array, Array]:
  """The encoder's, the decoder's self- and the cross-attention masks
  ([b, 1, s|1, s], [b, 1, l, l], [b, 1, l|1, s]). With segment ids (a packed
  batch) no attention crosses from one example to another; the relative
  position biases need nothing more, since an example's tokens are
  contiguous and their offsets are those of the example alone."""
  encoder = key_padding_mask(encoder_tokens)
  decoder = nn.make_causal_mask(decoder_input_tokens, dtype=jnp.bool_)
  cross = key_padding_mask(encoder_tokens)
  if encoder_segment_ids is not None:
    encoder = encoder & same_segment(encoder_segment_ids, encoder_segment_ids)
  if decoder_segment_ids is not None:
    decoder = decoder & same_segment(decoder_segment_ids, decoder_segment_ids)
  if encoder_segment_ids is not None and decoder_segment_ids is not None:
    cross = cross & same_segment(decoder_segment_ids, encoder_segment_ids)
  return encoder, decoder, cross


class EncoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_attention_norm = _norm(cfg)
    self.attention = _attention(cfg)
    self.pre_mlp_norm = _norm(cfg)
    self.mlp = _mlp(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(
    self, x: Array, *, bias: Array, mask: Array, deterministic: bool
  ) -> Array:
    y = self.pre_attention_norm(x)
    y = self.attention(y, y, bias=bias, mask=mask, deterministic=deterministic)
    x = x + self.dropout(y, deterministic=deterministic)
    y = self.mlp(self.pre_mlp_norm(x), deterministic=deterministic)
    return x + self.dropout(y, deterministic=deterministic)


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  def setup(self):
    cfg = self.config
    self.relpos_bias = _relpos(cfg, bidirectional=True)
    self.layers = layers.layer_stack(
      functools.partial(EncoderLayer, cfg),
      cfg.num_encoder_layers,
      cfg.scan_layers,
    )
    self.encoder_norm = _norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(
    self,
    tokens: Array,
    *,
    deterministic: bool,
    remat_policy: str = 'none',
    mask: Optional[Array] = None,
  ) -> Array:
    """[b, s] tokens -> [b, s, e] encoded (`mask`: `attention_masks`'s
    first, for a packed batch; by default the keys' padding)."""
    positions = jnp.arange(tokens.shape[1])
    bias = self.relpos_bias(positions, positions)  # [1, h, s, s]
    mask = key_padding_mask(tokens) if mask is None else mask
    x = self.dropout(self.shared_embedding(tokens), deterministic=deterministic)

    def body(layer, x, bias, mask):
      x = layer(x, bias=bias, mask=mask, deterministic=deterministic)
      return layers.constrain(x, ('batch', 'length', 'embed'))

    x, _ = layers.run_layers(
      self.layers,
      self.config.num_encoder_layers,
      body,
      x,
      bias,
      mask,
      remat_policy=remat_policy,
    )
    return self.dropout(self.encoder_norm(x), deterministic=deterministic)


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention, MLP; each pre-normed and residual."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_self_attention_norm = _norm(cfg)
    self.self_attention = _attention(cfg)
    self.pre_cross_attention_norm = _norm(cfg)
    self.encoder_decoder_attention = _attention(cfg)
    self.pre_mlp_norm = _norm(cfg)
    self.mlp = _mlp(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def self_kv(self, x: Array) -> tuple[Array, Array]:
    """Self-attention keys/values of layer inputs x [b, l, e] -> [b, l, h, d].

    This is all a skipped layer computes for an exited token (CALM's state
    propagation): its K/V from the hidden state that enters it.
    """
    return self.self_attention.project_kv(self.pre_self_attention_norm(x))

  def cross_kv(self, encoded: Array) -> tuple[Array, Array]:
    """Cross-attention keys/values [b, s, h, d]; computed once per input."""
    return self.encoder_decoder_attention.project_kv(encoded)

  def _self_attend(self, x, keys, values, bias, mask, deterministic):
    q = self.self_attention.project_q(self.pre_self_attention_norm(x))
    y = self.self_attention.attend(
      q, keys, values, bias=bias, mask=mask, deterministic=deterministic
    )
    return x + self.dropout(y, deterministic=deterministic)

  def _cross_and_mlp(self, x, cross_k, cross_v, cross_mask, deterministic):
    attn = self.encoder_decoder_attention
    q = attn.project_q(self.pre_cross_attention_norm(x))
    y = attn.attend(
      q,
      cross_k,
      cross_v,
      bias=None,
      mask=cross_mask,
      deterministic=deterministic,
    )
    x = x + self.dropout(y, deterministic=deterministic)
    y = self.mlp(self.pre_mlp_norm(x), deterministic=deterministic)
    return x + self.dropout(y, deterministic=deterministic)

  def __call__(
    self,
    x: Array,
    encoded: Array,
    *,
    self_bias: Array,
    self_mask: Array,
    cross_mask: Array,
    deterministic: bool,
  ) -> Array:
    """Whole-sequence (teacher-forced) layer: x [b, l, e] -> [b, l, e]."""
    keys, values = self.self_kv(x)
    x = self._self_attend(x, keys, values, self_bias, self_mask, deterministic)
    cross_k, cross_v = self.cross_kv(encoded)
    return self._cross_and_mlp(x, cross_k, cross_v, cross_mask, deterministic)

  def step(
    self,
    x: Array,
    keys: Array,
    values: Array,
    cross_k: Array,
    cross_v: Array,
    *,
    self_bias: Array,
    self_mask: Array,
    cross_mask: Array,
  ) -> Array:
    """One decode position, x [b, 1, e] -> [b, 1, e].

    keys/values [b, t, h, d] is this layer's cache, already holding this
    position's entry (written by the caller from `self_kv`).
    """
    x = self._self_attend(x, keys, values, self_bias, self_mask, True)
    return self._cross_and_mlp(x, cross_k, cross_v, cross_mask, True)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  def setup(self):
    cfg = self.config
    self.relpos_bias = _relpos(cfg, bidirectional=False)
    self.layers = layers.layer_stack(
      functools.partial(DecoderLayer, cfg),
      cfg.num_decoder_layers,
      cfg.scan_layers,
    )
    self.decoder_norm = _norm(cfg)
    self.logits_dense = self.param(
      'logits_dense',
      layers._init(
        nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
        ('embed', 'vocab'),
      ),
      (cfg.emb_dim, cfg.vocab_size),
      jnp.float32,
    )
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def logits(self, h: Array) -> Array:
    """Exit head: [..., e] raw hidden state -> [..., v] float32 logits (the
    confidence measures and the loss read them in float32 whatever the
    activation dtype)."""
    return layers.dense(
      '...e,ev->...v',
      self.decoder_norm(h),
      self.logits_dense,
      self.config.jnp_dtype,
      out_dtype=jnp.float32,
    )

  def head_operands(self, h: Array) -> tuple[Array, Array]:
    """`logits` before its matmul: (normed states [..., e], output layer
    [e, v]), both in the activation dtype."""
    dtype = self.config.jnp_dtype
    return self.decoder_norm(h).astype(dtype), jnp.asarray(
      self.logits_dense, dtype
    )

  def __call__(
    self,
    encoded: Array,
    encoder_tokens: Array,
    decoder_input_tokens: Array,
    *,
    deterministic: bool,
    remat_policy: str = 'none',
    masks: Optional[tuple[Array, Array]] = None,
  ) -> Array:
    """Teacher-forced pass -> raw hidden state of every layer [L, b, l, e]
    (`masks`: the self- and cross-attention masks of `attention_masks`)."""
    length = decoder_input_tokens.shape[1]
    positions = jnp.arange(length)
    self_bias = self.relpos_bias(positions, positions)  # [1, h, l, l]
    if masks is None:
      masks = attention_masks(encoder_tokens, decoder_input_tokens)[1:]
    self_mask, cross_mask = masks  # [b, 1, l, l], [b, 1, l|1, s]
    x = self.dropout(
      self.shared_embedding(decoder_input_tokens), deterministic=deterministic
    )

    def body(layer, x, encoded, self_bias, self_mask, cross_mask):
      x = layer(
        x,
        encoded,
        self_bias=self_bias,
        self_mask=self_mask,
        cross_mask=cross_mask,
        deterministic=deterministic,
      )
      return layers.constrain(x, ('batch', 'length', 'embed'))

    _, hidden = layers.run_layers(
      self.layers,
      self.config.num_decoder_layers,
      body,
      x,
      encoded,
      self_bias,
      self_mask,
      cross_mask,
      remat_policy=remat_policy,
    )
    return hidden

  # --- Decode-time pieces, one position at a time (see decoding/loops.py). ---

  def embed(self, tokens: Array) -> Array:
    """[b] previous tokens -> [b, 1, e] input of the first layer."""
    return self.shared_embedding(tokens[:, None])

  def cross_kv(self, encoded: Array) -> tuple[tuple[Array, Array], ...]:
    """Per layer (keys, values) [b, s, h, d] over the encoder output."""
    return tuple(
      layers.on_layer(self.layers, i, DecoderLayer.cross_kv, encoded)
      for i in range(self.config.num_decoder_layers)
    )

  def step_bias(self, position: Array, cache_length: int) -> Array:
    """Relative position bias of query `position` over the cache [1, h, 1, t]."""
    return self.relpos_bias(
      jnp.reshape(position, (1,)), jnp.arange(cache_length)
    )

  def query_bias(self, positions: Array, cache_length: int) -> Array:
    """Relative position bias of each row's own query positions [b, g]
    over the cache [b, h, g, t] (the speculative loop's rows advance by
    different counts)."""
    rows, block = positions.shape
    bias = self.relpos_bias(positions.reshape(-1), jnp.arange(cache_length))
    heads = bias.shape[1]
    return (
      bias[0].reshape(heads, rows, block, cache_length).transpose(1, 0, 2, 3)
    )

  def layer_kv(self, index: int, x: Array) -> tuple[Array, Array]:
    return layers.on_layer(self.layers, index, DecoderLayer.self_kv, x)

  def layer_step(
    self,
    index: int,
    x: Array,
    keys: Array,
    values: Array,
    cross_k: Array,
    cross_v: Array,
    *,
    self_bias: Array,
    self_mask: Array,
    cross_mask: Array,
  ) -> Array:
    return layers.on_layer(
      self.layers,
      index,
      DecoderLayer.step,
      x,
      keys,
      values,
      cross_k,
      cross_v,
      self_bias=self_bias,
      self_mask=self_mask,
      cross_mask=cross_mask,
    )


class EncoderDecoder(nn.Module):
  """T5 1.1 with a shared input embedding and an untied output head."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
      cfg.vocab_size, cfg.emb_dim, dtype=cfg.jnp_dtype
    )
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(
    self,
    encoder_tokens: Array,
    *,
    deterministic: bool = True,
    remat_policy: str = 'none',
  ) -> Array:
    return self.encoder(
      encoder_tokens, deterministic=deterministic, remat_policy=remat_policy
    )

  def decoder_hidden(
    self,
    encoder_tokens: Array,
    decoder_input_tokens: Array,
    *,
    deterministic: bool = True,
    remat_policy: str = 'none',
    encoder_segment_ids: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
  ) -> Array:
    """Raw hidden state of every decoder layer [L, b, l, e]
    (`remat_policy`: `layers.REMAT_POLICIES`, for training; segment ids
    [b, s] and [b, l]: a packed batch)."""
    encoder_mask, *masks = attention_masks(
      encoder_tokens,
      decoder_input_tokens,
      encoder_segment_ids,
      decoder_segment_ids,
    )
    encoded = self.encoder(
      encoder_tokens,
      deterministic=deterministic,
      remat_policy=remat_policy,
      mask=encoder_mask,
    )
    return self.decoder(
      encoded,
      encoder_tokens,
      decoder_input_tokens,
      deterministic=deterministic,
      remat_policy=remat_policy,
      masks=tuple(masks),
    )

  def head(self, h: Array) -> Array:
    """The exit head on raw states [..., e] -> float32 logits [..., v]."""
    return self.decoder.logits(h)

  def head_operands(self, h: Array) -> tuple[Array, Array]:
    return self.decoder.head_operands(h)

  def exit_logits(
    self, hidden: Array, exit_layers: Sequence[int] | None = None
  ) -> Array:
    """hidden [L, b, l, e] -> logits [x, b, l, v] of the given 1-based exits."""
    exit_layers = exit_layers or self.config.exit_layers
    chosen = hidden[jnp.asarray(exit_layers) - 1]
    return self.decoder.logits(chosen)

  def __call__(
    self,
    encoder_tokens: Array,
    decoder_input_tokens: Array,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Training forward: logits of every configured exit [x, b, l, v]."""
    hidden = self.decoder_hidden(
      encoder_tokens, decoder_input_tokens, deterministic=deterministic
    )
    return self.exit_logits(hidden)
