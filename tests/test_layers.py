"""layers.py against NumPy references."""

import contextlib
import io
import math
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.model import layers


def _init_apply(module, *args, **kwargs):
  variables = nn.meta.unbox(module.init(jax.random.PRNGKey(0), *args, **kwargs))
  return variables['params'], module.apply(variables, *args, **kwargs)


def _bucket_reference(
  relative_position, bidirectional, num_buckets, max_distance
):
  """T5's bucketing, one integer at a time."""
  n = -relative_position
  offset = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      offset = num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return offset + n
  large = max_exact + int(
    math.log(n / max_exact)
    / math.log(max_distance / max_exact)
    * (num_buckets - max_exact)
  )
  return offset + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_bucket_matches_reference(bidirectional):
  relative = np.arange(-300, 301)
  got = np.asarray(
    layers.relative_position_bucket(
      jnp.asarray(relative),
      bidirectional=bidirectional,
      num_buckets=32,
      max_distance=128,
    )
  )
  want = [_bucket_reference(int(r), bidirectional, 32, 128) for r in relative]
  np.testing.assert_array_equal(got, want)
  assert got.max() == 31 and got.min() == 0


def test_rms_norm_matches_numpy():
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  params, y = _init_apply(layers.RMSNorm(), jnp.asarray(x))
  scale = np.asarray(params['scale'])
  want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_attention_matches_numpy():
  rng = np.random.RandomState(1)
  xq = rng.randn(2, 3, 16).astype(np.float32)
  xkv = rng.randn(2, 5, 16).astype(np.float32)
  bias = rng.randn(1, 4, 3, 5).astype(np.float32)
  mask = rng.rand(2, 1, 3, 5) > 0.3
  module = layers.MultiHeadAttention(embed_dim=16, num_heads=4, head_dim=8)
  params, y = _init_apply(
    module,
    jnp.asarray(xq),
    jnp.asarray(xkv),
    bias=jnp.asarray(bias),
    mask=jnp.asarray(mask),
    deterministic=True,
  )
  p = {k: np.asarray(v) for k, v in params.items()}
  q = np.einsum('bqe,ehd->bqhd', xq, p['query'])
  k = np.einsum('bke,ehd->bkhd', xkv, p['key'])
  v = np.einsum('bke,ehd->bkhd', xkv, p['value'])
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + bias
  logits = np.where(mask, logits, -1e10)
  context = np.einsum('bhqk,bkhd->bqhd', _softmax(logits), v)
  want = np.einsum('bqhd,hde->bqe', context, p['out'])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_gated_mlp_matches_numpy():
  x = np.random.RandomState(2).randn(2, 3, 8).astype(np.float32)
  module = layers.GatedMLP(embed_dim=8, mlp_dim=12)
  params, y = _init_apply(module, jnp.asarray(x), deterministic=True)
  p = {k: np.asarray(v) for k, v in params.items()}
  h0 = x @ p['wi_0']
  gelu = 0.5 * h0 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h0 + 0.044715 * h0**3)))
  want = (gelu * (x @ p['wi_1'])) @ p['wo']
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_relative_position_bias_looks_up_buckets():
  module = layers.RelativePositionBias(num_heads=3, bidirectional=False)
  q, k = jnp.arange(4), jnp.arange(6)
  params, bias = _init_apply(module, q, k)
  assert bias.shape == (1, 3, 4, 6)
  table = np.asarray(params['rel_embedding'])
  for i in range(4):
    for j in range(6):
      bucket = _bucket_reference(j - i, False, 32, 128)
      np.testing.assert_allclose(bias[0, :, i, j], table[:, bucket])


@pytest.mark.parametrize('policy', ['minimal', 'none'])
def test_a_bf16_layer_saves_its_matmul_outputs_in_bf16(policy):
  """What the backward pass keeps of a bfloat16 MLP and attention: every
  projection's output (what 'minimal' saves; 'none' keeps them too) is
  bfloat16, not the float32 of the accumulator. A
  float32 one doubles the memory the remat policy stacks over the layers."""
  b, q, e, f = 2, 3, 8, 40
  mlp = layers.GatedMLP(embed_dim=e, mlp_dim=f, dtype=jnp.bfloat16)
  attention = layers.MultiHeadAttention(
    num_heads=2, head_dim=4, embed_dim=e, dtype=jnp.bfloat16
  )
  x = jnp.ones((b, q, e), jnp.bfloat16)

  def saved(module, call):
    if policy != 'none':
      call = layers.rematerialised(call, policy)

    class Wrapped(nn.Module):
      inner: nn.Module

      @nn.compact
      def __call__(self, x):
        return call(self.inner, x)

    wrapped = Wrapped(module)
    params = nn.meta.unbox(wrapped.init(jax.random.PRNGKey(0), x))['params']
    loss = lambda p, x: wrapped.apply({'params': p}, x).sum()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      jax.ad_checkpoint.print_saved_residuals(loss, params, x)
    # One line per residual: 'bf16[2,3,40] from ...'; the parameters
    # ('from the argument p...') are float32 by design.
    lines = [
      line for line in printed.getvalue().splitlines() if 'argument' not in line
    ]
    shapes = re.findall(r'^(\w+)\[([\d,]*)\]', '\n'.join(lines), re.M)
    residuals = [(d, tuple(map(int, s.split(',')))) for d, s in shapes if s]
    return [(d, s) for d, s in residuals if len(s) >= 3 and s[0] == b]

  mlp_saved = saved(mlp, lambda layer, x: layer(x))
  assert sum(s == (b, q, f) for _, s in mlp_saved) >= 2  # gate and up
  attention_saved = saved(
    attention,
    lambda layer, x: layer(x, x, bias=None, mask=None, deterministic=True),
  )
  assert any(s == (b, q, 2, 4) for _, s in attention_saved)  # q, k or v
  # The projections' outputs (the softmax's own statistics stay float32).
  projections = {(b, q, f), (b, q, e), (b, q, 2, 4)}
  for dtype, shape in mlp_saved + attention_saved:
    if shape in projections:
      assert dtype == 'bf16', (dtype, shape)


def test_attention_scores_in_the_activation_dtype_when_asked():
  """float32_logits=False (t5x's T5 default) computes the scores and their
  softmax in bfloat16: the softmax's exp runs on bf16, not f32, and the
  output stays within bfloat16 rounding of the float32-scores one."""
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 5, 16), jnp.bfloat16)
  bias = jnp.asarray(rng.randn(1, 4, 5, 5), jnp.float32)
  outputs, exps = {}, {}
  for float32_logits in (True, False):
    module = layers.MultiHeadAttention(
      embed_dim=16,
      num_heads=4,
      head_dim=8,
      dtype=jnp.bfloat16,
      float32_logits=float32_logits,
    )
    call = lambda p, x, m=module: m.apply(
      {'params': p}, x, x, bias=bias, mask=None, deterministic=True
    )
    params = nn.meta.unbox(
      module.init(
        jax.random.PRNGKey(0), x, x, bias=bias, mask=None, deterministic=True
      )
    )['params']
    outputs[float32_logits] = np.asarray(call(params, x), np.float32)
    exps[float32_logits] = {
      str(e.outvars[0].aval.dtype)
      for e in jax.make_jaxpr(call)(params, x).jaxpr.eqns
      if e.primitive.name == 'exp'
    }
  assert exps == {True: {'float32'}, False: {'bfloat16'}}
  np.testing.assert_allclose(outputs[False], outputs[True], atol=0.05)
  assert not np.array_equal(outputs[False], outputs[True])
