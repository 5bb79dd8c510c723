"""The programs a job runs, built over abstract arguments on any mesh.

Nothing here materialises a parameter: shapes come from `jax.eval_shape`,
and every argument is a `jax.ShapeDtypeStruct` carrying its sharding, so a
program lowers and compiles for a mesh of devices that need not exist (a
TPU topology's). Each `Program` is what the job would run:

- train steps (`trainer.step_fn`, as the trainer jits it): the model stage
  and the exit-classifier stage;
- the decode programs of each mode (`decoder.jit_program`, as `Decoder`
  runs them: per 'data' shard, with the encoder or prompt prefill);
- one-position programs (`decoding.one_step`) for per-token costs, since a
  compiled loop's cost analysis counts its body once.
"""

import dataclasses
import math
from typing import Any
from typing import Callable
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from calm_jax.decoding import confidence
from calm_jax.decoding import loops
from calm_jax.decoding import one_step
from calm_jax.decoding import speculative
from calm_jax.inference import decoder
from calm_jax.inference import modes
from calm_jax.model import models as models_lib
from calm_jax.parallel import partitioning
from calm_jax.training import trainer

BATCH_KEYS = (
  'encoder_input_tokens',
  'decoder_input_tokens',
  'decoder_target_tokens',
  'decoder_loss_weights',
)
# What SeqIO's packing feature converter adds.
PACKED_KEYS = (
  'encoder_segment_ids',
  'encoder_positions',
  'decoder_segment_ids',
  'decoder_positions',
)


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function and abstract arguments to compile it for."""

  name: str
  kind: str  # 'train', 'decode' or 'token'
  fn: Callable
  args: tuple
  mesh: Mesh
  # Traced under these logical rules (the layers' activation constraints).
  rules: Optional[partitioning.Rules] = None
  model_flops: Optional[float] = None  # 6 N tokens, for a train step
  cache_dims: Optional[tuple[int, ...]] = None  # a layer's K/V per device
  tokens: int = 0  # positions one call produces (token programs)


def abstract(shape, dtype, mesh: Mesh, spec: P = P()) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, fitted(spec, shape, mesh))
  )


def fitted(spec: P, shape, mesh: Mesh) -> P:
  """`spec` without the mesh axes that do not divide their dimension (that
  dimension is replicated instead: a batch of 1 on 4 'data' shards, 6
  heads over 4 'model' shards)."""
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * len(shape)):
    size = mesh.shape[axis] if isinstance(axis, str) else 1
    out.append(axis if size > 1 and dim % size == 0 else None)
  return P(*out[: len(shape)])


def abstract_params(
  model: Any, mesh: Mesh, rules: partitioning.Rules = partitioning.RULES
) -> Any:
  """The model's parameters as sharded ShapeDtypeStructs (the rules'
  shardings, fitted to the dimensions)."""
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))
  shapes = shapes.get('params', shapes)
  specs = jax.tree_util.tree_map(
    lambda spec: partitioning.logical_to_mesh(spec, rules),
    model.param_axes(),
    is_leaf=lambda x: isinstance(x, P),
  )
  return jax.tree_util.tree_map(
    lambda x, spec: abstract(x.shape, x.dtype, mesh, spec),
    shapes,
    specs,
    is_leaf=lambda x: isinstance(x, P),
  )


def num_params(params: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def train_batch(
  mesh, batch_size, input_length, target_length, pack: bool = False
) -> dict:
  """An encoder-decoder batch's abstract arrays, split over 'data' (`pack`:
  with the packed batch's segment ids and positions)."""
  shape = lambda k: (
    batch_size,
    input_length if k.startswith('encoder') else target_length,
  )
  return {
    k: abstract(
      shape(k),
      jnp.float32 if k.endswith('weights') else jnp.int32,
      mesh,
      P('data'),
    )
    for k in BATCH_KEYS + (PACKED_KEYS if pack else ())
  }


def _rng(mesh) -> jax.ShapeDtypeStruct:
  return abstract((2,), jnp.uint32, mesh)


def train_step(
  model: Any,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  *,
  batch_size: int,
  input_length: int,
  target_length: int,
  rules: partitioning.Rules = partitioning.RULES,
  pack: bool = False,
) -> Program:
  """The stage-1 train step (CALM's loss over every exit), as the trainer
  jits it (state donated, shardings from the rules)."""
  objective = trainer.model_objective(model)
  place = trainer.placement(objective, optimizer, mesh, rules)
  fn = jax.jit(
    trainer.step_fn(objective, optimizer),
    donate_argnums=(0,),
    in_shardings=(place.state, place.batch, place.replicated),
    out_shardings=(place.state, place.replicated),
  )
  params = num_params(place.abstract_state.params)
  tokens = batch_size * _trained_tokens(model, input_length, target_length)
  return Program(
    name='train step (model stage)',
    kind='train',
    fn=fn,
    args=(
      place.abstract_state,
      train_batch(mesh, batch_size, input_length, target_length, pack),
      _rng(mesh),
    ),
    mesh=mesh,
    rules=rules,
    model_flops=6.0 * params * tokens,
  )


def _trained_tokens(model, input_length: int, target_length: int) -> int:
  """Tokens per row each parameter sees once forward: T5's encoder reads
  the inputs and its decoder the targets (6 N (s + t) over-counts the
  encoder's share of N by the decoder's, as t5x's MFU figure does); a
  decoder-only model reads both."""
  return input_length + target_length


def classifier_step(
  model: Any,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  *,
  batch_size: int,
  input_length: int,
  target_length: int,
  rules: partitioning.Rules = partitioning.RULES,
  pack: bool = False,
) -> Program:
  """The stage-2 step: the exit classifier trained over a frozen backbone
  (an argument here, a constant of the trainer's objective)."""
  backbone = abstract_params(model, mesh, rules)
  placeholder = trainer.classifier_objective(model, None)
  place = trainer.placement(placeholder, optimizer, mesh, rules)

  def step(state, backbone, batch, rng):
    objective = trainer.classifier_objective(model, backbone)
    return trainer.step_fn(objective, optimizer)(state, batch, rng)

  backbone_shardings = jax.tree_util.tree_map(lambda x: x.sharding, backbone)
  fn = jax.jit(
    step,
    donate_argnums=(0,),
    in_shardings=(
      place.state,
      backbone_shardings,
      place.batch,
      place.replicated,
    ),
    out_shardings=(place.state, place.replicated),
  )
  return Program(
    name='train step (classifier stage)',
    kind='train',
    fn=fn,
    args=(
      place.abstract_state,
      backbone,
      train_batch(mesh, batch_size, input_length, target_length, pack),
      _rng(mesh),
    ),
    mesh=mesh,
    rules=rules,
  )


def exit_loop_iteration(
  model: Any,
  mesh: Mesh,
  *,
  batch_size: int,
  target_length: int,
  backward: bool = True,
  rules: partitioning.Rules = partitioning.RULES,
) -> Program:
  """One iteration of a train step's loop over the exits, alone: XLA's
  cost analysis counts a loop's body once, so a step's FLOPs and bytes
  need the other iterations added (`plan` does). With `backward`, the
  streamed loss's term of one exit forward and backward (the forward loop's
  body and the backward loop's: recompute, then gradients of the states and
  the head); without, one exit's greedy tokens (the classifier stage's
  labels). Only the parameters the head reads are arguments."""
  params = abstract_params(model, mesh)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  states = abstract(
    (batch_size, target_length, model.config.emb_dim),
    model.config.jnp_dtype,
    mesh,
    P('data'),
  )
  read = _leaves_read(lambda p, h: model.head(p, h), params, states)

  def head_of(used):
    full = [
      used[read.index(i)] if i in read else jnp.zeros(x.shape, x.dtype)
      for i, x in enumerate(leaves)
    ]  # the zeros are never read: the compiler drops them
    return lambda h: model.head(jax.tree_util.tree_unflatten(treedef, full), h)

  if backward:

    def fn(used, h, targets, mask):
      def term(used, h):
        ce, z, _ = models_lib.exit_sums(
          head_of(used)(h), targets, mask, model.z_loss
        )
        return ce + z

      return jax.value_and_grad(jax.checkpoint(term), argnums=(0, 1))(used, h)

  else:

    def fn(used, h, targets, mask):
      del targets, mask
      return jnp.argmax(head_of(used)(h), axis=-1)

  labels = abstract((batch_size, target_length), jnp.int32, mesh, P('data'))
  weights = abstract((batch_size, target_length), jnp.float32, mesh, P('data'))
  return Program(
    name='one exit of the loss' if backward else "one exit's labels",
    kind='loop',
    fn=jax.jit(fn),
    args=([leaves[i] for i in read], states, labels, weights),
    mesh=mesh,
    rules=rules,
  )


def _leaves_read(fn: Callable, params: Any, *args) -> list[int]:
  """Indices of the flattened `params` leaves that fn(params, *args)
  reads (found in its jaxpr)."""
  closed = jax.make_jaxpr(fn)(params, *args)
  count = len(jax.tree_util.tree_leaves(params))
  read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars} | {
    id(v) for v in closed.jaxpr.outvars
  }
  return [i for i, v in enumerate(closed.jaxpr.invars[:count]) if id(v) in read]


def decode_modes(
  model: Any, measures: tuple[str, ...], gamma: int, threshold: float = 0.9
) -> list[modes.Mode]:
  """Full depth, early exit for each measure, and the exact mode (drafted
  by the first measure)."""
  out: list[modes.Mode] = [modes.FullDepth()]
  out += [modes.EarlyExit(model.exit_config(m), threshold) for m in measures]
  draft = speculative.DraftConfig(model.exit_config(measures[0]), gamma=gamma)
  return out + [modes.Speculative(draft, threshold)]


def decode_program(
  model: Any,
  mode: modes.Mode,
  mesh: Mesh,
  *,
  batch_size: int,
  input_length: int,
  max_length: int,
  eos_id: int = 1,
) -> Program:
  """A decode mode's whole program (encoder or prefill, then its loop),
  as `Decoder` runs it on a mesh."""
  fn = decoder.jit_program(model, mode.build(model, max_length, eos_id), mesh)
  classifier = (
    _abstract_classifier(model, mesh) if mode.uses_classifier else None
  )
  args = (
    abstract_params(model, mesh),
    classifier,
    abstract((batch_size, input_length), jnp.int32, mesh, P('data')),
    abstract((), jnp.float32, mesh),
    _rng(mesh),
    abstract((batch_size, 1), jnp.int32, mesh, P('data')),
  )
  return Program(
    name=f'{mode.describe()} (batch {batch_size})',
    kind='decode',
    fn=fn,
    args=args,
    mesh=mesh,
    cache_dims=_cache_dims(model, mesh, batch_size, max_length, mode),
  )


def _cache_dims(model, mesh, batch_size, max_length, mode) -> tuple:
  """One layer's K/V cache as each 'data' shard holds it [b, t, h, d]."""
  cfg = model.config
  heads = getattr(cfg, 'num_kv_heads', cfg.num_heads)
  data = mesh.shape['data']
  rows = batch_size // data if batch_size % data == 0 else batch_size
  length = max_length
  if isinstance(mode, modes.Speculative):
    length += mode.draft.gamma + 1
  return (rows, length, heads, cfg.head_dim)


def _abstract_classifier(model, mesh) -> Any:
  shapes = jax.eval_shape(
    lambda: confidence.init_classifier(model.config.emb_dim)
  )
  return jax.tree_util.tree_map(
    lambda x: abstract(x.shape, x.dtype, mesh), shapes
  )


# --- one position ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenSetting:
  """What the one-position programs share: the decode batch, the encoder
  (or prompt) length, and the cache length."""

  batch_size: int
  input_length: int
  max_length: int


def _token_args(model, mesh, setting: TokenSetting, cache_length: int):
  """Abstract (params, context, cache) of one decode position."""
  params = abstract_params(model, mesh)
  tokens = abstract(
    (setting.batch_size, setting.input_length), jnp.int32, mesh, P('data')
  )
  context_shapes = jax.eval_shape(model.encode_context, params, tokens)
  context = jax.tree_util.tree_map(
    lambda x: abstract(x.shape, x.dtype, mesh, P('data')), context_shapes
  )
  cfg = model.config
  heads = getattr(cfg, 'num_kv_heads', cfg.num_heads)
  layer = abstract(
    (setting.batch_size, cache_length, heads, cfg.head_dim),
    cfg.jnp_dtype,
    mesh,
    P('data'),
  )
  layers = cfg.num_decoder_layers
  cache = loops.KVCache(keys=(layer,) * layers, values=(layer,) * layers)
  return params, context, cache


def exit_token(
  model: Any,
  mesh: Mesh,
  setting: TokenSetting,
  measure: str,
  exit_layer: int,
) -> Program:
  """One position at which every row exits after `exit_layer` under
  `measure` ('full' with the top layer: the static decoder's position)."""
  params, context, cache = _token_args(model, mesh, setting, setting.max_length)
  classifier = (
    _abstract_classifier(model, mesh) if measure == 'classifier' else None
  )

  def position_step(params, classifier, context, cache, tokens, position):
    fns = model.step_fns(params, None, setting.max_length, context)
    if measure == 'full':
      return one_step.full_depth_token(fns, cache, tokens, position)
    cfg = model.exit_config(measure)
    return one_step.token_at_exit(
      fns, cfg, exit_layer, cache, tokens, position, classifier
    )

  rows = abstract((setting.batch_size,), jnp.int32, mesh, P('data'))
  return Program(
    name=f'{measure} token exiting after layer {exit_layer}',
    kind='token',
    fn=jax.jit(position_step, donate_argnums=(3,)),
    args=(
      params,
      classifier,
      context,
      cache,
      rows,
      abstract((), jnp.int32, mesh),
    ),
    mesh=mesh,
    tokens=1,
  )


def verify_pass(
  model: Any, mesh: Mesh, setting: TokenSetting, gamma: int
) -> Program:
  """The exact mode's verify pass: full depth over gamma + 1 positions."""
  length = setting.max_length + gamma + 1
  params, context, cache = _token_args(model, mesh, setting, length)

  def verify(params, context, cache, inputs, start):
    fns = model.step_fns(params, None, setting.max_length, context)
    return speculative.verify_block(fns, cache, inputs, start)

  rows = setting.batch_size
  return Program(
    name=f'verify pass over {gamma + 1} positions',
    kind='token',
    fn=jax.jit(verify, donate_argnums=(2,)),
    args=(
      params,
      context,
      cache,
      abstract((rows, gamma + 1), jnp.int32, mesh, P('data')),
      abstract((rows,), jnp.int32, mesh, P('data')),
    ),
    mesh=mesh,
    tokens=gamma + 1,
  )
