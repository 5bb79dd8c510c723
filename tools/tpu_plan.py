"""`make tpu-plan`: the TPU plans of the documented cases, then
docs/tpu_plan.md and docs/tpu_plan.json from them.

Each case is one `python -m calm_jax.plan` process (its JSON in
runs/tpu_plan/, kept: a finished case is not compiled again, so an
interrupted run resumes); a case that does not fit is recorded with the
planner's one-line refusal. `--cases a,b` runs some; `--render` only
renders what runs/tpu_plan/ holds over docs/tpu_plan.json.

The sizes matrix (`--sizes`, default every size): each model size's CALM
fine-tuning step at the paper's batch, tried on v5e slices from the
smallest up until one fits (the larger ones are not compiled), and on
v5e-256; its one-position decode programs at batch 1, 32 and 256 on v5e-4
and v5e-256, one case per batch so that a batch that does not fit is a
refusal of its own.
"""

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / 'runs' / 'tpu_plan'
sys.path.insert(0, str(ROOT))

from calm_jax.analysis import tpu_plan_markdown  # noqa: E402
from calm_jax.planning import chips  # noqa: E402
from calm_jax.storage import files  # noqa: E402

TRAIN_ONLY = [
  "--gin.calm_jax.plan.stages=('model',)",
  '--gin.calm_jax.plan.decoders=False',
  '--gin.calm_jax.plan.token_costs=False',
]
DECODE_ONLY = ['--gin.calm_jax.plan.stages=()']
# As t5x's step that the issue measured: unpacked batches.
YARDSTICK = [*TRAIN_ONLY, '--gin.PACK=False']
# t5x's T5 1.1 gin files train at DROPOUT_RATE = 0.0.
NO_DROPOUT = '--gin.calm_jax.T5Config.dropout_rate=0.0'
BF16_SCORES = '--gin.calm_jax.T5Config.float32_attention_logits=False'
STREAMED = "--gin.EXIT_LOSS='streamed'"


def _yardstick(*extra: str) -> list[str]:
  """The yardstick's settings (batch 32, mesh (2, 2), unpacked) and
  `extra`."""
  return ['--gin.BATCH_SIZE=32', '--gin.MESH_SHAPE=(2, 2)', *extra, *YARDSTICK]


def _case(model, topology, extra, note):
  return {'model': model, 'topology': topology, 'args': extra, 'note': note}


CASES = {
  # The yardstick: batch 32, lengths 512/128, mesh (2, 2).
  't5_small_train_b32': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(),
    "t5x's plain step at these dims: temp 1.09 GiB, 1.24 TFLOP, 21.2 GB. "
    "Before the streamed loss (every exit's logits at once, 7e708b0): "
    'temp 5.39 GiB, 1.73 TFLOP, 48.7 GB',
  ),
  # The same step with the exits' head and cross-entropy unfused (one
  # exit's logits at a time, in a rematerialised scan): what the fused
  # kernels ('auto' on TPU) replace.
  't5_small_train_b32_streamed': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(STREAMED),
    'the yardstick case with the streamed (unfused) exit loss',
  ),
  't5_small_train_b32_no_dropout_bf16_scores_streamed': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(NO_DROPOUT, BF16_SCORES, STREAMED),
    "t5x's numerics (no dropout, bfloat16 scores) with the streamed exit loss",
  ),
  't5_base_train_b32': _case(
    'calm_t5_1_1_base',
    'v5e:2x2',
    _yardstick(),
    'Before the streamed loss (7e708b0): temp 15.00 GiB, 5.55 TFLOP, 136 GB '
    '(the table shows the run kept in docs/tpu_plan.json: re-run the case '
    'if it shows these figures)',
  ),
  'demo_decode': _case(
    'calm_demo',
    'v5e:2x2',
    [
      *DECODE_ONLY,
      '--gin.calm_jax.plan.decode_batch_sizes=(1, 32)',
      '--gin.calm_jax.plan.decode_input_length=96',
      '--gin.calm_jax.plan.max_decode_length=48',
      "--gin.calm_jax.plan.histograms='reproduction'",
    ],
    'the demo model (make demo) at its summarisation lengths',
  ),
  'smollm2_decode': _case(
    'calm_llama_smollm2_135m',
    'v5e:2x2',
    [
      *DECODE_ONLY,
      '--gin.calm_jax.plan.decoders=False',
      '--gin.calm_jax.plan.decode_batch_sizes=(1, 32)',
      '--gin.calm_jax.plan.decode_input_length=256',
      '--gin.calm_jax.plan.max_decode_length=16',
      "--gin.calm_jax.plan.measures=('softmax', 'classifier')",
      '--gin.calm_jax.plan.token_exit_layers=(3, 6, 9, 12, 15, 18, 21, 24, 27)',
      "--gin.calm_jax.plan.histograms='real_model'",
    ],
    'SmolLM2-135M (make real-model) at its real-text lengths',
  ),
  't5_small_train_b32_minimal_remat': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick("--gin.REMAT_POLICY='minimal'"),
    "the yardstick case with minimal remat (each layer's matmul outputs "
    'kept, the rest recomputed)',
  ),
  't5_small_train_b32_2d': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick('--gin.PARAMETER_PARTITIONING_DIMS=2'),
    "the yardstick case with 2D parameter sharding: the parameters' and "
    "optimizer state's bytes split over 'data' too",
  ),
  't5_small_train_b32_scan': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick('--gin.SCAN_LAYERS=True'),
    'the yardstick case with the layers scanned (SCAN_LAYERS)',
  ),
  't5_small_train_b32_scan_minimal_remat': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick('--gin.SCAN_LAYERS=True', "--gin.REMAT_POLICY='minimal'"),
    "the yardstick case as t5x's scalable T5 runs: layers scanned, minimal "
    'remat',
  ),
  't5_base_train_b32_scan_minimal_remat': _case(
    'calm_t5_1_1_base',
    'v5e:2x2',
    _yardstick('--gin.SCAN_LAYERS=True', "--gin.REMAT_POLICY='minimal'"),
    "the base yardstick case as t5x's scalable T5 runs: layers scanned, "
    'minimal remat',
  ),
  't5_base_train_b32_scan': _case(
    'calm_t5_1_1_base',
    'v5e:2x2',
    _yardstick('--gin.SCAN_LAYERS=True'),
    'the base yardstick case with the layers scanned (SCAN_LAYERS)',
  ),
  't5_small_train_b32_no_dropout': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(NO_DROPOUT),
    "the yardstick case without dropout (t5x's T5 1.1 gin files default "
    'to DROPOUT_RATE = 0.0; calm_t5_1_1_small.gin fine-tunes at 0.1, whose '
    'masks over attention weights and activations are drawn, written and '
    'read every step)',
  ),
  # CALM's cost over a plain step of the same network: one exit (the top),
  # at 8 and at 24 decoder layers (t5x's step was measured at 8 only).
  't5_small_train_b32_one_exit_no_dropout': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(NO_DROPOUT, '--gin.calm_jax.T5Config.first_exit=8'),
    'the yardstick network with one exit (the top layer) and no dropout: '
    "calm_jax's plain step, to set beside t5x's",
  ),
  # t5x's T5 1.1 computes attention scores and softmax in bfloat16
  # (float32_attention_logits=False); calm_jax's default keeps them float32.
  't5_small_train_b32_no_dropout_bf16_scores': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(NO_DROPOUT, BF16_SCORES),
    'the yardstick case without dropout, attention scores in bfloat16 as '
    "t5x's T5 1.1 computes them",
  ),
  't5_small_train_b32_one_exit_no_dropout_bf16_scores': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(NO_DROPOUT, BF16_SCORES, '--gin.calm_jax.T5Config.first_exit=8'),
    "calm_jax's plain step (one exit, no dropout) with attention scores in "
    "bfloat16: t5x's step, term for term",
  ),
  't5_small_24_train_b32_no_dropout': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(NO_DROPOUT, '--gin.calm_jax.T5Config.num_decoder_layers=24'),
    'the yardstick case at 24 decoder layers (24 exits), no dropout',
  ),
  't5_small_24_train_b32_one_exit_no_dropout': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(
      NO_DROPOUT,
      '--gin.calm_jax.T5Config.num_decoder_layers=24',
      '--gin.calm_jax.T5Config.first_exit=24',
    ),
    'the 24-decoder-layer network with one exit (the top layer), no '
    'dropout: the plain step at that depth',
  ),
  # At 24 decoder layers with t5x's numerics: CALM's step (24 exits, fused
  # loss) and the plain step with t5x's unfused head (one exit, streamed),
  # which at 8 layers matches t5x's temp and is 1.17x its bytes.
  't5_small_24_train_b32_no_dropout_bf16_scores': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(
      NO_DROPOUT, BF16_SCORES, '--gin.calm_jax.T5Config.num_decoder_layers=24'
    ),
    "the yardstick case at 24 decoder layers (24 exits) with t5x's numerics",
  ),
  't5_small_24_train_b32_one_exit_no_dropout_bf16_scores_streamed': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    _yardstick(
      NO_DROPOUT,
      BF16_SCORES,
      STREAMED,
      '--gin.calm_jax.T5Config.num_decoder_layers=24',
      '--gin.calm_jax.T5Config.first_exit=24',
    ),
    'the 24-decoder-layer plain step (one exit, unfused head as in t5x) '
    "with t5x's numerics",
  ),
  't5_xxl_train_v5e256_2d': _case(
    'calm_t5_1_1_xxl',
    'v5e:16x16',
    [
      '--gin.BATCH_SIZE=128',
      '--gin.MESH_SHAPE=(32, 8)',
      '--gin.PARAMETER_PARTITIONING_DIMS=2',
      "--gin.REMAT_POLICY='minimal'",
      '--gin.SCAN_LAYERS=True',
      *TRAIN_ONLY,
    ],
    "XXL CALM fine-tuning at the paper's batch (packed, 512/128) on "
    "v5e-256 as t5x runs XXL: 2D parameter sharding ('embed' over 'data'), "
    'minimal remat, layers scanned',
  ),
  't5_small_train_b128': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    ['--gin.BATCH_SIZE=128', '--gin.MESH_SHAPE=(2, 2)', *TRAIN_ONLY],
    "the paper's fine-tuning batch",
  ),
  't5_base_train_b128': _case(
    'calm_t5_1_1_base',
    'v5e:2x4',
    ['--gin.BATCH_SIZE=128', '--gin.MESH_SHAPE=(4, 2)', *TRAIN_ONLY],
    "the paper's fine-tuning batch",
  ),
}


# --- the sizes matrix ----------------------------------------------------------

SIZES = {
  # size: (gin/models file, the smallest 'model' axis of its train step,
  # of its decoders: those whose float32 parameters and cache would crowd
  # one chip's HBM are split)
  't5_small': ('calm_t5_1_1_small', 2, 1),
  't5_base': ('calm_t5_1_1_base', 2, 1),
  't5_large': ('calm_t5_1_1_large', 2, 1),
  't5_xl': ('calm_t5_1_1_xl', 4, 4),
  't5_xxl': ('calm_t5_1_1_xxl', 8, 8),
  # SmolLM2's 9 heads (3 K/V heads) split over no power of two.
  'llama_smollm2_135m': ('calm_llama_smollm2_135m', 1, 1),
  'llama_1b': ('calm_llama_1b', 2, 1),
  'llama_8b': ('calm_llama_8b', 8, 8),
}
FIT_TOPOLOGIES = (
  'v5e:2x2',
  'v5e:2x4',
  'v5e:4x4',
  'v5e:4x8',
  'v5e:8x8',
  'v5e:8x16',
  'v5e:16x16',
)
DECODE_TOPOLOGIES = ('v5e:2x2', 'v5e:16x16')
DECODE_BATCHES = (1, 32, 256)
TRAIN_BATCH = 128  # the paper's fine-tuning batch
# As t5x runs its large T5s: packed (the plan's default), layers scanned,
# minimal remat, parameters split over 'data' too.
AT_SCALE = [
  f'--gin.BATCH_SIZE={TRAIN_BATCH}',
  '--gin.SCAN_LAYERS=True',
  "--gin.REMAT_POLICY='minimal'",
  '--gin.PARAMETER_PARTITIONING_DIMS=2',
  *TRAIN_ONLY,
]
# Exit programs compiled besides each measure's first exit and the top
# (the curve is linear in between), as fractions of the depth.
EXIT_FRACTIONS = (0.25, 0.5, 0.75)
DECODER_LAYERS = {
  'calm_t5_1_1_small': 8,
  'calm_t5_1_1_base': 12,
  'calm_t5_1_1_large': 24,
  'calm_t5_1_1_xl': 24,
  'calm_t5_1_1_xxl': 24,
  'calm_llama_smollm2_135m': 30,
  'calm_llama_1b': 16,
  'calm_llama_8b': 32,
}


def num_devices(topology: str) -> int:
  return chips.parse_topology(topology).num_chips


def _tag(topology: str) -> str:
  return topology.replace(':', '_')


def _model_axis(size: str, devices: int) -> int:
  """The size's 'model' axis on this many devices: its own smallest,
  raised so that the train batch splits over 'data'."""
  return min(devices, max(SIZES[size][1], devices // TRAIN_BATCH))


def fit_case(size: str, topology: str) -> dict:
  model = SIZES[size][0]
  devices = num_devices(topology)
  model_axis = _model_axis(size, devices)
  mesh = (devices // model_axis, model_axis)
  case = _case(
    model,
    topology,
    [f'--gin.MESH_SHAPE={mesh}', *AT_SCALE],
    f'{size} CALM fine-tuning at batch {TRAIN_BATCH}, lengths 512/128, '
    'packed, layers scanned, minimal remat, 2D parameter sharding',
  )
  return {**case, 'matrix': {'kind': 'train', 'size': size}}


def decode_case(size: str, topology: str, batch: int) -> dict:
  model, _, parallel = SIZES[size]
  layers = DECODER_LAYERS[model]
  exits = sorted({max(1, round(f * layers)) for f in EXIT_FRACTIONS})
  llama = model.startswith('calm_llama')
  # T5 at the demo's softmax exits, Llama at SmolLM2's classifier exits
  # (a softmax over a 49k-128k vocabulary per layer is what CALM's
  # classifier is for).
  measure, histograms = (
    ('classifier', 'real_model') if llama else ('softmax', 'reproduction')
  )
  case = _case(
    model,
    topology,
    [
      *DECODE_ONLY,
      '--gin.calm_jax.plan.decoders=False',
      f'--gin.calm_jax.plan.decode_batch_sizes=({batch},)',
      f'--gin.calm_jax.plan.decode_model_parallelism='
      f'{min(parallel, num_devices(topology))}',
      f"--gin.calm_jax.plan.measures=('{measure}',)",
      f'--gin.calm_jax.plan.token_exit_layers={tuple(exits)}',
      f"--gin.calm_jax.plan.histograms='{histograms}'",
    ],
    f'{size} one-position decode programs at batch {batch}, prompt 512, '
    '128 generated',
  )
  return {**case, 'matrix': {'kind': 'decode', 'size': size, 'batch': batch}}


for _size in SIZES:
  for _topology in FIT_TOPOLOGIES:
    CASES[f'fit_{_size}_{_tag(_topology)}'] = fit_case(_size, _topology)
  for _topology in DECODE_TOPOLOGIES:
    for _batch in DECODE_BATCHES:
      CASES[f'decode_{_size}_{_tag(_topology)}_b{_batch}'] = decode_case(
        _size, _topology, _batch
      )


def _fits(result: dict) -> bool:
  return 'error' not in result and all(r['fits'] for r in result['train'])


def fit_search(size: str, run, results: dict) -> None:
  """The size's train step on the smallest topology where it fits (the
  larger ones not compiled), and on v5e-256."""
  names = [f'fit_{size}_{_tag(t)}' for t in FIT_TOPOLOGIES]
  # A search starts over: an earlier one's results (the committed report's)
  # above the slice that fits now would stand beside the new ones.
  for name in names:
    results.pop(name, None)
  for name in names:
    results[name] = run(name)
    if _fits(results[name]):
      break
  if names[-1] not in results:
    results[names[-1]] = run(names[-1])


def drop_stale_searches(results: dict, fresh: dict) -> None:
  """Drops from `results` (the committed report) the fit cases of every
  size that `fresh` (runs/) searched again: a new search stops where that
  size fits now, so the report's cases beyond it are an old search's."""
  train = lambda name: CASES.get(name, {}).get('matrix', {}).get('kind')
  searched = {CASES[n]['matrix']['size'] for n in fresh if train(n) == 'train'}
  stale = [
    name
    for name in results
    if name not in fresh
    and train(name) == 'train'
    and CASES[name]['matrix']['size'] in searched
  ]
  for name in stale:
    del results[name]


def matrix_names(size: str) -> list[str]:
  """The decode cases of a size, in the order they run."""
  return [
    f'decode_{size}_{_tag(t)}_b{b}'
    for t in DECODE_TOPOLOGIES
    for b in DECODE_BATCHES
  ]


def _run_streamed(command, timeout: int) -> tuple[int, str, bool]:
  """Runs a planner process with its compile notices passed on as they
  come (a case compiles for minutes): (exit status, the last of its
  stderr, whether it was stopped at `timeout` seconds)."""
  process = subprocess.Popen(
    command, cwd=ROOT, stderr=subprocess.PIPE, text=True, bufsize=1
  )
  stopped = []

  def stop():
    stopped.append(True)
    process.kill()

  watchdog = threading.Timer(timeout, stop)
  watchdog.start()
  tail = collections.deque(maxlen=200)
  try:
    for line in process.stderr:
      sys.stderr.write(line)
      tail.append(line)
    process.wait()
  finally:
    watchdog.cancel()
  return process.returncode, ''.join(tail), bool(stopped)


def _commit() -> str:
  """The checkout a case is planned at (its short hash, '+' if the tree
  has changes), so that the report tells results of different code apart."""
  git = lambda *a: subprocess.run(
    ['git', *a], cwd=ROOT, capture_output=True, text=True, check=False
  ).stdout.strip()
  head = git('rev-parse', '--short', 'HEAD') or 'unknown'
  return head + ('+' if git('status', '--porcelain', '--', 'calm_jax') else '')


def run_case(name: str, case: dict, timeout: int) -> dict:
  output = RUNS / f'{name}.json'
  if output.exists():
    return json.loads(output.read_text())
  command = [
    sys.executable,
    '-m',
    'calm_jax.plan',
    f'--gin_file=gin/models/{case["model"]}.gin',
    '--gin_file=gin/runs/plan.gin',
    f"--gin.TOPOLOGY='{case['topology']}'",
    f"--gin.OUTPUT='{output}'",
    f"--gin.calm_jax.plan.name='{case['model']}'",
    *case['args'],
  ]
  print(f'[{name}] {" ".join(command[2:])}', file=sys.stderr, flush=True)
  start, commit = time.perf_counter(), _commit()  # the code the child runs
  returncode, stderr, timed_out = _run_streamed(command, timeout)
  if timed_out:
    return {'case': name, **case, 'error': f'not finished in {timeout} s'}
  if returncode == 0:
    result = json.loads(output.read_text()) | {'commit': commit}
    files.atomic_write_json(output, result)
    return result
  lines = [l for l in stderr.splitlines() if l.startswith('error: ')]
  record = {
    'case': name,
    **case,
    'error': lines[-1][7:] if lines else stderr[-500:],
    'returncode': returncode,  # 2: the planner's refusal; else a failure
    'commit': commit,
    'seconds': time.perf_counter() - start,
  }
  if returncode == 2:  # a refusal: kept, as a finished case
    files.atomic_write_json(output, record)
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument(
    '--cases',
    default=','.join(n for n, c in CASES.items() if 'matrix' not in c),
    help='named cases (default: every case outside the sizes matrix)',
  )
  parser.add_argument(
    '--sizes',
    default=','.join(SIZES),
    help="the sizes matrix's sizes ('' for none)",
  )
  parser.add_argument(
    '--matrix', default='train,decode', help='train, decode or both'
  )
  parser.add_argument('--render', action='store_true')
  parser.add_argument('--timeout', type=int, default=3600)
  args = parser.parse_args()
  RUNS.mkdir(parents=True, exist_ok=True)
  # The committed report is the base: a case not run again here (runs/ is
  # not in the repository) keeps the result it has there.
  report = ROOT / 'docs' / 'tpu_plan.json'
  results = json.loads(report.read_text()) if report.exists() else {}
  if args.render:
    fresh = {
      name: json.loads((RUNS / f'{name}.json').read_text())
      for name in CASES
      if (RUNS / f'{name}.json').exists()
    }
    drop_stale_searches(results, fresh)
    results.update(fresh)
  else:
    run = lambda name: run_case(name, CASES[name], args.timeout)
    for name in filter(None, args.cases.split(',')):
      results[name] = run(name)
    for size in filter(None, args.sizes.split(',')):
      if 'train' in args.matrix:
        fit_search(size, run, results)
      if 'decode' in args.matrix:
        for name in matrix_names(size):
          results[name] = run(name)
  for name, result in results.items():
    if name in CASES:
      result['note'] = CASES[name]['note']
      if 'matrix' in CASES[name]:
        result['matrix'] = CASES[name]['matrix']
  files.atomic_write_json(report, results)
  files.atomic_write_text(
    ROOT / 'docs' / 'tpu_plan.md', tpu_plan_markdown.render(results)
  )
  print('wrote docs/tpu_plan.md and docs/tpu_plan.json', file=sys.stderr)


if __name__ == '__main__':
  os.environ.setdefault('CALM_PROGRESS', '0')
  main()
