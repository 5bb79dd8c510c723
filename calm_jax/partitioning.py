"""Logical axis names and the rules that map them onto a device mesh.

One vocabulary names every parameter axis (layers.py) and activation axis:
  batch, length, embed, heads, kv, mlp, vocab, relpos, layers.
The mesh has the axes ('data', 'model'). As in t5x's standard rules, the
batch is split over 'data', and heads, MLP hidden units and the vocabulary
over 'model' (model parallelism); every other axis is replicated.

This is the first piece of scaling out (issue 6): shardings for parameters
and batches. The jobs themselves still run on one device.
No TensorFlow, no gin.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'model')
AXES = ('batch', 'length', 'embed', 'heads', 'kv', 'mlp', 'vocab', 'relpos',
        'layers')
RULES = (('batch', 'data'), ('heads', 'model'), ('mlp', 'model'),
         ('vocab', 'model'), ('length', None), ('embed', None), ('kv', None),
         ('relpos', None), ('layers', None))


def make_mesh(shape: Optional[Sequence[int]] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'model') mesh; by default every device on 'data'."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(shape or (len(devices), 1))
  if len(shape) != len(MESH_AXES) or int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh shape {shape} does not hold {len(devices)} '
                     f'devices as (data, model)')
  return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def logical_to_mesh(spec: PartitionSpec) -> PartitionSpec:
  """Logical axis names -> mesh axis names under RULES."""
  return nn.logical_to_mesh_axes(tuple(spec), RULES)


def param_shardings(param_axes: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs (the output of
  `CalmModel.param_axes()`)."""
  return jax.tree_util.tree_map(
      lambda spec: NamedSharding(mesh, logical_to_mesh(spec)), param_axes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, ...] arrays split over 'data'."""
  return NamedSharding(mesh, PartitionSpec('data'))
