"""Sharded training, checkpointing and decoding on 8 simulated CPU devices.

Run by tests/test_scale_out.py in a subprocess (the device count is fixed
when JAX starts): XLA_FLAGS=--xla_force_host_platform_device_count=8.
Prints one JSON line of measurements; the tests assert on them.
"""

import dataclasses
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.model import fused_loss
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning
from calm_jax.storage import checkpoints
from calm_jax.training import optim
from calm_jax.training import trainer

MESHES = ((8, 1), (4, 2), (2, 4))
STEPS = 3
CONFIG = network.T5Config(
  vocab_size=256,
  emb_dim=32,
  num_heads=4,
  head_dim=8,
  mlp_dim=64,
  num_encoder_layers=2,
  num_decoder_layers=4,
)


def batches_from(start):
  """Deterministic [8, ...] batches; the same stream for every mesh."""
  rng = np.random.default_rng(start)
  while True:
    targets = rng.integers(2, CONFIG.vocab_size, (8, 6)).astype(np.int32)
    yield {
      'encoder_input_tokens': rng.integers(
        2, CONFIG.vocab_size, (8, 10)
      ).astype(np.int32),
      'decoder_target_tokens': targets,
      'decoder_input_tokens': np.concatenate(
        [np.zeros((8, 1), np.int32), targets[:, :-1]], 1
      ),
      'decoder_loss_weights': np.ones((8, 6), np.float32),
    }


class Losses:
  def __init__(self):
    self.values = []

  def write_scalars(self, step, scalars):
    self.values.append(scalars['loss'])


def train(mesh, model_dir, rules=partitioning.RULES):
  losses = Losses()
  state = trainer.train_loop(
    objective=trainer.model_objective(models.CalmModel(CONFIG)),
    optimizer=optim.make_optimizer('adafactor', learning_rate=1e-2),
    model_dir=model_dir,
    batches_from=batches_from,
    num_steps=STEPS,
    log_every=1,
    progress=False,
    writer=losses,
    mesh=mesh,
    rules=rules,
  )
  return state, losses.values


def max_difference(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


def spec(array):
  """The array's PartitionSpec and the shape of one device's shard."""
  return {
    'spec': [None if a is None else str(a) for a in array.sharding.spec],
    'shard_shape': list(array.addressable_shards[0].data.shape),
  }


def training_checks(one_device, meshes):
  """Each mesh with the 1D rules, and (4, 2) with the 2D rules (named
  '(4, 2) 2D'), against one device."""
  reference, reference_losses = train(one_device, tempfile.mkdtemp())
  out = {'reference_losses': reference_losses, 'meshes': {}}
  dirs = {}
  runs = [(str(shape), shape, 1) for shape in meshes] + [
    ('(4, 2) 2D', (4, 2), 2)
  ]
  for name, shape, dims in runs:
    dirs[name] = tempfile.mkdtemp()
    state, losses = train(
      partitioning.make_mesh(shape), dirs[name], partitioning.rules_for(dims)
    )
    attention = state.params['decoder']['layers_0']['self_attention']
    out['meshes'][name] = {
      'losses': losses,
      'params_difference': max_difference(state.params, reference.params),
      'opt_state_difference': max_difference(
        state.opt_state, reference.opt_state
      ),
      'specs': {
        'query': spec(attention['query']),
        'out': spec(attention['out']),
        'wi_0': spec(state.params['encoder']['layers_0']['mlp']['wi_0']),
        'embedding': spec(state.params['token_embedder']['embedding']),
        'norm': spec(state.params['encoder']['encoder_norm']['scale']),
      },
      # Shard shapes of the optimizer state leaves shaped like the query.
      'opt_state_query_shards': sorted(
        {
          str(spec(x)['shard_shape'])
          for x in jax.tree_util.tree_leaves(state.opt_state)
          if x.shape == attention['query'].shape
        }
      ),
    }
  return out, dirs, reference


def restore_checks(dirs, one_device):
  """The (4, 2) run's checkpoint onto (8, 1), onto one device and onto
  (4, 2) with the 2D rules; the 2D run's onto (8, 1) with the 1D rules."""
  out = {}
  model = models.CalmModel(CONFIG)
  for name, source, mesh, dims in (
    ('(8, 1)', '(4, 2)', partitioning.make_mesh((8, 1)), 1),
    ('one device', '(4, 2)', one_device, 1),
    ('(4, 2) 2D', '(4, 2)', partitioning.make_mesh((4, 2)), 2),
    ('2D onto (8, 1)', '(4, 2) 2D', partitioning.make_mesh((8, 1)), 1),
  ):
    saved, _ = model_files.load_params(dirs[source], CONFIG)
    rules = partitioning.rules_for(dims)
    shardings = partitioning.param_shardings(model.param_axes(), mesh, rules)
    params, step = model_files.load_params(
      dirs[source], CONFIG, shardings=shardings
    )
    # The whole train state too, as a resumed run restores it.
    objective = trainer.model_objective(model)
    optimizer = optim.make_optimizer('adafactor', learning_rate=1e-2)
    place = trainer.placement(objective, optimizer, mesh, rules)
    mgr = checkpoints.manager(dirs[source])
    state = trainer.restore_or_init(
      objective, optimizer, mgr, jax.random.PRNGKey(0), place
    )
    mgr.close()
    query = params['decoder']['layers_0']['self_attention']['query']
    out[name] = {
      'step': step,
      'resumed_step': int(state.step),
      'difference': max_difference(params, saved),
      'state_difference': max_difference(state.params, saved),
      'query': spec(query),
      'query_devices': len(query.sharding.device_set),
    }
  return out


def constraint_checks(params):
  """How many activation sharding constraints the loss carries, traced
  with and without the rules (the layers' `constrain` calls)."""
  model = models.CalmModel(CONFIG)
  batch = next(batches_from(0))
  mesh = partitioning.make_mesh((4, 2))
  loss = lambda p, b: model.loss(p, b)[0]
  count = lambda text: text.count('sdy.sharding_constraint')  # Shardy
  plain = jax.jit(loss).lower(params, batch).as_text()
  with partitioning.activation_rules(mesh):
    ruled = jax.jit(loss).lower(params, batch).as_text()
  return {
    'without_rules': count(plain),
    'with_rules': count(ruled),
    # [batch, length, heads, kv]: batch on 'data', heads on 'model'.
    'heads_layout': ruled.count('[{"data"}, {}, {"model"}, {}]'),
    # [batch, length, embed] after each layer.
    'embed_layout': ruled.count('[{"data"}, {}, {}]'),
  }


def decode_checks(params):
  """Early exit on (4, 2) against one device, at a threshold that makes
  the exits differ between tokens."""
  model = models.CalmModel(CONFIG)
  exit_config = loops.ExitConfig.create(4, confidence='softmax')
  tokens = np.random.default_rng(1).integers(2, CONFIG.vocab_size, (16, 12))
  tokens[3, 6:] = 0  # a padded row
  tokens = tokens.astype(np.int32)
  params = jax.device_get(params)
  single = decoder_lib.Decoder(loaded_lib.in_memory(model, params))
  decode = lambda decoder, threshold: decoder.decode(
    modes.EarlyExit(exit_config, threshold), tokens, max_length=10
  )
  # Every token exits at layer 1 at threshold 0; the median of those
  # confidences as the threshold spreads the exits over the layers.
  eager = decode(single, 0.0)
  threshold = float(np.quantile(eager.confidences[eager.exit_layers > 0], 0.5))
  reference = decode(single, threshold)
  mesh = partitioning.make_mesh((4, 2))
  placed = jax.device_put(
    params, partitioning.param_shardings(model.param_axes(), mesh)
  )
  sharded = decoder_lib.Decoder(
    dataclasses.replace(loaded_lib.in_memory(model, placed), mesh=mesh)
  )
  on_mesh = sharded.runner(
    modes.EarlyExit(exit_config, threshold), tokens, max_length=10
  )(tokens)
  out = sharded.fetch(on_mesh)
  exits = reference.exit_layers[reference.exit_layers > 0]
  return {
    'threshold': threshold,
    'distinct_exit_layers': sorted({int(l) for l in exits}),
    'same_tokens': bool(
      np.array_equal(np.asarray(out.tokens), reference.tokens)
    ),
    'same_exit_layers': bool(
      np.array_equal(np.asarray(out.exit_layers), reference.exit_layers)
    ),
    'confidence_difference': float(
      np.nanmax(np.abs(np.asarray(out.confidences) - reference.confidences))
    ),
    'same_top_layer_tokens': bool(
      np.array_equal(
        np.isnan(np.asarray(out.confidences)), np.isnan(reference.confidences)
      )
    ),
    'layer_evals': [int(reference.layer_evals), int(out.layer_evals)],
    'tokens': spec(on_mesh.tokens),
  }


def _decoder_on(model, params, shape):
  """A Decoder of the in-memory model on the first devices of a mesh."""
  mesh = partitioning.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
  placed = jax.device_put(
    params, partitioning.param_shardings(model.param_axes(), mesh)
  )
  return decoder_lib.Decoder(
    dataclasses.replace(loaded_lib.in_memory(model, placed), mesh=mesh)
  )


def exact_checks(params, meshes, samplings=('greedy', 'sampled')):
  """The exact mode (greedy, sampled or both) on each mesh against one
  device: tokens, per-row counts and the evaluation count."""
  model = models.CalmModel(CONFIG)
  tokens = np.random.default_rng(2).integers(2, CONFIG.vocab_size, (8, 12))
  tokens[5, 4:] = 0  # a padded row
  tokens = tokens.astype(np.int32)
  params = jax.device_get(params)
  single = decoder_lib.Decoder(loaded_lib.in_memory(model, params))
  out = {}
  choices = {
    'greedy': loops.Sampling(),
    'sampled': loops.Sampling(temperature=1.0),
  }
  for name, sampling in ((n, choices[n]) for n in samplings):
    exits = loops.ExitConfig.create(4, confidence='softmax', sampling=sampling)
    mode = modes.Speculative(speculative.DraftConfig(exits, gamma=3), 0.5)
    decode = lambda decoder: decoder.decode(mode, tokens, max_length=8, seed=5)
    reference = decode(single)
    for shape in meshes:
      on_mesh = decode(_decoder_on(model, params, shape))
      out[f'{name} {shape}'] = {
        'same_tokens': bool(
          np.array_equal(np.asarray(on_mesh.tokens), reference.tokens)
        ),
        'same_counts': all(
          np.array_equal(np.asarray(on_mesh.extras[k]), reference.extras[k])
          for k in reference.extras
        ),
        'layer_evals': [int(reference.layer_evals), int(on_mesh.layer_evals)],
        'accepted': int(np.sum(reference.extras['accepted'])),
      }
  return out


def fused_loss_checks():
  """The fused exit loss (Pallas's interpreter) with its vocabulary split
  over 'model' and its tokens over 'data', against one device: the largest
  differences of the per-token outputs and of both gradients."""
  rng = np.random.default_rng(3)
  # 300 = not a multiple of the vocabulary block; (8 x 6) tokens per exit.
  states = rng.normal(size=(3, 8, 6, 16)).astype(np.float32)
  kernel = (0.3 * rng.normal(size=(16, 300))).astype(np.float32)
  targets = rng.integers(0, 300, (8, 6)).astype(np.int32)
  # Half the rows' targets are the first exit's argmax (some correct).
  targets[:4] = np.argmax(states[0, :4] @ kernel, axis=-1)
  cotangent = rng.normal(size=(2, 3, 8, 6)).astype(np.float32)

  def run(states, kernel):
    def weighted(states, kernel):
      ce, z, correct = fused_loss.token_losses(states, kernel, targets, 0.01)
      return jnp.sum(cotangent[0] * ce + cotangent[1] * z), (ce, z, correct)

    return jax.jit(jax.grad(weighted, (0, 1), has_aux=True))(states, kernel)

  want = run(states, kernel)
  out = {}
  for shape, dims in (((4, 2), 1), ((2, 4), 1), ((4, 2), 2)):
    mesh = partitioning.make_mesh(shape)
    rules = partitioning.rules_for(dims)
    with partitioning.activation_rules(mesh, rules):
      layout = fused_loss.current_layout()
      got = run(
        jax.device_put(states, NamedSharding(mesh, P(None, 'data'))),
        jax.device_put(
          kernel, NamedSharding(mesh, P('data' if dims == 2 else None, 'model'))
        ),
      )
    out[f'{shape} {dims}D'] = {
      'layout': [layout.batch, layout.vocab],
      'gradients_difference': max_difference(got[0], want[0]),
      'outputs_difference': max_difference(got[1], want[1]),
      'correct': int(np.sum(np.asarray(want[1][2]))),
    }
  return out


def main(argv):
  """argv: the training meshes as DATAxMODEL (default: all of MESHES);
  (4, 2) is always among them (the restore checks start from it)."""
  assert jax.device_count() == 8, jax.device_count()
  meshes = [tuple(int(n) for n in a.split('x')) for a in argv] or MESHES
  assert (4, 2) in meshes, meshes
  one_device = partitioning.make_mesh((1, 1), jax.devices()[:1])
  results, dirs, reference = training_checks(one_device, meshes)
  results['restore'] = restore_checks(dirs, one_device)
  results['decode'] = decode_checks(reference.params)
  # The default run (4x2 alone) checks the greedy exact mode; the slow one
  # every mesh, greedy and sampled.
  if meshes == [(4, 2)]:
    results['exact'] = exact_checks(reference.params, [(4, 2)], ('greedy',))
  else:
    results['exact'] = exact_checks(reference.params, [(2, 1), (1, 2), (4, 2)])
  results['constraints'] = constraint_checks(jax.device_get(reference.params))
  results['fused_loss'] = fused_loss_checks()
  print(json.dumps(results))


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
