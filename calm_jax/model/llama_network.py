"""The Llama-family network (decoder-only): RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP, tied or untied head, over the blocks
of `layers` that T5 uses too. `llama.py` is its CALM wrapper: exits,
decode callbacks, the loss.

Every layer is a possible exit: an exit's logits are `head(final_norm(h_i))`,
the same final norm and head as the top layer.

Einsum letters: b batch, l length, t cache length, k kv heads, d head dim,
e embed, v vocab.
"""

import dataclasses
import functools
import math
from typing import ClassVar
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import arguments
from calm_jax import errors
from calm_jax.decoding import thresholds
from calm_jax.model import layers

Array = jax.Array


# Rotary scalings that map onto this model (transformers' rope types
# 'default', 'linear', 'llama3').
ROPE_SCALINGS = ('none', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Dims and exit layout of a Llama-family model (SmolLM2-135M by default).

  Exits: `exit_layers` lists the 1-based layers trained or adapted as exits
  (empty: `first_exit`, `first_exit + exit_interval`, ...); the top layer is
  always one.
  """

  family: ClassVar[str] = 'llama'

  vocab_size: int = 49152
  emb_dim: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  mlp_dim: int = 1536
  rope_theta: float = 100000.0
  # Rotary scaling of long-context checkpoints (`ROPE_SCALINGS`): 'none';
  # 'linear' (every frequency / rope_factor); 'llama3' (Llama 3.1's: the
  # low frequencies / rope_factor, the high ones kept, a smooth blend
  # between, set by the pretraining context rope_original_context).
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_context: int = 8192
  # The longest sequence, prompt and output, its positions were trained for
  # (HF's max_position_embeddings): a longer decode is refused.
  context_length: int = 8192
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  first_exit: int = 1
  exit_interval: int = 1
  exit_layer_list: tuple[int, ...] = ()
  dropout_rate: float = 0.0
  # Parameter layout (as `network.T5Config.scan_layers`): the layers'
  # parameters stacked on a leading 'layers' axis, run as one scan.
  scan_layers: bool = False
  # Activation dtype (`arguments.DTYPES`); parameters stay float32.
  dtype: str = 'float32'

  def __post_init__(self):
    arguments.check(
      first_exit=self.first_exit,
      exit_interval=self.exit_interval,
      dtype=self.dtype,
      num_layers=self.num_layers,
    )
    if self.num_heads % self.num_kv_heads:
      raise errors.SettingError(
        f'num_heads={self.num_heads} must be a multiple of '
        f'num_kv_heads={self.num_kv_heads}'
      )
    for layer in self.exit_layer_list:
      arguments.check(first_exit=layer, num_layers=self.num_layers)
    if self.rope_scaling not in ROPE_SCALINGS:
      raise errors.SettingError(
        f'rope_scaling={self.rope_scaling!r}: one of {ROPE_SCALINGS}'
      )
    arguments.integer('context_length', self.context_length, 1)

  @property
  def num_decoder_layers(self) -> int:
    """The layers tokens climb (the name the loops and jobs share)."""
    return self.num_layers

  @property
  def exit_layers(self) -> tuple[int, ...]:
    """1-based layers that emit a prediction (the top one included)."""
    return thresholds.trained_exit_layers(
      self.num_layers,
      first_exit=self.first_exit,
      exit_interval=self.exit_interval,
      layers=self.exit_layer_list,
    )

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


# --- blocks ------------------------------------------------------------------


def rotary_frequencies(config: LlamaConfig, half: int) -> Array:
  """The rotary angle per position of each of the `half` frequency pairs,
  [half], scaled as transformers' rope types 'default', 'linear' and
  'llama3' scale them."""
  inv_freq = 1.0 / config.rope_theta ** (
    jnp.arange(0, half, dtype=jnp.float32) / half
  )
  if config.rope_scaling == 'none':
    return inv_freq
  scaled = inv_freq / config.rope_factor
  if config.rope_scaling == 'linear':
    return scaled
  # llama3: wavelengths past the pretraining context / low_freq_factor are
  # scaled, those under it / high_freq_factor kept, and those between blend
  # linearly in context / wavelength.
  context = config.rope_original_context
  low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
  wavelength = 2 * math.pi / inv_freq
  smooth = (context / wavelength - low) / (high - low)
  blended = (1 - smooth) * scaled + smooth * inv_freq
  return jnp.where(
    wavelength > context / low,
    scaled,
    jnp.where(wavelength < context / high, inv_freq, blended),
  )


def rotary(x: Array, positions: Array, config: LlamaConfig) -> Array:
  """Rotary position embedding, half-split layout (x1, x2) -> (x1 cos - x2
  sin, x2 cos + x1 sin), as Hugging Face's Llama applies it.

  x [b, l, n, d], positions [b, l] -> [b, l, n, d].
  """
  half = x.shape[-1] // 2
  inv_freq = rotary_frequencies(config, half)  # [d/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _norm(cfg: LlamaConfig) -> layers.RMSNorm:
  return layers.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=cfg.jnp_dtype)


class Block(nn.Module):
  """Pre-norm grouped-query attention (rotary positions) and SwiGLU MLP,
  each residual; the blocks are `layers`' (T5's too)."""

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.attention_norm = _norm(cfg)
    self.attention = layers.MultiHeadAttention(
      embed_dim=cfg.emb_dim,
      num_heads=cfg.num_heads,
      head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads,
      scale_logits=True,
      dtype=cfg.jnp_dtype,
    )
    self.mlp_norm = _norm(cfg)
    self.mlp = layers.GatedMLP(
      embed_dim=cfg.emb_dim,
      mlp_dim=cfg.mlp_dim,
      activation='silu',
      names=('gate', 'up', 'down'),
      dtype=cfg.jnp_dtype,
    )

  def kv(self, x: Array, positions: Array) -> tuple[Array, Array]:
    """Rotated keys and values [b, l, k, d] of the layer's inputs x
    [b, l, e] at rotary positions [b, l]: all a skipped layer computes for
    an exited token (CALM's state propagation)."""
    keys, values = self.attention.project_kv(self.attention_norm(x))
    return rotary(keys, positions, self.config), values

  def attend_and_mlp(
    self, x: Array, positions: Array, keys: Array, values: Array, mask: Array
  ) -> Array:
    """The rest of the layer over keys/values [b, t, k, d] (mask [b, 1, l,
    t]) that already hold x's own."""
    q = self.attention.project_q(self.attention_norm(x))
    q = rotary(q, positions, self.config)
    y = self.attention.attend(
      q, keys, values, bias=None, mask=mask, deterministic=True
    )
    x = x + y.astype(x.dtype)
    return x + self.mlp(self.mlp_norm(x))

  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    keys, values = self.kv(x, positions)
    return self.attend_and_mlp(x, positions, keys, values, mask)


class DecoderOnly(nn.Module):
  """The Llama-family network: embedding, blocks, final norm, head."""

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
      'embedding',
      layers._init(nn.initializers.normal(1.0), ('vocab', 'embed')),
      (cfg.vocab_size, cfg.emb_dim),
      jnp.float32,
    )
    self.layers = layers.layer_stack(
      functools.partial(Block, cfg), cfg.num_layers, cfg.scan_layers
    )
    self.final_norm = _norm(cfg)
    if not cfg.tie_embeddings:
      self.logits_dense = self.param(
        'logits_dense',
        layers._init(
          nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
          ('embed', 'vocab'),
        ),
        (cfg.emb_dim, cfg.vocab_size),
        jnp.float32,
      )

  def logits(self, h: Array) -> Array:
    """Exit head: raw hidden state [..., e] -> float32 logits [..., v]."""
    normed = self.final_norm(h)
    dtype = self.config.jnp_dtype
    if self.config.tie_embeddings:
      kernel, spec = self.embedding, '...e,ve->...v'
    else:
      kernel, spec = self.logits_dense, '...e,ev->...v'
    return layers.dense(spec, normed, kernel, dtype, out_dtype=jnp.float32)

  def head_operands(self, h: Array) -> tuple[Array, Array]:
    """`logits` before its matmul: (normed states [..., e], output layer
    [e, v]; the embedding transposed when tied), in the activation dtype."""
    dtype = self.config.jnp_dtype
    kernel = (
      self.embedding.T if self.config.tie_embeddings else self.logits_dense
    )
    return self.final_norm(h).astype(dtype), jnp.asarray(kernel, dtype)

  def embed(self, tokens: Array) -> Array:
    """Token ids [...] -> [..., e] in the activation dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(
      self.config.jnp_dtype
    )

  def __call__(
    self,
    tokens: Array,
    lengths: Optional[Array],
    remat_policy: str = 'none',
    positions: Optional[Array] = None,
    mask: Optional[Array] = None,
  ) -> Array:
    """Teacher-forced pass over right-padded tokens [b, l] with their
    lengths [b] -> the raw hidden state of every layer [L, b, l, e]
    (`remat_policy`: `layers.REMAT_POLICIES`, for training). A packed
    batch gives its own rotary `positions` [b, l] and `mask` [b, 1, l, l]
    (`segment_causal_mask`) instead of lengths."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if mask is None:
      mask = causal_mask(positions, lengths)
    x = self.embed(tokens)

    def body(layer, x, positions, mask):
      x = layer(x, positions, mask)
      return layers.constrain(x, ('batch', 'length', 'embed'))

    _, hidden = layers.run_layers(
      self.layers,
      self.config.num_layers,
      body,
      x,
      positions,
      mask,
      remat_policy=remat_policy,
    )
    return hidden

  def every_exit_logits(self, tokens: Array, lengths: Array) -> Array:
    """Logits of every layer [L, b, l, v] (what `init` traces, so that
    every parameter, the final norm's too, is created)."""
    return self.logits(self(tokens, lengths))

  # --- decode-time pieces (see decoding/loops.py) ---

  def layer_kv(self, index: int, x: Array, positions: Array):
    return layers.on_layer(self.layers, index, Block.kv, x, positions)

  def layer_step(self, index, x, positions, keys, values, mask):
    return layers.on_layer(
      self.layers,
      index,
      Block.attend_and_mlp,
      x,
      positions,
      keys,
      values,
      mask,
    )

  def prefill(self, tokens: Array, lengths: Array):
    """Every layer's keys/values over the first `lengths` [b] positions of
    tokens [b, s] (later positions hold filler the mask hides)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = causal_mask(positions, lengths)
    x = self.embed(tokens)
    kv = []
    for index in range(self.config.num_layers):
      keys, values = self.layer_kv(index, x, positions)
      kv.append((keys, values))
      x = self.layer_step(index, x, positions, keys, values, mask)
    return tuple(kv)


def segment_causal_mask(segments: Array) -> Array:
  """[b, l] example ids of a (packed) row, 0 for padding -> [b, 1, l, l]: a
  query may see keys at or before it of its own example."""
  index = jnp.arange(segments.shape[1])
  return (
    (index[None, None, None, :] <= index[None, None, :, None])
    & (segments[:, None, :, None] == segments[:, None, None, :])
    & (segments[:, None, None, :] > 0)
  )


def causal_mask(positions: Array, lengths: Array) -> Array:
  """[b, 1, l, l]: a query may see keys at or before it, within its row's
  length."""
  key_positions = positions[:, None, None, :]
  return (key_positions <= positions[:, None, :, None]) & (
    key_positions < lengths[:, None, None, None]
  )
