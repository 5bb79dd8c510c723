"""The blocks of both families (T5 1.1 and Llama): RMS norm, relative
position bias, attention (multi-head or grouped-query), gated MLP; and the
layer stacks, unrolled or scanned.

Every parameter carries logical axis names from `partitioning.AXES`; the rules
that map them onto a device mesh live in `partitioning.py`.

Einsum letters used in this file:
  b batch, q query length, k key length, h heads, n key/value heads,
  g query heads per key/value head, d head dim (kv), e embed, f mlp hidden.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Large negative number used to mask attention logits; finite so that a fully
# masked row still gives a well defined (uniform) softmax, not NaN.
NEG_INF = -1e10


def _init(initializer, axes):
  return nn.with_logical_partitioning(initializer, axes)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
  """Pins an activation's layout by logical axis names; a no-op unless a
  job traces under `partitioning.activation_rules` (training on a mesh)."""
  return nn.with_logical_constraint(x, axes)


def dense(spec: str, x: Array, kernel: Array, dtype, out_dtype=None) -> Array:
  """einsum of activations and a kernel as t5x runs it: both operands in the
  activation dtype (bfloat16 on accelerators), accumulated in float32 (the
  TPU's matrix unit always accumulates in float32), the result in
  `out_dtype` (default: the activation dtype).

  The result is written in the activation dtype, not in float32, because a
  remat policy that keeps matmul outputs (`REMAT_POLICIES['minimal']`) saves
  exactly this array for the backward pass, stacked over the layers: in
  float32 it doubles the memory of every saved projection. The exit heads
  ask for float32 logits (the loss and the confidence measures read them in
  float32). With dtype float32 this is a plain float32 einsum."""
  return jnp.einsum(
    spec,
    x.astype(dtype),
    jnp.asarray(kernel, dtype),
    preferred_element_type=jnp.dtype(out_dtype or dtype),
  )


# What a layer's backward pass keeps of its forward (t5x's policy names,
# `arguments.REMAT_POLICIES`):
# 'none' keeps every activation; 'minimal' keeps the outputs of matmuls
# against weights (dot_generals with no batch dimension) and recomputes the
# rest, attention scores included; 'full' keeps only the layer's input and
# recomputes the whole layer (one more forward pass per step).
REMAT_POLICIES = {
  'none': None,
  'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  'full': jax.checkpoint_policies.nothing_saveable,
}


def rematerialised(call, policy: str, prevent_cse: bool = True):
  """`call(layer, *arrays)` with the layer's activations rematerialised
  under the named policy in the backward pass (`call` itself for 'none').
  Python settings (dropout's `deterministic`) go in `call`'s closure: the
  lifted checkpoint traces every argument it is given."""
  if policy not in REMAT_POLICIES:
    raise ValueError(
      f'unknown remat_policy {policy!r}; valid: {", ".join(REMAT_POLICIES)}'
    )
  if policy == 'none':
    return call
  return nn.remat(call, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def scanned(body, num_layers: int, remat_policy: str = 'none'):
  """One layer module run `num_layers` times as a `lax.scan` (t5x's
  `scan_layers`): its parameters are stacked on a leading 'layers' axis,
  and the program holds one layer's code whatever the depth.

  body(layer, x, *context) -> x' with context (biases, masks, positions,
  the encoder output) the same for every layer; returns
  f(layer, x, *context) -> (x of the top layer, every layer's x [L, ...]).
  Each layer gets its own init and dropout keys."""

  def step(layer, x, *context):
    x = body(layer, x, *context)
    return x, x

  # prevent_cse=False: inside a scan the loop already keeps XLA from
  # merging the recomputation into the forward pass.
  step = rematerialised(step, remat_policy, prevent_cse=False)

  def run(layer, x, *context):
    scan = nn.scan(
      step,
      variable_axes={'params': 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=(nn.broadcast,) * len(context),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    return scan(layer, x, *context)

  return run


def layer_stack(make_layer, num_layers: int, scan: bool):
  """The layers of an encoder or decoder, built in `setup`: one module
  named 'layers' whose parameters `run_layers` stacks (scan), or
  `num_layers` modules 'layers_0', 'layers_1', ... (unrolled).
  make_layer(name=...) builds one layer."""
  if scan:
    return make_layer(name='layers')
  return [make_layer(name=f'layers_{i}') for i in range(num_layers)]


def run_layers(
  stack, num_layers: int, body, x, *context, remat_policy: str = 'none'
):
  """x through every layer of a stack -> (x of the top layer, every
  layer's output [L, ...]): a list of layer modules runs unrolled, one
  module with stacked parameters runs as a scan (`scanned`).
  body(layer, x, *context) -> x' is one layer's call."""
  if not isinstance(stack, (list, tuple)):
    return scanned(body, num_layers, remat_policy)(stack, x, *context)
  run = rematerialised(body, remat_policy)
  hidden = []
  for layer in stack:
    x = run(layer, x, *context)
    hidden.append(x)
  return x, jnp.stack(hidden)


def on_layer(layer_or_layers, index: int, method, *args, **kwargs):
  """method(layer, *args, **kwargs) on layer `index` of a stack: a list of
  layer modules (unrolled), or one module whose parameters are stacked on
  a leading 'layers' axis (`scanned`), read at that index."""
  if isinstance(layer_or_layers, (list, tuple)):
    return method(layer_or_layers[index], *args, **kwargs)
  at_index = nn.map_variables(
    method,
    'params',
    trans_in_fn=lambda tree: jax.tree_util.tree_map(
      lambda stacked: stacked[index], tree
    ),
  )
  return at_index(layer_or_layers, *args, **kwargs)


def _fan_in_normal(scale: float = 1.0):
  """Truncation-free normal init with variance scale / fan_in (t5x default)."""
  return nn.initializers.variance_scaling(scale, 'fan_in', 'normal')


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no bias, no mean subtraction."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
      'scale',
      _init(nn.initializers.ones, ('embed',)),
      (x.shape[-1],),
      jnp.float32,
    )
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + self.epsilon) * scale).astype(
      self.dtype
    )


def relative_position_bucket(
  relative_position: Array,
  *,
  bidirectional: bool,
  num_buckets: int = 32,
  max_distance: int = 128,
) -> Array:
  """T5's bucketing of (key position - query position).

  Half the buckets (per direction) hold exact small distances, the rest grow
  logarithmically up to `max_distance`; everything further shares the last
  bucket. Works on traced positions, so one decode step can call it.
  """
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Guard the log against n = 0; those positions take the `is_small` branch.
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / (
    np.log(max_distance / max_exact)
  )
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """Learned per-head scalar bias for each relative position bucket."""

  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """Returns the bias [1, heads, q, k] for the given absolute positions."""
    table = self.param(
      'rel_embedding',
      _init(nn.initializers.normal(1.0), ('heads', 'relpos')),
      (self.num_heads, self.num_buckets),
      jnp.float32,
    )
    relative = key_positions[None, :] - query_positions[:, None]  # [q, k]
    buckets = relative_position_bucket(
      relative,
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )
    return jnp.take(table, buckets, axis=1)[None]  # [1, h, q, k]


class MultiHeadAttention(nn.Module):
  """Dot-product attention of both families, split into projections and the
  attention itself so that the decode loop can write this position's
  keys/values into a cache before attending.

  `num_kv_heads` < num_heads is grouped-query attention (Llama's): each
  key/value head serves num_heads / num_kv_heads query heads. The 1/sqrt(d)
  of the logits is folded into the query init (T5's, `scale_logits`
  False) or applied to the logits (Llama's). Positions are the caller's:
  T5 adds a relative bias, Llama rotates the projected queries and keys.
  """

  embed_dim: int
  num_heads: int
  head_dim: int
  num_kv_heads: Optional[int] = None  # None: one per query head
  scale_logits: bool = False
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  # False: the scores [b, h, q, k] and their softmax in the activation
  # dtype (t5x's T5 default, float32_attention_logits=False), half the
  # bytes of the attention's largest arrays; True keeps them float32.
  float32_logits: bool = True

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def setup(self):
    axes = ('embed', 'heads', 'kv')
    query_init = _fan_in_normal()
    if not self.scale_logits:
      # Scaled down by sqrt(head_dim): the scaling T5 leaves out of the
      # attention logits.
      depth_scale = np.sqrt(self.head_dim)
      query_init = lambda *a: _fan_in_normal()(*a) / depth_scale
    self.query = self.param(
      'query',
      _init(query_init, axes),
      (self.embed_dim, self.num_heads, self.head_dim),
    )
    kv_shape = (self.embed_dim, self.kv_heads, self.head_dim)
    self.key = self.param('key', _init(_fan_in_normal(), axes), kv_shape)
    self.value = self.param('value', _init(_fan_in_normal(), axes), kv_shape)
    self.out = self.param(
      'out',
      _init(
        nn.initializers.variance_scaling(
          1.0, 'fan_in', 'normal', in_axis=(0, 1), out_axis=2
        ),
        ('heads', 'kv', 'embed'),
      ),
      (self.num_heads, self.head_dim, self.embed_dim),
    )
    self.dropout = nn.Dropout(self.dropout_rate)

  def project_q(self, x: Array) -> Array:
    """[b, q, e] -> [b, q, h, d]."""
    q = dense('bqe,ehd->bqhd', x, self.query, self.dtype)
    return constrain(q, ('batch', 'length', 'heads', 'kv'))

  def project_kv(self, x: Array) -> tuple[Array, Array]:
    """[b, k, e] -> keys, values, each [b, k, h, d]."""
    axes = ('batch', 'length', 'heads', 'kv')
    k = constrain(dense('bke,ehd->bkhd', x, self.key, self.dtype), axes)
    v = constrain(dense('bke,ehd->bkhd', x, self.value, self.dtype), axes)
    return k, v

  def attend(
    self,
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Optional[Array],
    mask: Optional[Array],
    deterministic: bool,
  ) -> Array:
    """Attention of q [b, q, h, d] over k, v [b, k, kv heads, d] ->
    [b, q, e]. bias and mask (True = may attend) broadcast to [b, h, q, k].
    """
    b, length, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, length, kv_heads, heads // kv_heads, d)
    scores = jnp.float32 if self.float32_logits else self.dtype
    logits = jnp.einsum(
      'bqngd,bknd->bngqk', q, k, preferred_element_type=scores
    )  # [b, kv heads, group, q, k]
    if self.scale_logits:
      logits = logits * jnp.asarray(d**-0.5, scores)
    if bias is not None:
      logits = logits + _by_group(bias, kv_heads).astype(scores)
    if mask is not None:
      logits = jnp.where(_by_group(mask, kv_heads), logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = self.dropout(weights, deterministic=deterministic)
    context = jnp.einsum(
      'bngqk,bknd->bqngd',
      weights,
      v.astype(self.dtype),
      preferred_element_type=jnp.float32,
    ).reshape(b, length, heads, d)
    return dense('bqhd,hde->bqe', context, self.out, self.dtype)

  def __call__(
    self,
    x_q: Array,
    x_kv: Array,
    *,
    bias: Optional[Array],
    mask: Optional[Array],
    deterministic: bool,
  ) -> Array:
    k, v = self.project_kv(x_kv)
    return self.attend(
      self.project_q(x_q),
      k,
      v,
      bias=bias,
      mask=mask,
      deterministic=deterministic,
    )


def _by_group(x: Array, kv_heads: int) -> Array:
  """A per-head array [b|1, h|1, q, k] -> [b|1, kv heads|1, group|1, q, k],
  the query heads split into the groups that share a key/value head."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


# The gate activations of the families' MLPs.
ACTIVATIONS = {
  'gelu': lambda x: jax.nn.gelu(x, approximate=True),  # T5 1.1's
  'silu': jax.nn.silu,  # Llama's SwiGLU
}


class GatedMLP(nn.Module):
  """Gated feed-forward: activation(x W_gate) * (x W_up) -> W_down.

  `names` are the three kernels' parameter names, each family's own
  (T5 1.1's wi_0, wi_1, wo; Llama's gate, up, down), so that checkpoints
  and the HF mappings read the same trees.
  """

  embed_dim: int
  mlp_dim: int
  activation: str = 'gelu'
  names: tuple[str, str, str] = ('wi_0', 'wi_1', 'wo')
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    gate_name, up_name, down_name = self.names
    in_shape, in_axes = (self.embed_dim, self.mlp_dim), ('embed', 'mlp')
    gate = self.param(gate_name, _init(_fan_in_normal(), in_axes), in_shape)
    up = self.param(up_name, _init(_fan_in_normal(), in_axes), in_shape)
    down = self.param(
      down_name,
      _init(_fan_in_normal(), ('mlp', 'embed')),
      (self.mlp_dim, self.embed_dim),
    )
    activation = ACTIVATIONS[self.activation]
    hidden = activation(dense('bqe,ef->bqf', x, gate, self.dtype)) * dense(
      'bqe,ef->bqf', x, up, self.dtype
    )
    hidden = constrain(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return dense('bqf,fe->bqe', hidden, down, self.dtype)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; T5 1.1 unscaled, std 1 init."""

  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    table = self.param(
      'embedding',
      _init(nn.initializers.normal(1.0), ('vocab', 'embed')),
      (self.vocab_size, self.embed_dim),
      jnp.float32,
    )
    return jnp.take(table, tokens, axis=0).astype(self.dtype)
