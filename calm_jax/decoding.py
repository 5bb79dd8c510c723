"""Decoding loops, free of model code.

The loops only see the model through `StepFns` (a Protocol): embed the
previous token, compute one decoder layer's self-attention keys/values for the
current position, run the rest of one layer, and apply the exit head. The
caller builds the callbacks (see `models.CalmModel.step_fns`), so the same
loop drives any model with this shape, or a fake one in tests.

Conventions as in t5x: decoding starts from token 0 (pad doubles as BOS),
stops a row at EOS, and fills positions after EOS with 0.

Einsum/shape letters: b batch, t max decode length (cache length), h heads,
d head dim, e embed, v vocab.
"""
from typing import Protocol

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


class StepFns(Protocol):
  """What a decoding loop needs from a model, for one position."""
  num_layers: int

  def embed(self, tokens: Array) -> Array:
    """[b] previous tokens -> [b, 1, e] input of layer 0."""

  def layer_kv(self, layer: int, x: Array) -> tuple[Array, Array]:
    """Input of layer `layer` [b, 1, e] -> its self-attn K, V [b, 1, h, d]."""

  def layer_step(self, layer: int, x: Array, keys: Array, values: Array,
                 position: Array) -> Array:
    """Rest of layer `layer` for x [b, 1, e] over its cache [b, t, h, d]."""

  def logits(self, h: Array) -> Array:
    """Exit head: raw hidden state [b, e] -> logits [b, v]."""


@flax.struct.dataclass
class KVCache:
  """Self-attention cache, one entry per decoder layer."""
  keys: tuple[Array, ...]    # layers x [b, t, h, d]
  values: tuple[Array, ...]  # layers x [b, t, h, d]

  @classmethod
  def zeros(cls, num_layers: int, shape: tuple[int, ...], dtype) -> 'KVCache':
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(keys=zeros, values=zeros)

  def write(self, layer: int, position: Array, k: Array, v: Array
            ) -> 'KVCache':
    """Stores k, v [b, 1, h, d] at `position` of layer `layer`."""
    put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
        cache, new.astype(cache.dtype), position, axis=1)
    keys = list(self.keys)
    values = list(self.values)
    keys[layer] = put(keys[layer], k)
    values[layer] = put(values[layer], v)
    return KVCache(keys=tuple(keys), values=tuple(values))


@flax.struct.dataclass
class StaticState:
  """Loop state of the full-depth decoder."""
  position: Array  # [] int32: index of the token being produced
  tokens: Array    # [b, t + 1] int32: column 0 is the start token
  done: Array      # [b] bool: row has emitted EOS
  cache: KVCache


def full_depth_layer(fns: StepFns, layer: int, x: Array, cache: KVCache,
                     position: Array) -> tuple[Array, KVCache]:
  """Runs one layer for every row: write its K/V, then attend and MLP."""
  k, v = fns.layer_kv(layer, x)
  cache = cache.write(layer, position, k, v)
  x = fns.layer_step(layer, x, cache.keys[layer], cache.values[layer],
                     position)
  return x, cache


def finish_tokens(next_token: Array, done: Array, eos_id: int
                  ) -> tuple[Array, Array]:
  """Pads rows that already ended and marks rows that end now."""
  next_token = jnp.where(done, 0, next_token)
  return next_token, done | (next_token == eos_id)


def static_decode(fns: StepFns, *, batch_size: int, max_length: int,
                  cache_shape: tuple[int, int], cache_dtype=jnp.float32,
                  eos_id: int = 1) -> Array:
  """Greedy full-depth decoding -> tokens [b, max_length].

  Args:
    fns: the model's step callbacks.
    batch_size: rows decoded together.
    max_length: number of output tokens (the cache length t).
    cache_shape: (heads, head_dim) of one cache entry.
    cache_dtype: cache dtype.
    eos_id: end-of-sequence id; rows stop there and are padded with 0.
  """
  heads, head_dim = cache_shape
  state = StaticState(
      position=jnp.zeros((), jnp.int32),
      tokens=jnp.zeros((batch_size, max_length + 1), jnp.int32),
      done=jnp.zeros((batch_size,), bool),
      cache=KVCache.zeros(fns.num_layers,
                          (batch_size, max_length, heads, head_dim),
                          cache_dtype))

  def running(s: StaticState) -> Array:
    return (s.position < max_length) & ~jnp.all(s.done)

  def step(s: StaticState) -> StaticState:
    x = fns.embed(s.tokens[:, s.position])
    cache = s.cache
    for layer in range(fns.num_layers):
      x, cache = full_depth_layer(fns, layer, x, cache, s.position)
    next_token = jnp.argmax(fns.logits(x[:, 0]), axis=-1).astype(jnp.int32)
    next_token, done = finish_tokens(next_token, s.done, eos_id)
    tokens = s.tokens.at[:, s.position + 1].set(next_token)
    return StaticState(position=s.position + 1, tokens=tokens, done=done,
                       cache=cache)

  final = jax.lax.while_loop(running, step, state)
  return final.tokens[:, 1:]
