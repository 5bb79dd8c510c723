"""A decoder-only (Llama family) CALM model: RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP, tied or untied head.

Every layer is a possible exit: an exit's logits are `head(final_norm(h_i))`,
the same final norm and head as the top layer (optionally through a learned
exit adapter, see `adapters`).

Decoding drives the model-free loops of `decoding/loops.py` as T5 does:
- the prompt but its last token is prefilled at full depth
  (`encode_context`): its keys/values per layer are the fixed context the
  generated tokens attend to, as T5's decoder attends to its encoder;
- the last prompt token is the loop's start token, so the pass that
  predicts the first new token, like every later one, may exit early;
- generated positions get rotary positions that continue each row's own
  prompt (`length - 1 + t`), so ragged prompts batch without left padding.

Einsum letters: b batch, l length, s prompt length, t cache length,
h query heads, k kv heads, g query heads per kv head, d head dim, e embed,
f mlp hidden, v vocab.
"""

import dataclasses
import functools
import math
from typing import Any
from typing import ClassVar
from typing import Mapping
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import arguments
from calm_jax import errors
from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.decoding import thresholds
from calm_jax.model import layers
from calm_jax.model import models

Array = jax.Array
Params = Mapping[str, Any]


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
      return layers.dense('...e,ve->...v', normed, self.embedding, dtype)
    return layers.dense('...e,ev->...v', normed, self.logits_dense, dtype)

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


# --- exit adapters -------------------------------------------------------------

# The params key of the exit adapters: per layer output l (0: the
# embedding, L: the top; both identity), an affine map into the top layer's
# space, {'kernel': [L + 1, e, e], 'bias': [L + 1, e]} (see
# `model/adapters.py`).
ADAPTERS = 'adapters'


def network_params(params: Params) -> Params:
  """The network's parameters, without the exit adapters."""
  return {k: v for k, v in params.items() if k != ADAPTERS}


def adapt(adapters: Params, h: Array, layer) -> Array:
  """h [b, e] through the adapter of `layer` (an int, or [b] per row)."""
  kernel = jnp.asarray(adapters['kernel'])[layer]  # [e, e] or [b, e, e]
  bias = jnp.asarray(adapters['bias'])[layer]  # [e] or [b, e]
  spec = 'be,ef->bf' if kernel.ndim == 2 else 'be,bef->bf'
  out = jnp.einsum(spec, h.astype(jnp.float32), kernel) + bias
  return out.astype(h.dtype)


# --- decoding ------------------------------------------------------------------


def prompt_lengths(tokens: Array) -> Array:
  """[b, s] right-padded prompts (pad 0) -> their lengths [b] (position of
  the last non-pad token + 1; at least 1, so an all-pad row is a one-token
  prompt)."""
  positions = jnp.arange(1, tokens.shape[1] + 1)
  return jnp.maximum(jnp.max(jnp.where(tokens != 0, positions, 0), axis=1), 1)


@dataclasses.dataclass(frozen=True)
class Context:
  """What decoding needs of the prompts (the Llama analogue of T5's encoded
  inputs)."""

  prompt_kv: tuple[tuple[Array, Array], ...]  # layers x ([b, s, k, d],) * 2
  prompt_mask: Array  # [b, s]: prefilled positions (all but the last token)
  offsets: Array  # [b]: rotary position of generated step 0 (length - 1)
  start_tokens: Array  # [b]: each prompt's last token, the loop's first input


jax.tree_util.register_dataclass(
  Context,
  data_fields=['prompt_kv', 'prompt_mask', 'offsets', 'start_tokens'],
  meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class LlamaStepFns:
  """`loops.StepFns` over one model's parameters and one prefilled batch.

  Each layer's attention reads the prompt's keys/values (fixed) and the
  loop's cache of generated positions, one softmax over both.
  """

  module: DecoderOnly
  params: Params  # the network's, and 'adapters' when the model has them
  context: Context

  @property
  def num_layers(self) -> int:
    return self.module.config.num_layers

  def _apply(self, method, *args):
    return self.module.apply(
      {'params': network_params(self.params)}, *args, method=method
    )

  def exit_hidden(self, h: Array, layer) -> Array:
    """Layer `layer`'s state h [b, e] as its exit adapter translates it
    into the top layer's space (h itself without adapters)."""
    if ADAPTERS not in self.params:
      return h
    return adapt(self.params[ADAPTERS], h, layer)

  def embed(self, tokens: Array) -> Array:
    return self._apply(DecoderOnly.embed, tokens[:, None])

  def _rotary(self, offsets: Array, position: Array) -> Array:
    """Rotary positions [r, g] of loop positions [], [r] or [r, g]."""
    if jnp.ndim(position) <= 1:
      return (offsets + position)[:, None]
    return offsets[:, None] + position

  def layer_kv(self, layer: int, x: Array, position: Array):
    positions = self._rotary(self.context.offsets, position)
    return self._apply(DecoderOnly.layer_kv, layer, x, positions)

  def layer_step(
    self,
    layer: int,
    x: Array,
    keys: Array,
    values: Array,
    position: Array,
    rows: Optional[Array] = None,
  ) -> Array:
    take = (lambda a: a) if rows is None else (lambda a: a[rows])
    prompt_k, prompt_v = self.context.prompt_kv[layer]
    positions = self._rotary(take(self.context.offsets), position)  # [r, g]
    queries = positions - take(self.context.offsets)[:, None]  # loop's
    generated = jnp.arange(keys.shape[1]) <= queries[:, :, None]  # [r, g, t]
    prompt = jnp.broadcast_to(
      take(self.context.prompt_mask)[:, None, :],
      generated.shape[:2] + self.context.prompt_mask.shape[1:],
    )
    mask = jnp.concatenate([prompt, generated], axis=2)[:, None]
    all_k = jnp.concatenate([take(prompt_k), keys.astype(prompt_k.dtype)], 1)
    all_v = jnp.concatenate([take(prompt_v), values.astype(prompt_v.dtype)], 1)
    return self._apply(
      DecoderOnly.layer_step, layer, x, positions, all_k, all_v, mask
    )

  def logits(self, h: Array) -> Array:
    return self._apply(DecoderOnly.logits, h)


@dataclasses.dataclass(frozen=True)
class CalmLlama:
  """A multi-exit Llama-family model and the pure functions the jobs need
  around it (the decoder-only counterpart of `models.CalmModel`)."""

  config: LlamaConfig
  loss_weighting: str = 'linear'
  z_loss: float = 1e-4
  remat_policy: str = 'none'  # the train step's (`layers.REMAT_POLICIES`)

  @property
  def module(self) -> DecoderOnly:
    return DecoderOnly(self.config)

  def _init_boxed(self, rng: Array, length: int = 8):
    tokens = jnp.ones((1, length), jnp.int32)
    return self.module.init(
      rng,
      tokens,
      jnp.full((1,), length),
      method=DecoderOnly.every_exit_logits,
    )

  def init_params(self, rng: Array, length: int = 8) -> Params:
    """Random parameters (plain arrays; logical axes via `param_axes`)."""
    return nn.meta.unbox(self._init_boxed(rng, length))

  def param_axes(self) -> Params:
    boxed = jax.eval_shape(lambda: self._init_boxed(jax.random.PRNGKey(0)))
    return nn.get_partition_spec(boxed)['params']

  def exit_config(self, confidence: str, **options) -> loops.ExitConfig:
    """Early-exit settings on this model's exits (see
    `models.CalmModel.exit_config`); `layers` picks a subset of them."""
    layers = options.pop('layers', None) or self.config.exit_layers
    return loops.ExitConfig.create(
      self.config.num_layers,
      confidence=confidence,
      layers=tuple(l for l in layers if l in self.config.exit_layers),
      **options,
    )

  def loss(
    self,
    params: Params,
    batch: Mapping[str, Array],
    *,
    dropout_rng: Optional[Array] = None,
  ) -> tuple[Array, dict]:
    """CALM's weighted per-exit loss of a SeqIO encoder-decoder batch, the
    input as the prompt and the target as its continuation."""
    del dropout_rng  # no dropout in this family
    return calm_lm_loss(self, params, batch)

  def classifier_loss(
    self, classifier: Params, params: Params, batch: Mapping[str, Array]
  ) -> tuple[Array, dict]:
    """Stage 2: the exit classifier on what the exits read; the backbone
    gets no gradient."""
    states = jax.lax.stop_gradient(
      self.exit_states(params, _target_states(self, params, batch))
    )
    exits = self.classifier_exit_layers()
    with_top = jnp.asarray((*exits, self.config.num_layers)) - 1
    predictions = models.exit_predictions(
      functools.partial(self.head, params), states[with_top]
    )
    return models.exit_classifier_loss(
      classifier,
      states[jnp.asarray(exits) - 1],
      predictions,
      batch['decoder_loss_weights'],
    )

  def exit_weights(self):
    return models.exit_loss_weights(
      self.config.exit_layers, self.loss_weighting
    )

  def classifier_exit_layers(self) -> tuple[int, ...]:
    return tuple(
      l for l in self.config.exit_layers if l < self.config.num_layers
    )

  def hidden_states(
    self,
    params: Params,
    tokens: Array,
    lengths: Array,
    remat_policy: str = 'none',
  ):
    """Teacher-forced raw hidden state of every layer [L, b, l, e]."""
    return self.module.apply(
      {'params': network_params(params)}, tokens, lengths, remat_policy
    )

  def exit_states(self, params: Params, hidden: Array) -> Array:
    """What each layer's exit reads of hidden [L, ..., e]: the states
    through the exit adapters, when the model has them."""
    if ADAPTERS not in params:
      return hidden
    kernel = jnp.asarray(params[ADAPTERS]['kernel'])[1:]  # [L, e, e]
    bias = jnp.asarray(params[ADAPTERS]['bias'])[1:]  # [L, e]
    bias = bias.reshape(bias.shape[:1] + (1,) * (hidden.ndim - 2) + (-1,))
    out = jnp.einsum('l...e,lef->l...f', hidden.astype(jnp.float32), kernel)
    return (out + bias).astype(hidden.dtype)

  def head(self, params: Params, states: Array) -> Array:
    """The exit head (final norm, output layer) on states [..., e]."""
    return self.module.apply(
      {'params': network_params(params)}, states, method=DecoderOnly.logits
    )

  def all_layer_logits(
    self, params: Params, tokens: Array, lengths: Array
  ) -> Array:
    """Teacher-forced logits of every layer's exit [L, b, l, v]."""
    hidden = self.hidden_states(params, tokens, lengths)
    return self.head(params, self.exit_states(params, hidden))

  def target_logits(
    self, params: Params, prompts: Array, target_tokens: Array
  ) -> Array:
    """Teacher-forced logits of every layer's exit at each target position
    [L, b, t, v], the targets following their prompts [b, s]."""
    batch = {
      'encoder_input_tokens': prompts,
      'decoder_target_tokens': target_tokens,
    }
    states = self.exit_states(params, _target_states(self, params, batch))
    return self.head(params, states)

  def encode_context(self, params: Params, prompts: Array) -> Context:
    """Prefills right-padded prompts [b, s] (pad 0) at full depth, all but
    each one's last token (`Context`)."""
    lengths = prompt_lengths(prompts)
    kv = self.module.apply(
      {'params': network_params(params)},
      prompts,
      lengths - 1,
      method=DecoderOnly.prefill,
    )
    positions = jnp.arange(prompts.shape[1])
    start = jnp.take_along_axis(prompts, (lengths - 1)[:, None], axis=1)[:, 0]
    return Context(
      prompt_kv=kv,
      prompt_mask=positions[None, :] < (lengths - 1)[:, None],
      offsets=lengths - 1,
      start_tokens=start,
    )

  def step_fns(
    self, params: Params, prompts: Array, max_length: int, context=None
  ) -> LlamaStepFns:
    del max_length  # the loop's cache length is its own
    if context is None:
      context = self.encode_context(params, prompts)
    return LlamaStepFns(module=self.module, params=params, context=context)

  def _loop_args(self, prompts, context) -> dict:
    cfg = self.config
    rows = (prompts if prompts is not None else context.offsets).shape[0]
    return dict(
      batch_size=rows,
      cache_shape=(cfg.num_kv_heads, cfg.head_dim),
      cache_dtype=cfg.jnp_dtype,
    )

  def decode_static(
    self,
    params: Params,
    prompts: Optional[Array],
    max_length: int,
    *,
    eos_id: int = 2,
    sampling: loops.Sampling = loops.Sampling(),
    rng: Optional[Array] = None,
    oracle: bool = False,
    context: Optional[Context] = None,
  ) -> loops.DecodeOutput:
    """Full-depth generation of `max_length` new tokens after prompts
    [b, s], or after their `context` (prompts may then be None)."""
    fns = self.step_fns(params, prompts, max_length, context)
    return loops.static_decode(
      fns,
      max_length=max_length,
      eos_id=eos_id,
      sampling=sampling,
      rng=rng,
      oracle=oracle,
      start_tokens=fns.context.start_tokens,
      **self._loop_args(prompts, fns.context),
    )

  def decode_early_exit(
    self,
    params: Params,
    prompts: Optional[Array],
    max_length: int,
    *,
    exit_config: loops.ExitConfig,
    threshold: Array,
    eos_id: int = 2,
    classifier: Optional[Params] = None,
    rng: Optional[Array] = None,
    forced_exit_layers: Optional[Array] = None,
    context: Optional[Context] = None,
  ) -> loops.DecodeOutput:
    """CALM generation after prompts [b, s] (or their `context`)."""
    fns = self.step_fns(params, prompts, max_length, context)
    return loops.early_exit_decode(
      fns,
      exit_config,
      threshold=threshold,
      max_length=max_length,
      eos_id=eos_id,
      classifier=classifier,
      rng=rng,
      forced_exit_layers=forced_exit_layers,
      start_tokens=fns.context.start_tokens,
      **self._loop_args(prompts, fns.context),
    )

  def decode_speculative(
    self,
    params: Params,
    prompts: Optional[Array],
    max_length: int,
    *,
    draft: speculative.DraftConfig,
    threshold: Array,
    eos_id: int = 2,
    classifier: Optional[Params] = None,
    rng: Optional[Array] = None,
    context: Optional[Context] = None,
  ) -> speculative.SpecOutput:
    """The exact mode after prompts [b, s] (or their `context`)."""
    fns = self.step_fns(params, prompts, max_length, context)
    return speculative.speculative_decode(
      fns,
      draft,
      threshold=threshold,
      max_length=max_length,
      eos_id=eos_id,
      classifier=classifier,
      rng=rng,
      start_tokens=fns.context.start_tokens,
      **self._loop_args(prompts, fns.context),
    )


# --- training: CALM's weighted per-exit loss on prompt + continuation --------


def lm_batch(batch: Mapping[str, Array]) -> dict[str, Array]:
  """An encoder-decoder batch (the SeqIO feature converter's, packed or
  not) as a causal LM batch: each example's input (with its EOS) followed
  by its target, the examples of a packed row one after another.

  Returns tokens [b, s + t]; positions [b, s + t], from 0 in each example
  (rotary); segments [b, s + t], each position's example (1, 2, ...; 0 for
  padding); and `predict` [b, t]: the position whose state predicts each
  target token (the one before it).
  """
  inputs = batch['encoder_input_tokens']  # [b, s], 0-padded
  targets = batch['decoder_target_tokens']  # [b, t], 0-padded
  (rows, s), t = inputs.shape, targets.shape[1]
  width = s + t
  # An unpacked row is one example.
  in_seg = batch.get('encoder_segment_ids', (inputs != 0).astype(jnp.int32))
  out_seg = batch.get('decoder_segment_ids', (targets != 0).astype(jnp.int32))
  in_pos = batch.get('encoder_positions', jnp.arange(s)[None, :])
  out_pos = batch.get('decoder_positions', jnp.arange(t)[None, :])
  real_in, real_out = in_seg > 0, out_seg > 0
  # An input token moves right by the targets of the examples before it; a
  # target token by the inputs of its example and those before it.
  targets_before = (out_seg[:, None, :] < in_seg[:, :, None]) & real_out[
    :, None, :
  ]  # [b, s, t]
  inputs_up_to = (in_seg[:, None, :] <= out_seg[:, :, None]) & real_in[
    :, None, :
  ]  # [b, t, s]
  own_inputs = (in_seg[:, None, :] == out_seg[:, :, None]) & real_in[:, None, :]
  in_index = jnp.where(real_in, jnp.arange(s) + targets_before.sum(2), width)
  out_index = jnp.where(real_out, jnp.arange(t) + inputs_up_to.sum(2), width)

  def place(in_values, out_values):  # padding goes nowhere (index width)
    rows_ = jnp.arange(rows)[:, None]
    out = jnp.zeros((rows, width), jnp.int32)
    out = out.at[rows_, in_index].set(in_values, mode='drop')
    return out.at[rows_, out_index].set(out_values, mode='drop')

  return {
    'tokens': place(inputs, targets),
    'positions': place(
      jnp.broadcast_to(in_pos, inputs.shape),
      own_inputs.sum(2) + out_pos,
    ),
    'segments': place(in_seg, out_seg),
    'predict': jnp.clip(out_index - 1, 0, width - 1),
  }


def _target_states(
  model: 'CalmLlama', params, batch, remat_policy: str = 'none'
) -> Array:
  """Every layer's state at the positions that predict the targets
  [L, b, t, e]."""
  lm = lm_batch(batch)
  hidden = model.module.apply(
    {'params': network_params(params)},
    lm['tokens'],
    None,
    remat_policy,
    positions=lm['positions'],
    mask=segment_causal_mask(lm['segments']),
  )
  index = jnp.broadcast_to(
    lm['predict'][None, :, :, None],
    hidden.shape[:2] + lm['predict'].shape[1:] + hidden.shape[-1:],
  )
  return jnp.take_along_axis(hidden, index, axis=2)


def calm_lm_loss(
  model: 'CalmLlama', params: Params, batch: Mapping[str, Array]
) -> tuple[Array, dict]:
  """CALM's weighted per-exit loss of a decoder-only model on the targets
  of an encoder-decoder batch (prompt = input, continuation = target)."""
  states = _target_states(model, params, batch, model.remat_policy)
  exits = jnp.asarray(model.config.exit_layers) - 1  # states: [L, b, t, e]
  weights = models.exit_loss_weights(
    model.config.exit_layers, model.loss_weighting
  )
  return models.streamed_calm_loss(
    functools.partial(model.head, params),
    model.exit_states(params, states)[exits],
    batch['decoder_target_tokens'],
    batch['decoder_loss_weights'],
    weights,
    model.z_loss,
  )
