"""The TPU planner: chips and topologies, the HLO checks, the one-position
cost programs, a whole plan compiled for CPU devices, the refusal, and
(with libtpu, `make test-tpu-plan`) the same for a TPU topology."""

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import errors
from calm_jax.decoding import loops
from calm_jax.decoding import one_step
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning
from calm_jax.planning import chips
from calm_jax.planning import compiled as compiled_lib
from calm_jax.planning import hlo
from calm_jax.planning import plan as plan_lib
from calm_jax.planning import programs
from calm_jax.planning import tpu
from calm_jax.training import optim

import entry_points  # tests/entry_points.py

TINY = network.T5Config(
  vocab_size=256,
  emb_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_encoder_layers=2,
  num_decoder_layers=4,
)
SETTINGS = plan_lib.PlanSettings(
  topology='v5e:2x2',
  train_batch_size=4,
  input_length=16,
  target_length=8,
  decode_batch_sizes=(2,),
  decode_input_length=16,
  max_decode_length=8,
  measures=('softmax', 'state'),
  gamma=2,
)
HAS_LIBTPU = tpu._libtpu_folder() is not None  # pylint: disable=protected-access
# A TPU compile of even the tiny config takes about 30 s here: these run in
# `make test-tpu-plan` (which installs libtpu), not in `make test`.
NO_LIBTPU = 'libtpu is not installed (make test-tpu-plan installs it)'


# --- chips -------------------------------------------------------------------


def test_topologies_parse_and_refuse_by_name():
  topology = chips.parse_topology('v5e:16x16')
  assert topology.num_chips == 256
  assert topology.accelerator_type == 'v5litepod-256'
  assert chips.parse_topology('v4:4x4x8').accelerator_type == 'v4-256'
  for bad, says in (
    ('v9:2x2', "unknown chip 'v9'"),
    ('v5e-4', 'is not CHIP:GRID'),
    ('v4:2x2', 'a v4 grid has 3 dimensions'),
  ):
    with pytest.raises(errors.SettingError, match=says):
      chips.parse_topology(bad)


def test_a_device_gets_its_share_of_a_chip():
  v4 = chips.parse_topology('v4:2x2x1')  # 4 chips, 2 TensorCores each
  per_core = chips.DeviceBudget.of(v4, num_devices=8)
  assert per_core.hbm_bytes == chips.CHIPS['v4'].hbm_bytes // 2
  assert per_core.peak_flops == chips.CHIPS['v4'].peak_bf16_flops / 2
  whole = chips.DeviceBudget.of(chips.parse_topology('v5e:2x2'), 4)
  assert whole.hbm_bytes == 16 * chips.GIB


def test_decode_meshes_put_rows_on_data_and_keep_the_model_split():
  shape = plan_lib.decode_mesh_shape
  assert shape(1, 8) == (1, 8)
  assert shape(32, 8) == (8, 1)
  assert shape(6, 8) == (2, 4)
  # A model split over 4 devices stays split at a batch that would
  # otherwise take every device on 'data'.
  assert shape(32, 8, 4) == (2, 4)
  assert shape(1, 8, 4) == (1, 8)
  with pytest.raises(errors.SettingError, match='does not divide'):
    shape(32, 8, 3)


# --- HLO checks --------------------------------------------------------------


def _loop(with_callback: bool):
  def body(c):
    i, x = c
    if with_callback:
      jax.debug.callback(lambda v: None, i)
    return i + 1, x * 2.0

  return jax.jit(
    lambda x: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
  )


def test_host_transfers_inside_loops_are_found():
  x = jnp.ones((4, 8))
  quiet = hlo.parse(_loop(False).lower(x).compile().as_text())
  noisy = hlo.parse(_loop(True).lower(x).compile().as_text())
  assert quiet.loop_bodies() and noisy.loop_bodies()
  assert hlo.host_transfers(quiet, quiet.loop_bodies()) == []
  assert len(hlo.host_transfers(noisy, noisy.loop_bodies())) >= 1


SYNTHETIC = """HloModule m

%fused (p: f32[2,8,2,4]) -> f32[2,8,2,4] {
  %p = f32[2,8,2,4]{3,2,1,0} parameter(0)
  ROOT %copy.9 = f32[2,8,2,4]{3,1,2,0} copy(%p)
}

%body (t: (s32[], f32[2,8,2,4])) -> (s32[], f32[2,8,2,4]) {
  %t = (s32[], f32[2,8,2,4]{3,2,1,0}) parameter(0)
  %c = f32[2,8,2,4]{3,2,1,0} get-tuple-element(%t), index=1
  %copy.1 = f32[2,8,2,4]{3,1,2,0} copy(%c), metadata={op_name="jit(f)/while/body/cache"}
  %copy.2 = f32[2,8,2,4]{3,2,1,0:T(2,128)S(1)} copy(%c)
  %f = f32[2,8,2,4]{3,2,1,0} fusion(%c), kind=kLoop, calls=%fused
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[2,8,2,4]{3,2,1,0}) tuple(%i, %f)
}

%cond (t: (s32[], f32[2,8,2,4])) -> pred[] {
  %t = (s32[], f32[2,8,2,4]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %lt = pred[] compare(%i, %i), direction=LT
}

ENTRY %main (a: f32[2,8,2,4]) -> f32[2,8,2,4] {
  %a = f32[2,8,2,4]{3,2,1,0} parameter(0)
  %copy.0 = f32[2,8,2,4]{3,1,2,0} copy(%a)
  %z = s32[] constant(0)
  %t = (s32[], f32[2,8,2,4]{3,2,1,0}) tuple(%z, %a)
  %w = (s32[], f32[2,8,2,4]{3,2,1,0}) while(%t), condition=%cond, body=%body
  ROOT %o = f32[2,8,2,4]{3,2,1,0} get-tuple-element(%w), index=1
}
"""


def test_cache_copies_are_found_in_loops_only():
  module = hlo.parse(SYNTHETIC)
  assert module.entry == 'main'
  loops_ = module.loop_bodies()
  assert loops_ >= {'body', 'cond', 'fused'}
  found = hlo.copies_of(module, (2, 8, 2, 4), loops_)
  # The copy in the body and the fusion whose root is a copy; not the
  # entry's copy (outside the loop), nor another shape. The copy into
  # memory space 1 is a move between memory spaces, not a second buffer.
  assert len(found.copies) == 2
  assert all('copy.0' not in f and 'copy.2' not in f for f in found.copies)
  assert len(found.moves) == 1 and 'copy.2' in found.moves[0]
  assert hlo.copies_of(module, (2, 8, 2, 5), loops_) == hlo.Copies((), ())
  largest = hlo.largest_arrays(module, 1)[0]
  assert largest.shape == 'f32[2,8,2,4]' and largest.bytes == 512


def test_traffic_is_attributed_to_sources_with_layers_folded():
  module = hlo.parse(
    SYNTHETIC.replace('while/body/cache', 'decoder/layers_3/cache')
  )
  traffic = hlo.traffic_by_source(module)
  # Each copy reads its 512-byte operand and writes 512 bytes: the two
  # without a source path (one in the loop, one outside) under their
  # opcode; the fusion likewise; the condition's compare reads two s32
  # and writes a pred.
  assert traffic[0] == hlo.Traffic('copy', 2048, 2)
  assert set(traffic[1:]) == {
    hlo.Traffic('decoder/layers_*/cache', 1024, 1),
    hlo.Traffic('fusion', 1024, 1),
    hlo.Traffic('compare', 9, 1),
  }
  # An asynchronous copy counts the bytes it moves once, under MOVES; its
  # done op not at all.
  moving = SYNTHETIC.replace(
    '  %i = s32[] get-tuple-element(%t), index=0\n',
    '  %i = s32[] get-tuple-element(%t), index=0\n'
    '  %s = (f32[2,8,2,4]{3,2,1,0}, f32[2,8,2,4]{3,2,1,0:S(1)}, u32[]) '
    'copy-start(%c)\n'
    '  %d = f32[2,8,2,4]{3,2,1,0:S(1)} copy-done(%s)\n',
    1,  # in the loop body only
  )
  assert hlo.Traffic(hlo.MOVES, 512, 1) in hlo.traffic_by_source(
    hlo.parse(moving)
  )


# --- one decode position -----------------------------------------------------


@pytest.fixture(scope='module')
def tiny():
  model = models.CalmModel(TINY)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 2, 256)
  context = model.encode_context(params, tokens)
  return model, params, context


def _position(model, params, context, measure, exit_layer):
  fns = model.step_fns(params, None, 8, context)
  cache = loops.KVCache.zeros(4, (2, 8, 2, 16), jnp.float32)
  start = jnp.zeros((2,), jnp.int32)
  if measure == 'full':
    return one_step.full_depth_token(fns, cache, start, jnp.int32(0))
  cfg = model.exit_config(measure)
  return one_step.token_at_exit(
    fns, cfg, exit_layer, cache, start, jnp.int32(0)
  )


def test_a_token_through_every_layer_is_the_static_decoders(tiny):
  model, params, context = tiny
  token, _, cache = _position(model, params, context, 'softmax', 4)
  full_token, full_cache = _position(model, params, context, 'full', 4)
  static = model.decode_static(params, None, 1, context=context)
  np.testing.assert_array_equal(token, full_token)
  np.testing.assert_array_equal(token, static.tokens[:, 0])
  for a, b in zip(cache.keys, full_cache.keys):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_token_costs_more_the_later_it_exits(tiny):
  model, params, context = tiny

  def flops(measure, k):
    fn = jax.jit(lambda p, c: _position(model, p, c, measure, k))
    return fn.lower(params, context).compile().cost_analysis()['flops']

  softmax = [flops('softmax', k) for k in (1, 2, 3, 4)]
  assert all(a < b for a, b in zip(softmax, softmax[1:]))
  # The top with every check on the way costs more than the static
  # decoder's position: the checks are not optimised away.
  assert softmax[-1] > flops('full', 4)
  # State saturation needs no vocabulary head at its checks.
  assert flops('state', 3) < flops('softmax', 3)


# --- predictions -------------------------------------------------------------


def test_expected_cost_of_the_deepest_row():
  cost = np.array([1.0, 2.0, 3.0, 4.0])
  p = np.array([0.5, 0.25, 0.125, 0.125])
  assert plan_lib.expected_max_cost(p, cost, 1) == pytest.approx(p @ cost)
  assert plan_lib.expected_max_cost(p, cost, 1000) == pytest.approx(4.0)
  # P(max <= 1) at batch 2 is 0.25, etc.
  two = plan_lib.expected_max_cost(p, cost, 2)
  cdf2 = np.cumsum(p) ** 2
  assert two == pytest.approx(np.diff(np.r_[0, cdf2]) @ cost)
  np.testing.assert_allclose(
    plan_lib.rescaled_histogram([2, 1, 1, 0], 4), [0.5, 0.25, 0.25, 0]
  )
  np.testing.assert_allclose(
    plan_lib.rescaled_histogram([1, 0, 0, 1], 8).nonzero()[0], [1, 7]
  )


def test_speedup_from_costs():
  costs = {
    'full': {'roofline_seconds': 4.0},
    'exits': {
      'softmax': {
        '1': {'roofline_seconds': 1.0},
        '4': {'roofline_seconds': 4.0},
      }
    },
    'verify': {'gamma': 2, 'roofline_seconds': 5.0},
  }
  # Every token exits at layer 1: four times cheaper at batch 1.
  assert plan_lib.predicted_speedup(
    costs, 'softmax', [1, 0, 0, 0], 1, 4
  ) == pytest.approx(4.0)
  exact = plan_lib.exact_round(costs, 'softmax', [1, 0, 0, 0], 1, 4, 3.0)
  assert exact['round_seconds'] == pytest.approx(2 * 1.0 + 5.0)
  assert exact['break_even_tokens_per_pass'] == pytest.approx(7.0 / 4.0)
  assert exact['speedup'] == pytest.approx(3.0 * 4.0 / 7.0)


# --- a whole plan, compiled for the CPU --------------------------------------


@pytest.fixture(scope='module')
def cpu_plan():
  model = models.CalmModel(TINY)
  optimizer = optim.make_optimizer(name='adafactor', learning_rate=1e-3)
  return plan_lib.plan(
    model, optimizer, SETTINGS, devices=jax.devices()[:1], refuse=False
  )


def test_a_plan_compiles_every_program_of_the_run(cpu_plan):
  assert [r['stage'] for r in cpu_plan['train']] == ['model', 'classifier']
  modes = [r['mode'] for r in cpu_plan['decode']['2']]
  assert modes == ['full', 'softmax_0.9', 'state_0.9', 'exact_softmax_0.9']
  costs = cpu_plan['token_costs']['2']
  assert sorted(costs['exits']) == ['softmax', 'state']
  assert sorted(costs['exits']['state']) == ['2', '3', '4']  # its floor is 2
  model_step = cpu_plan['train'][0]
  assert model_step['flops'] > 0 and model_step['total_bytes'] > 0
  assert 0 < model_step['roofline_mfu'] <= 1
  assert model_step['fits'] and model_step['headroom_bytes'] > 0
  # The classifier stage trains a tiny head: far less than the model.
  assert cpu_plan['train'][1]['flops'] < model_step['flops']


def test_a_packed_train_step_with_2d_rules_compiles():
  """What gin/runs/plan.gin plans by default (packed batches), with the 2D
  parameter rules; the segment ids and positions are arguments."""
  model = models.CalmModel(TINY)
  optimizer = optim.make_optimizer(name='adafactor', learning_rate=1e-3)
  mesh = plan_lib.train_mesh(SETTINGS, jax.devices()[:1])
  program = programs.train_step(
    model,
    optimizer,
    mesh,
    batch_size=4,
    input_length=16,
    target_length=8,
    rules=partitioning.rules_for(2),
    pack=True,
  )
  batch = program.args[1]
  assert set(programs.PACKED_KEYS) <= set(batch)
  assert batch['encoder_segment_ids'].shape == (4, 16)
  assert batch['decoder_positions'].shape == (4, 8)
  budget = chips.DeviceBudget(
    hbm_bytes=1 << 34, peak_flops=1e12, hbm_bandwidth=1e11
  )
  report = compiled_lib.compile_program(program, budget)
  assert report.flops > 0 and report.fits


def test_a_program_that_does_not_fit_is_refused_in_one_line():
  model = models.CalmModel(TINY)
  optimizer = optim.make_optimizer(name='adafactor', learning_rate=1e-3)
  mesh = plan_lib.train_mesh(SETTINGS, jax.devices()[:1])
  program = programs.train_step(
    model, optimizer, mesh, batch_size=4, input_length=16, target_length=8
  )
  small = chips.DeviceBudget(
    hbm_bytes=1 << 16, peak_flops=1e12, hbm_bandwidth=1e11
  )
  report = compiled_lib.compile_program(program, small)
  assert not report.fits
  line = compiled_lib.refusal(report, 'v5e:2x2')
  assert '\n' not in line
  assert 'does not fit v5e:2x2' in line and 'largest arrays:' in line
  assert 'GiB of HBM' in line


def test_the_command_refuses_bad_settings_in_one_line(monkeypatch, tmp_path):
  base = (
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/plan.gin',
  )
  done = entry_points.run_module(
    'calm_jax.plan', *base, "--gin.TOPOLOGY='v9:2x2'"
  )
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith('error: ')
  assert "unknown chip 'v9'" in done.stderr
  monkeypatch.setattr(tpu, 'DEFAULT_LIBTPU_DIR', tmp_path / 'none')
  monkeypatch.setenv(tpu.LIBTPU_DIR_VARIABLE, str(tmp_path))
  if importlib.util.find_spec('libtpu') is None:
    done = entry_points.run_module('calm_jax.plan', *base)
    assert done.returncode == 2
    assert 'the TPU compiler (libtpu) is not installed' in done.stderr


# --- a TPU topology (libtpu) ---------------------------------------------------


@pytest.mark.tpu
@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_the_tpu_decoders_have_no_host_transfer_or_cache_copy_in_loops():
  settings = dataclasses.replace(SETTINGS, stages=(), token_costs=False)
  model = models.CalmModel(dataclasses.replace(TINY, dtype='bfloat16'))
  optimizer = optim.make_optimizer(name='adafactor', learning_rate=1e-3)
  plan = plan_lib.plan(model, optimizer, settings)
  assert plan['devices'] == 4
  for report in plan['decode']['2']:
    assert not report['loop_host_transfers']
    assert not report['loop_cache_copies']
    assert report['fits']


@pytest.mark.tpu
@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_the_tpu_plan_command_writes_its_json(tmp_path):
  output = tmp_path / 'plan.json'
  done = entry_points.run_module(
    'calm_jax.plan',
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/plan.gin',
    '--gin.BATCH_SIZE=8',
    '--gin.calm_jax.plan.input_length=16',
    '--gin.calm_jax.plan.target_length=8',
    "--gin.calm_jax.plan.stages=('model',)",
    '--gin.calm_jax.plan.decoders=False',
    '--gin.calm_jax.plan.decode_batch_sizes=(1,)',
    '--gin.calm_jax.plan.decode_input_length=16',
    '--gin.calm_jax.plan.max_decode_length=8',
    "--gin.calm_jax.plan.measures=('softmax',)",
    f"--gin.OUTPUT='{output}'",
  )
  assert done.returncode == 0, done.stderr
  plan = json.loads(pathlib.Path(output).read_text())
  assert plan['devices'] == 4 and plan['train'][0]['fits']
  assert plan['token_costs']['1']['full']['flops'] > 0
  # libtpu's start-up lines stay hidden.
  assert 'libtpu' not in done.stderr and 'TPU_WORKER' not in done.stderr


def test_the_exit_loops_uncounted_iterations_are_added(cpu_plan, monkeypatch):
  """The loss's loop over the exits, counted once by the cost analysis,
  plus the other iterations compiled alone, is what the same loss with
  the loop unrolled costs."""
  model = models.CalmModel(TINY)
  mesh = partitioning.make_mesh((1, 1), jax.devices()[:1])
  shapes = dict(batch_size=4, target_length=8)
  params = programs.abstract_params(model, mesh)
  batch = programs.train_batch(mesh, 4, 16, 8)

  def loss_flops():
    grad = jax.jit(jax.value_and_grad(model.loss, has_aux=True))
    cost = grad.lower(params, batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  counted = loss_flops()
  streamed = models.streamed_calm_loss
  monkeypatch.setattr(
    models,
    'streamed_calm_loss',
    lambda *a, **k: streamed(*a, **k, unroll=True),
  )
  unrolled = loss_flops()
  iteration = programs.exit_loop_iteration(model, mesh, **shapes)
  budget = chips.DeviceBudget.of(chips.parse_topology('v5e:2x2'), 1)
  added = compiled_lib.compile_program(iteration, budget).flops
  exits = len(TINY.exit_layers)
  assert unrolled > counted  # the loop's body was counted once
  np.testing.assert_allclose(counted + (exits - 1) * added, unrolled, rtol=0.05)
  model_step = cpu_plan['train'][0]
  assert model_step['exit_loop']['iterations'] == exits
  assert model_step['flops'] == pytest.approx(
    model_step['exit_loop']['counted_flops']
    + (exits - 1) * model_step['exit_loop']['iteration_flops']
  )


# Llama's case (35 s) runs in make test-slow; T5's keeps the rule here.
@pytest.mark.parametrize(
  'family', ['t5', pytest.param('llama', marks=pytest.mark.slow)]
)
def test_a_scanned_steps_uncounted_layers_are_added(family):
  """With the layers scanned the cost analysis counts one layer per stack;
  the plan adds the others (one layer's cost from unrolled compiles at
  depth 1 and 2), and so reports what the unrolled step costs."""
  if family == 't5':
    config = TINY
    build = models.CalmModel
  else:
    from test_models import TINY_LLAMA  # pylint: disable=g-import-not-at-top

    from calm_jax.model import llama  # pylint: disable=g-import-not-at-top

    config = llama.LlamaConfig(**TINY_LLAMA)
    build = llama.CalmLlama
  settings = dataclasses.replace(
    SETTINGS, stages=('model',), decode_batch_sizes=()
  )

  def step(scan: bool) -> dict:
    model = build(dataclasses.replace(config, scan_layers=scan))
    optimizer = dataclasses.replace(
      optim.make_optimizer(name='adafactor', learning_rate=1e-3),
      per_layer=scan,
    )
    return plan_lib.plan(
      model, optimizer, settings, devices=jax.devices()[:1], refuse=False
    )['train'][0]

  unrolled, scanned = step(False), step(True)
  assert unrolled['layer_scan'] is None
  counted = scanned['layer_scan']['counted_flops']
  assert counted < 0.8 * unrolled['flops']  # one layer per stack counted
  np.testing.assert_allclose(scanned['flops'], unrolled['flops'], rtol=0.02)
  np.testing.assert_allclose(
    scanned['bytes_accessed'], unrolled['bytes_accessed'], rtol=0.05
  )
  stacks = scanned['layer_scan']['stacks']
  assert {f: s['layers'] for f, s in stacks.items()} == (
    plan_lib.layer_depths(config)
  )
