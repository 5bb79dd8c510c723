"""The exits' cross-entropy with no logits in memory: the output layer and
the loss fused in TPU kernels (Pallas) that keep vocabulary blocks on chip.

CALM trains every exit, and each exit's head writes [tokens, vocab] float32
logits to HBM, reads them back for the log-sum-exp, and does the same again
for their gradient. The kernels here compute, block by block of tokens and
vocabulary, only what the loss needs of the logits:
  forward   per token: log-sum-exp, the target's logit, the argmax;
  backward  d states = dlogits @ W^T and d W = states^T @ dlogits, with
            dlogits = softmax * a - onehot(target) * c recomputed per block.
So the program's traffic is the states and the output layer, read once per
block of the other operand, instead of several passes over [tokens, vocab].

`token_losses` is the entry point: every exit's states in one call, under a
custom VJP whose residuals are the states and one float per token (the
log-sum-exp). On a mesh the vocabulary stays split as the rules split it:
each device runs the kernels on its slice of the output layer, and the
partial log-sum-exps, target logits, argmaxes and gradients are combined with
explicit collectives (shard_map), the same sums the automatic partitioner
inserts for the unfused head.

The kernels compile for TPU. Elsewhere they run in Pallas's interpreter
(tests check them against the unfused loss on the CPU this way); a CPU job
keeps the unfused loss (`use_fused`).

Einsum letters: n tokens (exits x batch x length, flattened), e embed,
v vocabulary (this device's slice).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from calm_jax import arguments

Array = jax.Array

# What a kernel's blocks may take of the on-chip memory (VMEM). TPU
# compilers grant a kernel 16 MiB by default on v5e (32 on v6e); inputs and
# outputs are double-buffered, so the block sizes are chosen to stay well
# under the default.
VMEM_BUDGET_BYTES = 12 * 2**20


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Block sizes of one kernel: `tokens` rows of states and `vocab` columns
  of the output layer, both multiples of 128 (the TPU's lane width: tokens
  lie along lanes in the logits blocks and the per-token vectors)."""

  tokens: int
  vocab: int


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _vmem_bytes(tokens, vocab, embed, itemsize, out_block_elements) -> int:
  """On-chip bytes a kernel's step holds: double-buffered input blocks and
  output block, and about three float32 [vocab, tokens] temporaries."""
  inputs = 2 * (tokens * embed + embed * vocab) * itemsize
  return inputs + 2 * out_block_elements * 4 + 3 * tokens * vocab * 4


def choose_blocks(num_tokens: int, vocab: int, embed: int, itemsize: int):
  """Block sizes of the forward, d-states and d-kernel kernels, each within
  `VMEM_BUDGET_BYTES`.

  The forward and d-states kernels sweep the vocabulary for each block of
  tokens, so the output layer is read once per token block: their token
  block is as large as fits. The d-kernel kernel sweeps the tokens for each
  vocabulary block, reading the states once per vocabulary block: its
  vocabulary block is as large as fits."""
  tokens_cap = _round_up(num_tokens, 128)
  vocab_cap = _round_up(vocab, 128)
  sizes = (2048, 1024, 512, 256, 128)

  def largest(make, out_elements):
    for size in sizes:
      blocks = make(size)
      needed = _vmem_bytes(
        blocks.tokens, blocks.vocab, embed, itemsize, out_elements(blocks)
      )
      if needed <= VMEM_BUDGET_BYTES:
        return blocks
    return Blocks(128, 128)

  by_tokens = lambda t: Blocks(min(t, tokens_cap), min(256, vocab_cap))
  by_vocab = lambda v: Blocks(min(256, tokens_cap), min(v, vocab_cap))
  forward_blocks = largest(by_tokens, lambda b: 5 * b.tokens)
  dstates_blocks = largest(by_tokens, lambda b: b.tokens * embed)
  dkernel_blocks = largest(by_vocab, lambda b: embed * b.vocab)
  return forward_blocks, dstates_blocks, dkernel_blocks


# The kernels hold logits blocks transposed, [tv, tm] (vocabulary along
# sublanes, tokens along lanes), so that every per-token vector is a
# lane-dense [1, tm] row: in HBM a [n] vector stored [n, 1] would take a
# 128-lane tile per token.


def _block_logits(h_ref, w_ref, vocab_size, block_index):
  """One block's float32 logits [tv, tm] (= (h @ w)^T) with the padding
  vocabulary at -inf, and the block's vocabulary ids [tv, tm] (float32:
  exact below 2**24)."""
  # [e, tv] x [tm, e] -> [tv, tm]
  s = jax.lax.dot_general(
    w_ref[...],
    h_ref[...],
    (((0,), (1,)), ((), ())),
    preferred_element_type=jnp.float32,
  )
  ids = (
    jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) + block_index * s.shape[0]
  )
  ids = ids.astype(jnp.float32)
  return jnp.where(ids < vocab_size, s, -jnp.inf), ids


def _forward_kernel(
  vocab_size,
  h_ref,  # [tm, e]
  w_ref,  # [e, tv]
  t_ref,  # [1, tm] float32 target id on this device's slice (-1: elsewhere)
  lse_ref,  # [1, tm] outputs, written at the last vocabulary block
  target_ref,
  best_ref,
  best_id_ref,
  m_sc,  # [1, tm] running max, sum of exp, target logit, best value and id
  l_sc,
  t_sc,
  bv_sc,
  bi_sc,
):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    t_sc[...] = jnp.zeros_like(t_sc)
    bv_sc[...] = jnp.full_like(bv_sc, -jnp.inf)
    bi_sc[...] = jnp.zeros_like(bi_sc)

  s, ids = _block_logits(h_ref, w_ref, vocab_size, j)
  block_max = jnp.max(s, axis=0, keepdims=True)
  m_new = jnp.maximum(m_sc[...], block_max)
  l_sc[...] = l_sc[...] * jnp.exp(m_sc[...] - m_new) + jnp.sum(
    jnp.exp(s - m_new), axis=0, keepdims=True
  )
  m_sc[...] = m_new
  t_sc[...] += jnp.sum(
    jnp.where(ids == t_ref[...], s, 0.0), axis=0, keepdims=True
  )
  # argmax's first index: the lowest id at the block's max, and a later
  # block replaces the best only if strictly greater.
  block_id = jnp.min(
    jnp.where(s == block_max, ids, jnp.inf), axis=0, keepdims=True
  )
  better = block_max > bv_sc[...]
  bi_sc[...] = jnp.where(better, block_id, bi_sc[...])
  bv_sc[...] = jnp.where(better, block_max, bv_sc[...])

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])
    target_ref[...] = t_sc[...]
    best_ref[...] = bv_sc[...]
    best_id_ref[...] = bi_sc[...]


def _dlogits(s, ids, t_ref, lse_ref, a_ref, c_ref, dtype):
  """(softmax * a - onehot(target) * c)^T for one block [tv, tm], in the
  matmul dtype (the padding vocabulary's softmax is exp(-inf) = 0)."""
  d = jnp.exp(s - lse_ref[...]) * a_ref[...]
  d = d - jnp.where(ids == t_ref[...], c_ref[...], 0.0)
  return d.astype(dtype)


def _gradient_kernel(
  vocab_size, wrt, h_ref, w_ref, t_ref, lse_ref, a_ref, c_ref, o_ref
):
  """One block's share of d states ('states': grid (tokens, vocabulary))
  or d kernel ('kernel': grid (vocabulary, tokens)), summed over the grid's
  inner axis in the output block."""
  vocab_axis = 1 if wrt == 'states' else 0

  @pl.when(pl.program_id(1) == 0)
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  s, ids = _block_logits(h_ref, w_ref, vocab_size, pl.program_id(vocab_axis))
  d = _dlogits(s, ids, t_ref, lse_ref, a_ref, c_ref, h_ref.dtype)
  if wrt == 'states':  # [tv, tm] x [e, tv] -> [tm, e]
    lhs, rhs = d, w_ref[...]
  else:  # [tm, e] x [tv, tm] -> [e, tv]
    lhs, rhs = h_ref[...], d
  o_ref[...] += jax.lax.dot_general(
    lhs, rhs, (((0,), (1,)), ((), ())), preferred_element_type=jnp.float32
  )


def _call(
  kernel,
  grid,
  in_specs,
  out_specs,
  out_shape,
  scratch,
  semantics,
  cost,
  interpret,
):
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
    cost_estimate=cost,
    interpret=interpret,
  )


def _cost(n, e, v, matmuls, itemsize, reads, writes) -> pl.CostEstimate:
  """What a kernel declares to XLA's cost analysis (which cannot see into
  it): its matmul FLOPs, one exp per logit, and the HBM bytes its block
  schedule moves (an operand whose block index does not change between grid
  steps is fetched once; `reads` in elements of the matmul dtype, `writes`
  and per-token vectors in float32 bytes)."""
  return pl.CostEstimate(
    flops=int(2 * n * e * v * matmuls),
    transcendentals=int(n * v),
    bytes_accessed=int(reads * itemsize + writes),
  )


@functools.partial(
  jax.jit, static_argnames=('vocab_size', 'blocks', 'interpret')
)
def forward(h, w, targets, *, vocab_size, blocks, interpret=False):
  """Per token of padded h [n, e] against padded w [e, v]: log-sum-exp,
  target logit (0 when the target is not in this slice), best logit and its
  id, each [1, n] float32. `targets` [1, n] float32 ids on this slice."""
  n, e = h.shape
  v = w.shape[1]
  tm, tv = blocks.tokens, blocks.vocab
  vector = pl.BlockSpec((1, tm), lambda i, j: (0, i))
  vec = jax.ShapeDtypeStruct((1, n), jnp.float32)
  reads = n * e + (n // tm) * e * v
  return _call(
    functools.partial(_forward_kernel, vocab_size),
    (n // tm, v // tv),
    [
      pl.BlockSpec((tm, e), lambda i, j: (i, 0)),
      pl.BlockSpec((e, tv), lambda i, j: (0, j)),
      vector,
    ],
    [vector] * 4,
    [vec] * 4,
    [pltpu.VMEM((1, tm), jnp.float32)] * 5,
    ('parallel', 'arbitrary'),
    _cost(n, e, v, 1, h.dtype.itemsize, reads, 5 * n * 4),
    interpret,
  )(h, w, targets)


@functools.partial(
  jax.jit, static_argnames=('vocab_size', 'blocks', 'interpret')
)
def backward(h, w, targets, lse, a, c, *, vocab_size, blocks, interpret=False):
  """d h [n, e] and d w [e, v] (float32) for dlogits = softmax * a -
  onehot * c, each per-token vector [1, n]; `blocks` the d-states and
  d-kernel kernels' (`choose_blocks`)."""
  n, e = h.shape
  v = w.shape[1]
  itemsize = h.dtype.itemsize
  by_tokens, by_vocab = blocks
  tm, tv = by_tokens.tokens, by_tokens.vocab
  vector = pl.BlockSpec((1, tm), lambda i, j: (0, i))
  dh = _call(
    functools.partial(_gradient_kernel, vocab_size, 'states'),
    (n // tm, v // tv),
    [
      pl.BlockSpec((tm, e), lambda i, j: (i, 0)),
      pl.BlockSpec((e, tv), lambda i, j: (0, j)),
      *[vector] * 4,
    ],
    pl.BlockSpec((tm, e), lambda i, j: (i, 0)),
    jax.ShapeDtypeStruct((n, e), jnp.float32),
    [],
    ('parallel', 'arbitrary'),
    _cost(
      n, e, v, 2, itemsize, n * e + (n // tm) * e * v, 4 * n * 4 + 4 * n * e
    ),
    interpret,
  )(h, w, targets, lse, a, c)
  tm, tv = by_vocab.tokens, by_vocab.vocab
  vector = pl.BlockSpec((1, tm), lambda j, i: (0, i))
  dw = _call(
    functools.partial(_gradient_kernel, vocab_size, 'kernel'),
    (v // tv, n // tm),
    [
      pl.BlockSpec((tm, e), lambda j, i: (i, 0)),
      pl.BlockSpec((e, tv), lambda j, i: (0, j)),
      *[vector] * 4,
    ],
    pl.BlockSpec((e, tv), lambda j, i: (0, j)),
    jax.ShapeDtypeStruct((e, v), jnp.float32),
    [],
    ('parallel', 'arbitrary'),
    _cost(
      n,
      e,
      v,
      2,
      itemsize,
      (v // tv) * n * e + e * v,
      (v // tv) * 4 * n * 4 + 4 * e * v,
    ),
    interpret,
  )(h, w, targets, lse, a, c)
  return dh, dw


# Where the exits' states and the output layer live, and which mode runs.


@dataclasses.dataclass(frozen=True)
class Layout:
  """The mesh axes that split the tokens' batch and the vocabulary (None:
  not split), as the activation rules in force at trace time map them."""

  batch: str | None = None
  vocab: str | None = None


def _first_rule(rules, logical: str) -> str | None:
  for name, mesh_axis in rules:
    if name == logical:
      return mesh_axis if isinstance(mesh_axis, str) else None
  return None


def current_layout() -> Layout:
  """The layout under `partitioning.activation_rules` (a mesh and logical
  rules), or an unsplit one outside it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return Layout()
  rules = nn.get_logical_axis_rules()
  names = set(mesh.axis_names)
  axes = [_first_rule(rules, a) for a in ('batch', 'vocab')]
  return Layout(*[a if a in names else None for a in axes])


def target_platform() -> str:
  """The platform being compiled for: the mesh's at trace time (the TPU
  planner traces for a TPU topology on a CPU host), else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


EXIT_LOSS_MODES = arguments.EXIT_LOSSES  # 'auto', 'fused', 'streamed'

# 'auto' fuses up to this embedding. Above it the blocks that fit
# `VMEM_BUDGET_BYTES` shrink to 128-256 tokens or vocabulary ids, and the
# kernels re-read the output layer and the states as often as the streamed
# head moves its logits. Measured with the TPU compiler (v5e, bf16, 4 exits
# of 8 x 128 tokens per device, vocabulary over 2 devices), fused against
# streamed HBM bytes: embed 1024, vocab 32128: 1.04 against 2.37 GB; 2048,
# 128256: 10.1 against 15.9 GB; 4096, 128256: 30.7 against 29.8 GB.
FUSED_AUTO_MAX_EMBED = 2048


def use_fused(mode: str, platform: str | None = None, embed: int = 0) -> bool:
  """'fused': these kernels (interpreted off TPU, for tests); 'streamed':
  the unfused head in a rematerialised scan; 'auto': fused on TPU (the
  `platform` compiled for; default: `target_platform()`) for an `embed` up
  to `FUSED_AUTO_MAX_EMBED`."""
  if mode not in EXIT_LOSS_MODES:
    raise ValueError(
      f'unknown exit_loss {mode!r}; valid: {", ".join(EXIT_LOSS_MODES)}'
    )
  if mode != 'auto':
    return mode == 'fused'
  platform = platform or target_platform()
  return platform == 'tpu' and embed <= FUSED_AUTO_MAX_EMBED


# One device's slice: padding, the kernels, the cross-device combination.


def _padded(x: Array, axis: int, multiple: int) -> Array:
  pad = _round_up(x.shape[axis], multiple) - x.shape[axis]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _plan(n: int, e: int, v: int, itemsize: int):
  """Blocks and the padded sizes every kernel's grid divides."""
  blocks = choose_blocks(n, v, e, itemsize)
  rows = int(np.lcm.reduce([b.tokens for b in blocks]))
  cols = int(np.lcm.reduce([b.vocab for b in blocks]))
  return blocks, rows, cols


def _local_targets(
  targets: Array, v: int, layout: Layout
) -> tuple[Array, Array]:
  """Target ids as this vocabulary slice numbers them (-1 when the target
  is on another device's slice), float32 [1, n]; and the slice's first id."""
  offset = jax.lax.axis_index(layout.vocab) * v if layout.vocab else 0
  local = targets - offset
  local = jnp.where((local >= 0) & (local < v), local, -1)
  return local.astype(jnp.float32)[None, :], offset


@dataclasses.dataclass(frozen=True)
class _Operands:
  """One device's operands padded to the kernels' grids: h [rows, e], w
  [e, cols], local target ids [1, rows]; and what unpads them."""

  h: Array
  w: Array
  local: Array
  ids: Array  # [n] global target ids of the flattened tokens
  offset: Array | int  # this vocabulary slice's first id
  blocks: tuple[Blocks, Blocks, Blocks]
  rows: int
  vocab: int  # this slice's real vocabulary


def _operands(states, kernel, targets, layout) -> _Operands:
  x, b, l, e = states.shape
  n, v = x * b * l, kernel.shape[1]
  blocks, rows, cols = _plan(n, e, v, states.dtype.itemsize)
  ids = jnp.broadcast_to(targets, (x, b, l)).reshape(n)
  local, offset = _local_targets(ids, v, layout)
  return _Operands(
    h=_padded(states.reshape(n, e), 0, rows),
    w=_padded(kernel, 1, cols),
    local=_padded(local, 1, rows),
    ids=ids,
    offset=offset,
    blocks=blocks,
    rows=rows,
    vocab=v,
  )


def _shard_forward(states, kernel, targets, *, layout, interpret):
  """-> (log-sum-exp, target logit, argmax) [x, b, l] of this device's
  tokens over the whole vocabulary."""
  ops = _operands(states, kernel, targets, layout)
  n = ops.ids.shape[0]
  outputs = forward(
    ops.h,
    ops.w,
    ops.local,
    vocab_size=ops.vocab,
    blocks=ops.blocks[0],
    interpret=interpret,
  )
  lse, target, best, best_id = (t[0, :n] for t in outputs)
  best_id = best_id + ops.offset
  if layout.vocab:
    top = jax.lax.stop_gradient(jax.lax.pmax(lse, layout.vocab))
    lse = top + jnp.log(jax.lax.psum(jnp.exp(lse - top), layout.vocab))
    target = jax.lax.psum(target, layout.vocab)
    overall = jax.lax.pmax(best, layout.vocab)
    candidate = jnp.where(best == overall, best_id, jnp.inf)
    best_id = jax.lax.pmin(candidate, layout.vocab)
  correct = (best_id == ops.ids.astype(jnp.float32)).astype(jnp.float32)
  return tuple(t.reshape(states.shape[:3]) for t in (lse, target, correct))


def _shard_backward(states, kernel, targets, lse, a, c, *, layout, interpret):
  """d states [x, b, l, e] and d kernel [e, v] for dlogits = softmax * a -
  onehot * c, summed over the devices that share them."""
  ops = _operands(states, kernel, targets, layout)
  n = ops.ids.shape[0]
  per_token = [_padded(t.reshape(1, n), 1, ops.rows) for t in (lse, a, c)]
  dh, dw = backward(
    ops.h,
    ops.w,
    ops.local,
    *per_token,
    vocab_size=ops.vocab,
    blocks=ops.blocks[1:],
    interpret=interpret,
  )
  dh, dw = dh[:n], dw[:, : ops.vocab]
  if layout.vocab:  # each device saw part of every token's vocabulary
    dh = jax.lax.psum(dh, layout.vocab)
  if layout.batch:  # and part of the tokens for its vocabulary slice
    dw = jax.lax.psum(dw, layout.batch)
  return dh.reshape(states.shape).astype(states.dtype), dw.astype(kernel.dtype)


def _on_mesh(fn, layout: Layout, in_specs, out_specs):
  if not (layout.batch or layout.vocab):
    return fn
  return jax.shard_map(
    fn,
    mesh=jax.sharding.get_abstract_mesh(),
    in_specs=in_specs,
    out_specs=out_specs,
    check_vma=False,
  )


def _specs(layout: Layout):
  states = P(None, layout.batch, None, None)
  kernel = P(None, layout.vocab)
  targets = P(layout.batch, None)
  token = P(None, layout.batch, None)
  return states, kernel, targets, token


def _sharded_forward(states, kernel, targets, layout, interpret):
  s, k, t, token = _specs(layout)
  fn = functools.partial(_shard_forward, layout=layout, interpret=interpret)
  return _on_mesh(fn, layout, (s, k, t), (token,) * 3)(states, kernel, targets)


def _sharded_backward(states, kernel, targets, lse, a, c, layout, interpret):
  s, k, t, token = _specs(layout)
  fn = functools.partial(_shard_backward, layout=layout, interpret=interpret)
  in_specs = (s, k, t, token, token, token)
  return _on_mesh(fn, layout, in_specs, (s, k))(
    states, kernel, targets, lse, a, c
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_losses(states, kernel, targets, z_loss, layout, interpret):
  return _token_losses_fwd(states, kernel, targets, z_loss, layout, interpret)[
    0
  ]


def _token_losses_fwd(states, kernel, targets, z_loss, layout, interpret):
  lse, target, correct = _sharded_forward(
    states, kernel, targets, layout, interpret
  )
  outputs = (lse - target, z_loss * jnp.square(lse), correct)
  return outputs, (states, kernel, targets, lse)


def _token_losses_bwd(z_loss, layout, interpret, residuals, cotangents):
  states, kernel, targets, lse = residuals
  g_ce, g_z, _ = cotangents
  # d ce / d logits = softmax - onehot; d z / d logits = 2 z_loss lse softmax
  a = g_ce + 2.0 * z_loss * lse * g_z
  dstates, dkernel = _sharded_backward(
    states, kernel, targets, lse, a, g_ce, layout, interpret
  )
  return dstates, dkernel, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def token_losses(
  states: Array, kernel: Array, targets: Array, z_loss: float
) -> tuple[Array, Array, Array]:
  """Cross-entropy, z-loss and correct-argmax [x, b, l] of the logits
  `states @ kernel` (states [x, b, l, e] after the head's norm, kernel
  [e, v], both in the matmul dtype; targets [b, l]) without forming them:
  what `models.exit_sums` computes from float32 logits, before the mask.
  Differentiable in states and kernel."""
  interpret = target_platform() != 'tpu'
  return _token_losses(
    states, kernel, targets, float(z_loss), current_layout(), interpret
  )
