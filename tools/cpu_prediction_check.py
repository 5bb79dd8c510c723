"""Checks the planner's speed-up prediction on this CPU, where the speed-up
was measured: the one-position programs the TPU plan compiles (full depth;
a token exiting after layer k under each measure) are compiled for the CPU
and timed, and those per-token times go through the planner's own
prediction (`planning.plan.predicted_speedup`: each measured exit
histogram, rows drawn independently, a position charged its deepest row)
in place of the TPU roofline bounds. The prediction is then set against
the speed-up `make reproduce` measured at the same histogram (batch 1,
encoder included, in docs/reproduction.json).

  .venv/bin/python tools/cpu_prediction_check.py [--repeats 200]

Writes docs/cpu_prediction_check.json and .md (`make check-predictions`).
What it checks is the cost model (per-exit token costs, the histogram, the
deepest row), not the TPU roofline: a TPU's per-token costs can only come
from a TPU.
"""

import argparse
import json
import statistics
import time

import gin
import jax
import numpy as np

from calm_jax import cli
from calm_jax.analysis import report_markdown
from calm_jax.data import pipeline
from calm_jax.jobs import plan as plan_job
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning
from calm_jax.planning import plan as plan_lib
from calm_jax.planning import programs
from calm_jax.storage import files

CONFIG = 'gin/models/calm_demo.gin'
MEASURES = ('softmax', 'state', 'classifier')


def concrete(tree, seed: int = 0):
  """Arrays for abstract arguments: small random values (a timing does
  not depend on them, and no NaN can slow a path down)."""
  rng = np.random.default_rng(seed)

  def make(x):
    if x is None:
      return None
    if np.issubdtype(x.dtype, np.integer):
      return jax.device_put(np.ones(x.shape, x.dtype), x.sharding)
    values = rng.standard_normal(x.shape).astype(np.float32) * 0.02
    return jax.device_put(values.astype(x.dtype), x.sharding)

  return jax.tree_util.tree_map(make, tree)


def time_program(program, repeats: int) -> float:
  """Median seconds of one call, after compile; the cache a call returns
  (donated) is the next call's."""
  args = list(concrete(program.args))
  compiled = program.fn.lower(*args).compile()
  times = []
  for _ in range(repeats + 5):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
    args[3] = out[-1]  # the updated cache
  return statistics.median(times[5:])


def token_times(model, lengths, repeats) -> dict:
  """`plan_lib.token_costs`'s layout, with measured seconds."""
  mesh = partitioning.make_mesh((1, 1), jax.devices()[:1])
  setting = programs.TokenSetting(1, lengths['inputs'], lengths['targets'])
  top = model.config.num_decoder_layers
  seconds = lambda measure, k: {
    'roofline_seconds': time_program(
      programs.exit_token(model, mesh, setting, measure, k), repeats
    )
  }
  return {
    'full': seconds('full', top),
    'exits': {
      m: {str(k): seconds(m, k) for k in model.exit_config(m).exit_layers}
      for m in MEASURES
    },
  }


def check(repeats: int) -> dict:
  cli.parse([f'--gin_file={CONFIG}'])
  model = models.CalmModel(network.T5Config())
  gin.clear_config()
  layers = model.config.num_decoder_layers
  measured = {
    (row['task'], row['measure']): row
    for row in json.loads(files.read_text(plan_job.MEASURED['reproduction']))[
      'table'
    ]
    if row['consistency'] == 'textual' and row['delta'] == 0.25
  }
  rows = []
  for task in sorted({task for task, _ in measured}):
    lengths = pipeline.feature_lengths(task)
    print(f'{task} ({lengths["inputs"]}/{lengths["targets"]}) ...', flush=True)
    costs = token_times(model, lengths, repeats)
    for measure in MEASURES:
      row = measured[(task, measure)]
      predicted = plan_lib.predicted_speedup(
        costs, measure, row['exit_layers_histogram'], 1, layers
      )
      rows.append(
        {
          'task': task,
          'measure': measure,
          'lengths': lengths,
          'avg_layers': row['avg_layers'],
          'predicted_speedup': predicted,
          'measured_speedup': row['speedup'],
          'measured_range': row['speedup_range'],
          'error_percent': 100 * (predicted / row['speedup'] - 1),
          'full_token_seconds': costs['full']['roofline_seconds'],
          'exit_token_seconds': {
            k: v['roofline_seconds'] for k, v in costs['exits'][measure].items()
          },
        }
      )
  errors = [abs(r['error_percent']) for r in rows]
  return {
    'config': CONFIG,
    'repeats': repeats,
    'rows': rows,
    'median_abs_error_percent': statistics.median(errors),
    'max_abs_error_percent': max(errors),
  }


def markdown(result: dict, output: str) -> str:
  rows = [
    (
      r['task'],
      r['measure'],
      f'{r["avg_layers"]:.2f}',
      f'{r["full_token_seconds"] * 1e3:.2f}',
      f'{r["exit_token_seconds"][min(r["exit_token_seconds"], key=int)] * 1e3:.2f}',
      f'x{r["predicted_speedup"]:.2f}',
      f'x{r["measured_speedup"]:.2f} ({r["measured_range"][0]:.2f}-'
      f'{r["measured_range"][1]:.2f})',
      f'{r["error_percent"]:+.0f}%',
    )
    for r in result['rows']
  ]
  return (
    "# The planner's speed-up prediction, checked on this CPU\n\n"
    'Generated by `make check-predictions` (tools/cpu_prediction_check.py) '
    f'into `{output}`. The demo model ({result["config"]}): its '
    'one-position programs (the ones the TPU plan compiles) timed on this '
    f'CPU, medians of {result["repeats"]} calls after compile, put through '
    "the planner's prediction at each exit histogram that `make reproduce` "
    'measured (softmax, state and classifier at delta 0.25), against the '
    'speed-up it measured there (batch 1, encoder included; range over '
    'its timing repeats).\n\n'
    + report_markdown.table(
      (
        'task',
        'measure',
        'avg layers',
        'full-depth token ms',
        'earliest exit token ms',
        'predicted',
        'measured',
        'error',
      ),
      rows,
    )
    + f'\n\nMedian error {result["median_abs_error_percent"]:.0f}%, largest '
    f'{result["max_abs_error_percent"]:.0f}%. The prediction leaves out '
    'what every position pays whatever its exit (the loop and its '
    'bucket dispatch, the encoder, the host) and what the one-position '
    'programs pay that the loop does not (not measured apart here); the '
    'per-token times themselves vary by several percent between runs on '
    'this 2-core machine. The TPU predictions in '
    '[tpu_plan.md](tpu_plan.md) use the same method on roofline bounds.\n'
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=200)
  parser.add_argument('--output', default='docs/cpu_prediction_check.json')
  args = parser.parse_args()
  result = check(args.repeats)
  files.atomic_write_json(args.output, result)
  files.atomic_write_text(
    args.output.replace('.json', '.md'), markdown(result, args.output)
  )
  print(
    f'median error {result["median_abs_error_percent"]:.0f}%; '
    f'wrote {args.output}'
  )


if __name__ == '__main__':
  main()
