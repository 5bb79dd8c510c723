"""Scan over layers (`scan_layers`): the same model in the stacked layout.

Each case builds one model's parameters in the unrolled layout, converts
them with `layout.stack_layers`, and checks that the scanned program
computes what the unrolled one does: every layer's logits, the CALM loss
and its gradients, greedy early-exit decodes and exact-mode decodes, for
both families.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file
from test_models import LOSS_BATCH
from test_models import TINY_LLAMA
from test_models import TINY_T5

from calm_jax.decoding import speculative
from calm_jax.inference import loaded
from calm_jax.model import hf_t5
from calm_jax.model import hf_tensors
from calm_jax.model import layout
from calm_jax.model import llama
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.storage import checkpoints
from calm_jax.training import optim

VOCAB = os.path.join(
  os.path.dirname(os.path.dirname(__file__)),
  'tasks',
  'vocab',
  'calm_synth.model',
)
PROMPTS = jnp.array([[4, 5, 6, 7, 1], [8, 9, 1, 0, 0], [10, 11, 12, 1, 0]])


def _pair(family: str, remat_policy: str = 'none'):
  """(unrolled model, scanned model, unrolled params, the same stacked)."""
  if family == 't5':
    config = TINY_T5
    build = lambda c: models.CalmModel(c, remat_policy=remat_policy)
  else:
    config = llama.LlamaConfig(**TINY_LLAMA)
    build = lambda c: llama.CalmLlama(c, remat_policy=remat_policy)
  unrolled = build(config)
  scanned = build(dataclasses.replace(config, scan_layers=True))
  params = unrolled.init_params(jax.random.PRNGKey(0))['params']
  return unrolled, scanned, params, layout.stack_layers(params)


def _close(a, b, tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_scanned_init_stacks_every_layer_on_the_layers_axis(family):
  unrolled, scanned, params, stacked = _pair(family)
  fresh = scanned.init_params(jax.random.PRNGKey(0))['params']
  assert jax.tree_util.tree_structure(fresh) == (
    jax.tree_util.tree_structure(stacked)
  )
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)
  axes = scanned.param_axes()
  leaves = jax.tree_util.tree_leaves_with_path(
    axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  )
  stacked_specs = [s for p, s in leaves if layout.in_stacked_layer(p)]
  assert stacked_specs and all(s[0] == 'layers' for s in stacked_specs)
  # Each layer got its own initial values.
  stack = fresh['decoder' if family == 't5' else 'layers'][
    'layers' if family == 't5' else 'attention'
  ]
  kernel = (
    stack['self_attention']['query'] if family == 't5' else stack['query']
  )
  assert not np.allclose(kernel[0], kernel[1])
  # Both ways round, exactly.
  assert layout.is_scanned(stacked) and not layout.is_scanned(params)
  _close(layout.unstack_layers(stacked), params, 0)
  assert layout.to_layout(params, True).keys() == stacked.keys()


@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_scanned_logits_equal_unrolled(family):
  unrolled, scanned, params, stacked = _pair(family)
  if family == 't5':
    args = (
      LOSS_BATCH['encoder_input_tokens'],
      LOSS_BATCH['decoder_input_tokens'],
    )
  else:
    args = (LOSS_BATCH['decoder_target_tokens'], jnp.array([4, 3]))
  want = unrolled.all_layer_logits(params, *args)
  got = scanned.all_layer_logits(stacked, *args)
  assert got.shape == want.shape
  _close(got, want, 1e-5)


@pytest.mark.parametrize(
  'family,remat', [('t5', 'none'), ('t5', 'minimal'), ('llama', 'full')]
)
def test_scanned_loss_and_gradients_equal_unrolled(family, remat):
  unrolled, scanned, params, stacked = _pair(family, remat)
  batch = LOSS_BATCH  # Llama reads the input as its prompt
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss(p, batch)[0]))
  loss, grads = grad(unrolled)(params)
  scanned_loss, scanned_grads = grad(scanned)(stacked)
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
  _close(scanned_grads, layout.stack_layers(grads), 1e-5)


# Llama's case (30 s) runs in make test-slow; T5's keeps the rule here.
@pytest.mark.parametrize(
  'family', ['t5', pytest.param('llama', marks=pytest.mark.slow)]
)
def test_scanned_early_exit_and_exact_decodes_equal_unrolled(family):
  unrolled, scanned, params, stacked = _pair(family)

  def decodes(model, p):
    exits = model.exit_config('softmax')
    early = jax.jit(
      lambda p, t: model.decode_early_exit(
        p, PROMPTS, 6, exit_config=exits, threshold=t, eos_id=-1
      )
    )
    exact = jax.jit(
      lambda p, t: model.decode_speculative(
        p,
        PROMPTS,
        6,
        draft=speculative.DraftConfig(exits, gamma=2),
        threshold=t,
        eos_id=-1,
      )
    )
    return [early(p, jnp.float32(t)) for t in (0.0, 0.5, 1.1)] + [
      exact(p, jnp.float32(0.5)).tokens
    ]

  want = decodes(unrolled, params)
  got = decodes(scanned, stacked)
  for a, b in zip(got[:3], want[:3]):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
  # Some threshold exits early, so the comparison covers skipped layers.
  assert (
    np.asarray(want[0].exit_layers) < unrolled.config.num_decoder_layers
  ).any()
  np.testing.assert_array_equal(got[3], want[3])
  np.testing.assert_array_equal(
    want[3], unrolled.decode_static(params, PROMPTS, 6, eos_id=-1).tokens
  )


def test_fingerprint_fields_leave_the_layout_out():
  scanned = dataclasses.replace(TINY_T5, scan_layers=True)
  assert layout.without_layout(scanned) == layout.without_layout(TINY_T5)
  assert 'scan_layers' not in layout.without_layout(TINY_T5)


def _two_steps(model, optimizer, params):
  # One jitted step (run op by op, the optimizer's many small ops dominate).
  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda q: model.loss(q, LOSS_BATCH)[0])(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = optimizer.init(params)
  for _ in range(2):
    params, state = step(params, state)
  return params


def _optimizer(name: str, per_layer: bool):
  return dataclasses.replace(
    optim.make_optimizer(name, learning_rate=1e-2, grad_clip_norm=0.5),
    per_layer=per_layer,
  )


def test_layerwise_adafactor_updates_a_stack_as_unrolled_layers():
  """Two Adafactor steps (global-norm clipping on) on the stacked layout
  equal the unrolled steps: its parameter scale and update RMS are taken
  per layer, not over the stack, which the plain rule would do."""
  unrolled, scanned, params, stacked = _pair('t5')
  want = _two_steps(unrolled, _optimizer('adafactor', False), params)
  got = _two_steps(scanned, _optimizer('adafactor', True), stacked)
  _close(got, layout.stack_layers(want), 1e-6)
  plain = _two_steps(scanned, _optimizer('adafactor', False), stacked)
  diff = jax.tree_util.tree_map(
    lambda a, b: float(jnp.abs(a - b).max()), plain, got
  )
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4


def test_layerwise_leaves_an_elementwise_rule_as_it_is():
  """AdamW is elementwise: per layer or over the stack, the same steps."""
  _, scanned, _, stacked = _pair('t5')
  _close(
    _two_steps(scanned, _optimizer('adamw', True), stacked),
    _two_steps(scanned, _optimizer('adamw', False), stacked),
    1e-6,
  )


def _model_dir(path, config, params) -> str:
  model_files.write_model_files(str(path), config, VOCAB)
  mgr = checkpoints.manager(str(path))
  checkpoints.save_params_only(mgr, 1, params)
  mgr.close()
  return str(path)


def test_a_model_dir_of_either_layout_loads_decodes_and_exports_as_the_other(
  tmp_path,
):
  unrolled, scanned, params, stacked = _pair('t5')
  flat_dir = _model_dir(tmp_path / 'unrolled', unrolled.config, params)
  scan_dir = _model_dir(tmp_path / 'scanned', scanned.config, stacked)
  # Each dir restores in the layout asked for, converting when it differs.
  _close(model_files.load_params(scan_dir, unrolled.config)[0], params, 0)
  _close(model_files.load_params(flat_dir, scanned.config)[0], stacked, 0)
  _close(model_files.load_params(scan_dir, scanned.config)[0], stacked, 0)
  # One model: the same fingerprint, so the same decode records apply.
  flat, scan = loaded.load(flat_dir), loaded.load(scan_dir)
  assert scan.config.scan_layers and not flat.config.scan_layers
  assert scan.fingerprint('softmax') == flat.fingerprint('softmax')
  # HF's layout, one tensor per layer, from either.
  hf_t5.export_hf(flat_dir, str(tmp_path / 'hf_flat'))
  hf_t5.export_hf(scan_dir, str(tmp_path / 'hf_scan'))
  a = load_file(str(tmp_path / 'hf_flat' / hf_tensors.SAFETENSORS))
  b = load_file(str(tmp_path / 'hf_scan' / hf_tensors.SAFETENSORS))
  assert a.keys() == b.keys() and len(a) > 0
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])


def test_a_run_keeps_its_layout_and_says_how_to_change_it(tmp_path):
  unrolled, scanned, params, _ = _pair('t5')
  flat_dir = _model_dir(tmp_path / 'unrolled', unrolled.config, params)
  with pytest.raises(checkpoints.CheckpointError, match='INITIAL_CHECKPOINT'):
    model_files.check_compatible(flat_dir, scanned.config)
