"""The two parameter layouts of a layer stack, and the conversions between.

Unrolled: one subtree per layer, 'layers_0', 'layers_1', ... (the layout
of the HF and GGUF imports and of every model dir written before scans).
Scanned (`scan_layers=True`): one subtree 'layers' whose every leaf has a
leading axis of the stack's depth, logical axis 'layers'.

The layout changes how a program is built, never what it computes, so a
model's identity (its fingerprint) is taken in the unrolled layout and
without the layout field, and a checkpoint of either layout restores into
a run of the other.
"""

import dataclasses
import re
from typing import Any
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

Params = Mapping[str, Any]

STACKED = 'layers'  # the key of a scanned stack
_UNROLLED = re.compile(r'layers_(\d+)$')

# Config fields that pick a layout and not a model.
LAYOUT_FIELDS = ('scan_layers',)


def _layer_keys(tree: Mapping) -> list[str]:
  """The 'layers_i' keys of a dict, in layer order."""
  found = sorted(
    (int(m.group(1)), k) for k in tree if (m := _UNROLLED.match(str(k)))
  )
  if [i for i, _ in found] != list(range(len(found))):
    raise ValueError(f'layer keys are not 0..n-1: {[k for _, k in found]}')
  return [k for _, k in found]


def _sharding(sharding, change):
  """A NamedSharding with its spec changed (None stays None)."""
  if not isinstance(sharding, NamedSharding):
    return None
  return NamedSharding(sharding.mesh, PartitionSpec(*change(sharding.spec)))


def _stack_leaves(*leaves):
  """Each layer's array (or abstract array, its sharding kept) -> the
  stack's."""
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    first = leaves[0]
    return jax.ShapeDtypeStruct(
      (len(leaves),) + first.shape,
      first.dtype,
      sharding=_sharding(first.sharding, lambda spec: (None, *spec)),
    )
  return jnp.stack(leaves)


def stack_layers(params: Params) -> Params:
  """Unrolled -> scanned: every dict's 'layers_0..n-1' become one 'layers'
  whose leaves are the layers' leaves stacked on a new leading axis."""
  if not isinstance(params, Mapping):
    return params
  keys = _layer_keys(params)
  out = {k: stack_layers(v) for k, v in params.items() if k not in set(keys)}
  if keys:
    out[STACKED] = jax.tree_util.tree_map(
      _stack_leaves, *[params[k] for k in keys]
    )
  return out


def _depth(stack: Params) -> int:
  return jax.tree_util.tree_leaves(stack)[0].shape[0]


def _layer_of(stack: Params, index: int) -> Params:
  def take(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(
        leaf.shape[1:],
        leaf.dtype,
        sharding=_sharding(leaf.sharding, lambda spec: spec[1:]),
      )
    return leaf[index]

  return jax.tree_util.tree_map(take, stack)


def unstack_layers(params: Params) -> Params:
  """Scanned -> unrolled: every 'layers' subtree of stacked leaves becomes
  'layers_0', 'layers_1', ..., one per index of the leading axis."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  for k, v in params.items():
    if k == STACKED and isinstance(v, Mapping):
      for i in range(_depth(v)):
        out[f'layers_{i}'] = _layer_of(v, i)
    else:
      out[k] = unstack_layers(v)
  return out


def is_scanned(params: Params) -> bool:
  """Whether any stack of the tree is in the scanned layout."""
  if not isinstance(params, Mapping):
    return False
  return any(
    (k == STACKED and isinstance(v, Mapping)) or is_scanned(v)
    for k, v in params.items()
  )


def to_layout(params: Params, scan_layers: bool) -> Params:
  """params in the layout a config asks for, whichever it is in."""
  if is_scanned(params) == scan_layers:
    return params
  return stack_layers(params) if scan_layers else unstack_layers(params)


def without_layout(config) -> dict:
  """A config's fields as a dict, the layout ones left out: what the model
  is, the same for both layouts."""
  return {
    k: v
    for k, v in dataclasses.asdict(config).items()
    if k not in LAYOUT_FIELDS
  }


def in_stacked_layer(path) -> bool:
  """Whether a key path (jax's) runs through a scanned stack, so that its
  leaf's leading axis indexes layers."""
  return any(getattr(k, 'key', None) == STACKED for k in path)
