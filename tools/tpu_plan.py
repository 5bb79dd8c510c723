"""`make tpu-plan`: the TPU plans of the documented cases, then
docs/tpu_plan.md and docs/tpu_plan.json from them.

Each case is one `python -m calm_jax.plan` process (its JSON in
runs/tpu_plan/, kept: a finished case is not compiled again, so an
interrupted run resumes); a case that does not fit is recorded with the
planner's one-line refusal. `--cases a,b` runs some; `--render` only
renders what runs/tpu_plan/ holds over docs/tpu_plan.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / 'runs' / 'tpu_plan'
sys.path.insert(0, str(ROOT))

from calm_jax.analysis import tpu_plan_markdown  # noqa: E402
from calm_jax.storage import files  # noqa: E402

TRAIN_ONLY = [
  "--gin.calm_jax.plan.stages=('model',)",
  '--gin.calm_jax.plan.decoders=False',
  '--gin.calm_jax.plan.token_costs=False',
]
DECODE_ONLY = ['--gin.calm_jax.plan.stages=()']
# As t5x's step that the issue measured: unpacked batches.
YARDSTICK = [*TRAIN_ONLY, '--gin.PACK=False']


def _case(model, topology, extra, note):
  return {'model': model, 'topology': topology, 'args': extra, 'note': note}


CASES = {
  # The yardstick: batch 32, lengths 512/128, mesh (2, 2).
  't5_small_train_b32': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    ['--gin.BATCH_SIZE=32', '--gin.MESH_SHAPE=(2, 2)', *YARDSTICK],
    "t5x's plain step at these dims: temp 1.09 GiB, 1.24 TFLOP, 21.2 GB. "
    "Before the streamed loss (every exit's logits at once, 7e708b0): "
    'temp 5.39 GiB, 1.73 TFLOP, 48.7 GB',
  ),
  't5_base_train_b32': _case(
    'calm_t5_1_1_base',
    'v5e:2x2',
    ['--gin.BATCH_SIZE=32', '--gin.MESH_SHAPE=(2, 2)', *YARDSTICK],
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
    [
      '--gin.BATCH_SIZE=32',
      '--gin.MESH_SHAPE=(2, 2)',
      "--gin.REMAT_POLICY='minimal'",
      *YARDSTICK,
    ],
    "the yardstick case with minimal remat (each layer's matmul outputs "
    'kept, the rest recomputed)',
  ),
  't5_small_train_b32_2d': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    [
      '--gin.BATCH_SIZE=32',
      '--gin.MESH_SHAPE=(2, 2)',
      '--gin.PARAMETER_PARTITIONING_DIMS=2',
      *YARDSTICK,
    ],
    "the yardstick case with 2D parameter sharding: the parameters' and "
    "optimizer state's bytes split over 'data' too",
  ),
  't5_small_train_b32_scan': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    [
      '--gin.BATCH_SIZE=32',
      '--gin.MESH_SHAPE=(2, 2)',
      '--gin.SCAN_LAYERS=True',
      *YARDSTICK,
    ],
    'the yardstick case with the layers scanned (SCAN_LAYERS)',
  ),
  't5_small_train_b32_scan_minimal_remat': _case(
    'calm_t5_1_1_small',
    'v5e:2x2',
    [
      '--gin.BATCH_SIZE=32',
      '--gin.MESH_SHAPE=(2, 2)',
      '--gin.SCAN_LAYERS=True',
      "--gin.REMAT_POLICY='minimal'",
      *YARDSTICK,
    ],
    "the yardstick case as t5x's scalable T5 runs: layers scanned, minimal "
    'remat',
  ),
  't5_base_train_b32_scan_minimal_remat': _case(
    'calm_t5_1_1_base',
    'v5e:2x2',
    [
      '--gin.BATCH_SIZE=32',
      '--gin.MESH_SHAPE=(2, 2)',
      '--gin.SCAN_LAYERS=True',
      "--gin.REMAT_POLICY='minimal'",
      *YARDSTICK,
    ],
    "the base yardstick case as t5x's scalable T5 runs: layers scanned, "
    'minimal remat',
  ),
  't5_base_train_b32_scan': _case(
    'calm_t5_1_1_base',
    'v5e:2x2',
    [
      '--gin.BATCH_SIZE=32',
      '--gin.MESH_SHAPE=(2, 2)',
      '--gin.SCAN_LAYERS=True',
      *YARDSTICK,
    ],
    'the base yardstick case with the layers scanned (SCAN_LAYERS)',
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
  start = time.perf_counter()
  try:
    done = subprocess.run(
      command, cwd=ROOT, stderr=subprocess.PIPE, text=True, timeout=timeout
    )
  except subprocess.TimeoutExpired:
    return {'case': name, **case, 'error': f'not finished in {timeout} s'}
  sys.stderr.write(done.stderr)
  if done.returncode == 0:
    return json.loads(output.read_text())
  lines = [l for l in done.stderr.splitlines() if l.startswith('error: ')]
  record = {
    'case': name,
    **case,
    'error': lines[-1][7:] if lines else done.stderr[-500:],
    'seconds': time.perf_counter() - start,
  }
  if done.returncode == 2:  # a refusal: kept, as a finished case
    files.atomic_write_json(output, record)
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--render', action='store_true')
  parser.add_argument('--timeout', type=int, default=3600)
  args = parser.parse_args()
  RUNS.mkdir(parents=True, exist_ok=True)
  # The committed report is the base: a case not run again here (runs/ is
  # not in the repository) keeps the result it has there.
  report = ROOT / 'docs' / 'tpu_plan.json'
  results = json.loads(report.read_text()) if report.exists() else {}
  for name in args.cases.split(','):
    output = RUNS / f'{name}.json'
    if args.render:
      if output.exists():
        results[name] = json.loads(output.read_text())
      continue
    results[name] = run_case(name, CASES[name], args.timeout)
  for name, result in results.items():
    if name in CASES:
      result['note'] = CASES[name]['note']
  files.atomic_write_json(report, results)
  files.atomic_write_text(
    ROOT / 'docs' / 'tpu_plan.md', tpu_plan_markdown.render(results)
  )
  print('wrote docs/tpu_plan.md and docs/tpu_plan.json', file=sys.stderr)


if __name__ == '__main__':
  os.environ.setdefault('CALM_PROGRESS', '0')
  main()
