"""The decoder-only (Llama family) CALM model over `llama_network`'s
network: exit adapters, the decode callbacks, CALM's loss.

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
from typing import Any
from typing import Mapping
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.model import llama_network
from calm_jax.model import models

Array = jax.Array
Params = Mapping[str, Any]

# The network's config and module, named where the jobs look for them.
LlamaConfig = llama_network.LlamaConfig
DecoderOnly = llama_network.DecoderOnly


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
  exit_loss: str = 'auto'  # `fused_loss.EXIT_LOSS_MODES`

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

  def head_operands(self, params: Params, states: Array) -> tuple[Array, Array]:
    """The exit head before its matmul (see `models.CalmModel`)."""
    return self.module.apply(
      {'params': network_params(params)},
      states,
      method=DecoderOnly.head_operands,
    )

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
    mask=llama_network.segment_causal_mask(lm['segments']),
  )
  # One index per (row, target), broadcast over the layers and the embedding
  # (size-1 axes are whole slices): an index array broadcast to [L, b, t, e]
  # would be one index per element, and its backward a scatter-add with
  # more than 2^31 indices at 8B dims, which the TPU compiler refuses.
  return jnp.take_along_axis(hidden, lm['predict'][None, :, :, None], axis=2)


def calm_lm_loss(
  model: 'CalmLlama', params: Params, batch: Mapping[str, Array]
) -> tuple[Array, dict]:
  """CALM's weighted per-exit loss of a decoder-only model on the targets
  of an encoder-decoder batch (prompt = input, continuation = target)."""
  states = _target_states(model, params, batch, model.remat_policy)
  exits = jnp.asarray(model.config.exit_layers) - 1  # states: [L, b, t, e]
  exit_states = model.exit_states(params, states)[exits]
  return models.exits_loss(model, params, exit_states, batch)
