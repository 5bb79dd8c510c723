"""`make tpu-plan`'s sizes matrix: the search for the smallest slice that
fits, and the summary tables of docs/tpu_plan.md (no compiles)."""

import importlib.util
import pathlib
import sys
import time

from calm_jax.analysis import tpu_plan_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool():
  spec = importlib.util.spec_from_file_location(
    'tpu_plan_tool', ROOT / 'tools' / 'tpu_plan.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


GIB = 1 << 30


def _train_plan(size, topology, total_gib, fits=True):
  return {
    'topology': topology,
    'matrix': {'kind': 'train', 'size': size},
    'train': [
      {
        'fits': fits,
        'total_bytes': total_gib * GIB,
        'hbm_bytes': 16 * GIB,
        'roofline_mfu': 0.4,
      }
    ],
  }


def test_the_search_stops_at_the_first_slice_that_fits_and_adds_v5e_256():
  tool = _tool()
  fitting = {'v5e:4x4'}
  ran = []

  def run(name):
    ran.append(name)
    topology = next(
      t for t in tool.FIT_TOPOLOGIES if name.endswith(tool._tag(t))
    )
    if topology in fitting or topology == 'v5e:16x16':
      return _train_plan('t5_xl', topology, 9)
    return {'topology': topology, 'error': 'x does not fit: it needs 30.5 GiB'}

  # An earlier search's results (the committed report's) are dropped:
  # v5e-256 is compiled again and nothing stays above the slice that fits.
  results = {'fit_t5_xl_v5e_8x8': {}, 'fit_t5_xl_v5e_16x16': {}}
  tool.fit_search('t5_xl', run, results)
  assert ran == [
    'fit_t5_xl_v5e_2x2',
    'fit_t5_xl_v5e_2x4',
    'fit_t5_xl_v5e_4x4',
    'fit_t5_xl_v5e_16x16',
  ]
  assert set(results) == set(ran)


def test_a_size_splits_the_batch_over_data_on_every_slice():
  tool = _tool()
  for size in tool.SIZES:
    for topology in tool.FIT_TOPOLOGIES:
      devices = tool.num_devices(topology)
      case = tool.CASES[f'fit_{size}_{tool._tag(topology)}']
      (mesh,) = [a for a in case['args'] if a.startswith('--gin.MESH_SHAPE=')]
      data, model = eval(mesh.split('=', 1)[1])
      assert data * model == devices and tool.TRAIN_BATCH % data == 0
      assert model >= min(devices, tool.SIZES[size][1])


def test_the_fit_table_shows_fits_refusals_and_what_was_not_compiled():
  results = {
    'a': _train_plan('t5_xl', 'v5e:2x2', 0, fits=False)
    | {'error': 'step does not fit v5e:2x2: it needs 30.50 GiB per device'},
    'b': _train_plan('t5_xl', 'v5e:4x4', 9),
    'c': _train_plan('t5_xl', 'v5e:16x16', 3),
    'd': _train_plan('t5_small', 'v5e:2x2', 2),
    'e': {
      'topology': 'v5e:2x4',
      'matrix': {'kind': 'train', 'size': 't5_xxl'},
      'error': 'RESOURCE_EXHAUSTED: Used 40.1G of 15.75G hbm',
    },
  }
  table = tpu_plan_markdown._fit_table(results)
  header = table[2]
  assert header == (
    '| size | v5e:2x2 | v5e:2x4 | v5e:4x4 | v5e:16x16 | planned at |'
  )
  rows = {line.split(' | ')[0][2:]: line for line in table[4:-1]}
  assert rows['t5_xl'] == (
    '| t5_xl | needs 30.50 GiB | - | 9.00 of 16.00 GiB, MFU <= 40% '
    '| 3.00 of 16.00 GiB, MFU <= 40% | earlier |'
  )
  assert rows['t5_xxl'] == '| t5_xxl | - | needs 40.1 GiB | - | - | earlier |'
  results['e']['error'] = (
    'train step does not fit v5e:2x4 (8 devices): ran out of memory on HBM, '
    'the total memory required for HLO temporaries (22.05G) exceeds '
    'available HBM (15.75G)'
  )
  rows = {
    line.split(' | ')[0][2:]: line
    for line in tpu_plan_markdown._fit_table(results)[4:-1]
  }
  assert rows['t5_xxl'] == '| t5_xxl | - | needs 22.05 GiB | - | - | earlier |'
  # A compiler failure is not a refusal: the cell names the failing op.
  results['e'] |= {
    'commit': 'abc1234',
    'returncode': 1,
    'error': 'UNIMPLEMENTED: ... metadata={op_name="jit(step)/transpose('
    'jvp(jit(take_along_axis)))/scatter-add" stack_frame_id=29}.',
  }
  rows = {
    line.split(' | ')[0][2:]: line
    for line in tpu_plan_markdown._fit_table(results)[4:-1]
  }
  assert rows['t5_xxl'] == (
    '| t5_xxl | - | compiler error: transpose(jvp(jit(take_along_axis)))'
    '/scatter-add | - | - | abc1234 |'
  )


def test_the_decode_table_shows_the_bound_and_the_predicted_range():
  plan = {
    'topology': 'v5e:2x2',
    'matrix': {'kind': 'decode', 'size': 't5_xxl', 'batch': 1},
    'token_costs': {'1': {'full': {'roofline_seconds': 2e-3}}},
    'predictions': [
      {
        'calm_speedup_bound': s,
        'exact': {'break_even_tokens_per_pass': e},
      }
      for s, e in ((1.5, 2.0), (2.5, 1.2))
    ],
  }
  refused = {
    'topology': 'v5e:2x2',
    'matrix': {'kind': 'decode', 'size': 't5_xxl', 'batch': 256},
    'error': 'token does not fit v5e:2x2: it needs 70.00 GiB per device',
  }
  table = tpu_plan_markdown._decode_table({'a': plan, 'b': refused})
  assert table[2] == (
    '| size | v5e:2x2 batch 1 | v5e:2x2 batch 256 | planned at |'
  )
  assert table[4] == (
    '| t5_xxl | 2 ms, CALM x1.50-2.50, exact breaks even at 1.20-2.00 '
    '| needs 70.00 GiB | earlier |'
  )


def test_a_decoders_in_loop_copies_are_named_by_shape_and_memory_space():
  line = (
    '%copy.1 = bf16[8,53,4,32]{1,3,2,0:T(8,128)(2,1)S(1)} '
    'copy(%get-tuple-element.5), metadata={op_name="jit(f)/while/body"}'
  )
  report = {
    'kind': 'decode',
    'name': 'exact-mode decoder (batch 32)',
    'loop_host_transfers': [],
    'loop_cache_copies': [line],
    'loop_cache_moves': [line, line],
  }
  (check,) = tpu_plan_markdown._checks([report])
  assert '0 host transfers and 1 copies' in check and '2 moves' in check
  assert check.endswith(
    'of `bf16[8,53,4,32]` within memory space 1 (its operand in the same space)'
  )


def test_a_case_process_is_streamed_and_stopped_at_its_timeout(capsys):
  tool = _tool()
  code = 'import sys; print("compiling x", file=sys.stderr); sys.exit(2)'
  status, tail, timed_out = tool._run_streamed(
    [sys.executable, '-c', code], timeout=60
  )
  assert (status, timed_out) == (2, False) and 'compiling x' in tail
  assert 'compiling x' in capsys.readouterr().err
  sleeper = [sys.executable, '-c', 'import time; time.sleep(30)']
  start = time.perf_counter()
  status, _, timed_out = tool._run_streamed(sleeper, timeout=1)
  assert timed_out and status != 0 and time.perf_counter() - start < 20


def test_a_train_steps_bytes_are_listed_by_source():
  report = {
    'kind': 'train',
    'name': 'train step (model stage)',
    'traffic': [
      {'what': 'decoder/layers_*/attention', 'bytes': 3.2e9, 'instructions': 9},
      {'what': 'loss', 'bytes': 1.15e9, 'instructions': 2},
    ],
  }
  (line,) = tpu_plan_markdown._traffic([report, {'kind': 'decode'}])
  assert line.endswith('decoder/layers_*/attention 3.2 GB; loss 1.15 GB')


def test_render_drops_an_old_search_of_a_size_searched_again():
  tool = _tool()
  report = {
    'fit_t5_xl_v5e_4x8': {'old': True},  # the old first fit
    'fit_t5_xl_v5e_16x16': {'old': True},
    'fit_t5_xxl_v5e_8x8': {'old': True},  # a size not searched again
    'demo_decode': {'old': True},
  }
  fresh = {'fit_t5_xl_v5e_4x4': {}, 'fit_t5_xl_v5e_16x16': {}}
  tool.drop_stale_searches(report, fresh)
  assert set(report) == {
    'fit_t5_xl_v5e_16x16',
    'fit_t5_xxl_v5e_8x8',
    'demo_decode',
  }
