"""partitioning.py on the one device of this process (the 8-device checks
run in a subprocess: tests/test_scale_out.py, tests/mesh_checks.py)."""

import types

import jax
from jax.sharding import PartitionSpec as P
import pytest

from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning


def test_mesh_shape_must_hold_the_devices():
  with pytest.raises(ValueError, match=r'does not hold 1 devices'):
    partitioning.make_mesh((2, 1))
  assert partitioning.make_mesh().shape == {'data': 1, 'model': 1}


def test_rules_map_logical_axes_to_the_mesh():
  assert partitioning.logical_to_mesh(P('batch', 'length', 'embed')) == P(
    'data', None, None
  )
  assert partitioning.logical_to_mesh(P('embed', 'heads', 'kv')) == P(
    None, 'model', None
  )
  assert partitioning.logical_to_mesh(P('vocab', 'embed')) == P('model', None)
  assert partitioning.logical_to_mesh(P('embed', 'mlp')) == P(None, 'model')


def test_every_parameter_has_logical_axes_of_the_vocabulary():
  cfg = network.T5Config(
    vocab_size=64,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_encoder_layers=1,
    num_decoder_layers=2,
  )
  model = models.CalmModel(cfg)
  axes = model.param_axes()
  shapes = jax.eval_shape(
    lambda: model.init_params(jax.random.PRNGKey(0))['params']
  )
  specs = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, P))
  assert len(specs) == len(jax.tree_util.tree_leaves(shapes))
  for spec, shape in zip(specs, jax.tree_util.tree_leaves(shapes)):
    assert len(spec) == len(shape.shape)
    assert set(spec) <= set(partitioning.AXES), spec


def test_2d_rules_put_embed_on_data_unless_the_batch_holds_it():
  rules = partitioning.rules_for(2)
  # Parameters: 'embed' over 'data' beside 'model'.
  assert partitioning.logical_to_mesh(P('embed', 'heads', 'kv'), rules) == P(
    'data', 'model', None
  )
  assert partitioning.logical_to_mesh(P('vocab', 'embed'), rules) == P(
    'model', 'data'
  )
  # Activations: the batch took 'data' first, so 'embed' stays whole.
  assert partitioning.logical_to_mesh(
    P('batch', 'length', 'embed'), rules
  ) == P('data', None, None)
  assert partitioning.rules_for(1) == partitioning.RULES
  with pytest.raises(ValueError, match=r'parameter_partitioning_dims 3'):
    partitioning.rules_for(3)


def test_a_parameter_that_does_not_split_is_named():
  # A sharding of 4 'data' shards (this process has one device).
  sharding = types.SimpleNamespace(
    spec=P('data'), mesh=types.SimpleNamespace(shape={'data': 4})
  )
  params = {'layer': {'query': jax.ShapeDtypeStruct((6, 4), 'float32')}}
  with pytest.raises(
    ValueError,
    match=r'parameter layer/query \(6, 4\): dimension 6 does not split '
    r"over the mesh's 4 'data' shards",
  ):
    partitioning.check_params_split(params, {'layer': {'query': sharding}})
