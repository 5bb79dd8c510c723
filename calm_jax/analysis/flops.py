"""FLOPs of static and early-exit decoding (2 FLOPs per multiply-add).

One accounting for the benchmark's `flops_ideal_speedup`: embedding lookups
cost nothing; the encoder and the per-layer cross-attention K/V are the same
for both decoders; per output token and row, a static decoder runs every
layer and one output head, while an early-exit decoder runs
- the K/V projection of every layer (run layers and skipped layers' fills),
- the rest of each layer up to the exit,
- a confidence head at every allowed exit layer it reaches below the top,
- the output head, unless the confidence measure already computed the exit's
  logits (softmax measures reuse them for the emitted token).
Attention is counted over the whole cache length, as the jitted loop runs it.
The encoder is left out unless asked for (`include_encoder`): it is the same
work for both decoders and runs as batched matmuls, not per-token matvecs,
so its FLOPs would say nothing about the decode loop's time.
"""

import dataclasses
from typing import Sequence

import numpy as np

from calm_jax.decoding import confidence
from calm_jax.model import llama
from calm_jax.model import network


@dataclasses.dataclass(frozen=True)
class LayerCosts:
  """FLOPs of the pieces of one decode step for one row."""

  kv: float  # self-attention K/V projections of one layer
  rest: float  # the rest of one layer (q, attention, out, cross, MLP)
  head: float  # final norm + vocabulary projection
  encoder: float  # encoder + cross K/V for one input row


def _llama_costs(
  cfg: llama.LlamaConfig, *, input_length: int, cache_length: int
) -> LayerCosts:
  """A decoder-only layer attends over the prompt and the generated
  cache; the prompt's prefill (the 'encoder') is the same for both."""
  e, h, d, f = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  kv = 2 * 2 * e * cfg.num_kv_heads * d
  rest = 2 * e * h * d + 2 * 2 * h * d * (input_length + cache_length)
  rest += 2 * h * d * e + 3 * 2 * e * f
  return LayerCosts(
    kv=kv,
    rest=rest,
    head=2 * e * cfg.vocab_size,
    encoder=input_length * cfg.num_layers * (kv + rest),
  )


def layer_costs(
  cfg: network.T5Config | llama.LlamaConfig,
  *,
  input_length: int,
  cache_length: int,
) -> LayerCosts:
  if isinstance(cfg, llama.LlamaConfig):
    return _llama_costs(
      cfg, input_length=input_length, cache_length=cache_length
    )
  e, h, d, f = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  hd = h * d
  kv = 2 * 2 * e * hd
  self_attention = 2 * e * hd + 2 * 2 * hd * cache_length + 2 * hd * e
  cross_attention = 2 * e * hd + 2 * 2 * hd * input_length + 2 * hd * e
  mlp = 3 * 2 * e * f
  encoder_layer = 4 * 2 * e * hd + 2 * 2 * hd * input_length + mlp
  encoder = input_length * (
    cfg.num_encoder_layers * encoder_layer + cfg.num_decoder_layers * kv
  )
  return LayerCosts(
    kv=kv,
    rest=self_attention + cross_attention + mlp,
    head=2 * e * cfg.vocab_size,
    encoder=encoder,
  )


def confidence_cost(
  measure: str, cfg: network.T5Config, adapters: bool = False
) -> float:
  """FLOPs of one confidence evaluation for one row (through an exit
  adapter's affine map first, with `adapters`)."""
  if adapters:
    return 2 * cfg.emb_dim**2 + confidence_cost(measure, cfg)
  if measure in confidence.GIVES_LOGITS:
    return 2 * cfg.emb_dim * cfg.vocab_size + 3 * cfg.vocab_size
  if measure == 'state':
    return 3 * 2 * cfg.emb_dim
  if measure == 'classifier':
    return 2 * cfg.emb_dim
  raise ValueError(f'no cost for confidence measure {measure!r}')


def static_flops(
  cfg: network.T5Config,
  *,
  batch_size: int,
  num_tokens: int,
  input_length: int,
  cache_length: int,
  include_encoder: bool = False,
) -> float:
  """Full-depth decode of `num_tokens` (row, position) pairs."""
  c = layer_costs(cfg, input_length=input_length, cache_length=cache_length)
  per_token = cfg.num_decoder_layers * (c.kv + c.rest) + c.head
  encoder = batch_size * c.encoder if include_encoder else 0.0
  return encoder + num_tokens * per_token


def early_exit_flops(
  cfg: network.T5Config,
  exit_layers: Sequence[int],
  *,
  measure: str,
  allowed_exits: Sequence[int],
  batch_size: int,
  input_length: int,
  cache_length: int,
  include_encoder: bool = False,
  adapters: bool = False,
) -> float:
  """Early-exit decode where token j stopped at 1-based `exit_layers[j]`
  (`adapters`: every exit reads through an exit adapter)."""
  c = layer_costs(cfg, input_length=input_length, cache_length=cache_length)
  layers = np.asarray(exit_layers, np.int64)
  allowed = np.asarray(sorted(allowed_exits), np.int64)
  top = cfg.num_decoder_layers
  checks = (allowed[None, :] <= layers[:, None]).sum(-1)  # [tokens]
  reuses_logits = measure in confidence.GIVES_LOGITS
  heads = np.where((layers < top) & reuses_logits, 0, 1)
  total = (
    len(layers) * top * c.kv
    + layers.sum() * c.rest
    + checks.sum() * confidence_cost(measure, cfg, adapters)
    + heads.sum() * (c.head + (2 * cfg.emb_dim**2 if adapters else 0))
  )
  encoder = batch_size * c.encoder if include_encoder else 0.0
  return encoder + float(total)
