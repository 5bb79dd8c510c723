"""Logical axis names and the rules that map them onto a device mesh.

One vocabulary names every parameter axis (layers.py) and activation axis:
  batch, length, embed, heads, kv, mlp, vocab, relpos, layers.
The mesh has the axes ('data', 'model'). As in t5x's standard rules, the
batch is split over 'data', and heads, MLP hidden units and the vocabulary
over 'model' (model parallelism); every other axis is replicated. With
`parameter_partitioning_dims=2` (t5x's name), 'embed' goes over 'data' as
well: parameters and optimizer state split in two dimensions (FSDP-like,
gathered per layer by the partitioner), while activations, whose 'batch'
already holds 'data', stay split by the batch alone (a mesh axis goes to
the first logical axis whose rule names it).

Training runs as one program over the mesh (jit with in/out shardings, the
automatic partitioner inserts the collectives). The early-exit decode runs
per 'data' shard (`per_data_shard`), so that each shard's rows decide its own
exits and loop length. No TensorFlow, no gin.
"""

import contextlib
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from calm_jax import arguments
from calm_jax import errors

MESH_AXES = ('data', 'model')
AXES = (
  'batch',
  'length',
  'embed',
  'heads',
  'kv',
  'mlp',
  'vocab',
  'relpos',
  'layers',
)
Rules = tuple[tuple[str, Optional[str]], ...]
RULES: Rules = (
  ('batch', 'data'),
  ('heads', 'model'),
  ('mlp', 'model'),
  ('vocab', 'model'),
  ('length', None),
  ('embed', None),
  ('kv', None),
  ('relpos', None),
  ('layers', None),
)


def rules_for(parameter_partitioning_dims: int = 1) -> Rules:
  """RULES (1: parameters split over 'model' only) or the 2D rules (2:
  'embed' over 'data' too)."""
  arguments.check(parameter_partitioning_dims=parameter_partitioning_dims)
  if parameter_partitioning_dims == 1:
    return RULES
  return tuple(
    ('embed', 'data') if name == 'embed' else (name, axis)
    for name, axis in RULES
  )


def make_mesh(
  shape: Optional[Sequence[int]] = None, devices: Optional[Sequence[Any]] = None
) -> Mesh:
  """A ('data', 'model') mesh; by default every device on 'data'."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(shape or (len(devices), 1))
  if len(shape) != len(MESH_AXES) or int(np.prod(shape)) != len(devices):
    raise errors.SettingError(
      f'mesh shape {shape} does not hold {len(devices)} '
      f'devices as (data, model)'
    )
  return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def logical_to_mesh(spec: PartitionSpec, rules: Rules = RULES) -> PartitionSpec:
  """Logical axis names -> mesh axis names under `rules`."""
  return nn.logical_to_mesh_axes(tuple(spec), rules)


def param_shardings(param_axes: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs (the output of
  `CalmModel.param_axes()`)."""
  return jax.tree_util.tree_map(
    lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)),
    param_axes,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def check_params_split(params: Any, shardings: Any) -> None:
  """Refuses, naming the first parameter, a tree whose sharded dimensions
  do not divide by their mesh axes (jit would fail later, deep in a
  trace, on the first such array)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), sharding in zip(flat, jax.tree_util.tree_leaves(shardings)):
    for dim, axis in zip(leaf.shape, sharding.spec):
      size = sharding.mesh.shape[axis] if isinstance(axis, str) else 1
      if dim % size:
        name = '/'.join(_path_key(path))
        raise errors.SettingError(
          f'parameter {name} {tuple(leaf.shape)}: dimension {dim} does not '
          f"split over the mesh's {size} {axis!r} shards"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, ...] arrays split over 'data'."""
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (the same in every process) -> arrays replicated on every
  device of the mesh, across processes too."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree_util.tree_map(put, tree)


def activation_rules(mesh: Mesh, rules: Rules = RULES):
  """Context in which the layers' `nn.with_logical_constraint` calls on
  activations take effect (outside it they are no-ops): trace sharded
  functions inside it."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (restore and init targets)."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    abstract,
    shardings,
  )


def _path_key(path) -> tuple[str, ...]:
  return tuple(
    str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
    for k in path
  )


def shardings_like_params(
  tree: Any, params: Any, params_shardings: Any, mesh: Mesh
) -> Any:
  """Shardings for a tree whose leaves mirror parameters (optimizer state).

  A leaf whose key path ends with a parameter's path and has that parameter's
  shape (Adam's moments, Adafactor's unfactored second moment) is sharded
  like the parameter; anything else (step counts, Adafactor's factored
  row/column statistics) is small and replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_flatten_with_path(params)[0],
    jax.tree_util.tree_leaves(params_shardings),
  ):
    by_path[_path_key(path)] = (leaf.shape, sharding)

  def pick(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      shape, sharding = by_path.get(key[start:], (None, None))
      if shape is not None and shape == leaf.shape:
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def check_batch_fits(global_batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape['data']
  if global_batch_size % data:
    raise errors.SettingError(
      f'batch size {global_batch_size} does not split over '
      f"the mesh's {data} 'data' shards; use a multiple of "
      f'{data}'
    )


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """This process's rows of a batch -> global arrays split over 'data'.

  With one process the local batch is the whole batch; with several, the
  global batch is the processes' local batches in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    local_batch,
  )


def per_data_shard(
  fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any
) -> Callable:
  """`fn` run independently on each 'data' shard of the batch (shard_map
  over 'data'; 'model' stays under the automatic partitioner).

  For the early-exit loop this matters: each shard picks its own row
  buckets and ends its own position loop, instead of one program deciding
  for the global batch.
  """
  return jax.jit(
    jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=in_specs,
      out_specs=out_specs,
      axis_names={'data'},
      check_vma=False,
    )
  )
