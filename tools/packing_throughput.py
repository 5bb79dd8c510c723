"""What packing gains: target tokens trained per second of the demo config's
train step, on packed batches (SeqIO's packing feature converter, the
training default) and on unpacked ones, in alternating rounds after
compiling both, per task.

  .venv/bin/python tools/packing_throughput.py [--rounds 5] [--steps 6]

Tasks: the demo's stand-in mixture and each of its tasks, and the paper's
three tasks under TFDS mock data (their feature lengths, the embedded
stand-in vocabulary; mock texts are random, so their lengths say nothing of
the real datasets'). Writes docs/packing.json and docs/packing.md
(`make bench-packing`). Ratios from one run on this machine; absolute rates
are noise.
"""

import argparse
import contextlib
import os
import statistics
import time

import gin
import jax
import numpy as np

from calm_jax import cli
from calm_jax.analysis import report_markdown
from calm_jax.data import pipeline
from calm_jax.jobs import train as train_job
from calm_jax.model import models
from calm_jax.parallel import partitioning
from calm_jax.storage import files
from calm_jax.tasks import data_settings
from calm_jax.training import trainer

CONFIG = 'gin/experiments/demo_train.gin'
STANDIN_VOCAB = os.path.join('tasks', 'vocab', 'calm_synth.model')
PAPER_TASKS = ('cnn_dailymail_v3', 'wmt15_enfr', 'squad_v010_allanswers')
PAPER_BATCH = 8  # their 256-512 input tokens on this CPU


def target_tokens(batch) -> int:
  return int(np.sum(np.asarray(batch['decoder_loss_weights']) > 0))


def rates_of(task, batch_size, rounds, steps, context) -> dict:
  """Target tokens per second, packed and unpacked, alternating."""
  optimizer = train_job.make_optimizer()
  objective = trainer.model_objective(models.CalmModel(train_job.T5Config()))
  mesh = partitioning.make_mesh()
  place = trainer.placement(objective, optimizer, mesh)
  rng = partitioning.replicate(jax.random.PRNGKey(0), mesh)
  step = trainer.TrainStep(objective, optimizer, place)
  variants = {}
  for name, pack in (('packed', True), ('unpacked', False)):
    with context():
      host = pipeline.first_batches(
        task, 'train', batch_size=batch_size, batches_per_task=4, pack=pack
      )
    batches = [partitioning.global_batch(b, mesh) for b in host]
    state = jax.device_put(
      trainer.init_state(objective, optimizer, rng), place.state
    )
    for batch in batches:  # compiles every shape, warms up
      state, _ = step(state, batch, rng)
    variants[name] = {
      'batches': batches,
      'tokens': [target_tokens(b) for b in host],
      'state': jax.block_until_ready(state),
      'rates': [],
    }
  for _ in range(rounds):
    for variant in variants.values():
      state, tokens = variant['state'], 0
      start = time.perf_counter()
      for i in range(steps):
        index = i % len(variant['batches'])
        state, _ = step(state, variant['batches'][index], rng)
        tokens += variant['tokens'][index]
      variant['state'] = jax.block_until_ready(state)
      variant['rates'].append(tokens / (time.perf_counter() - start))
  out = {}
  for name, variant in variants.items():
    rows = batch_size * len(variant['batches'])
    out[name] = {
      'target_tokens_per_second': variant['rates'],
      'median_target_tokens_per_second': statistics.median(variant['rates']),
      'target_tokens_per_row': sum(variant['tokens']) / rows,
    }
  out['speed_up'] = (
    out['packed']['median_target_tokens_per_second']
    / out['unpacked']['median_target_tokens_per_second']
  )
  return out


@contextlib.contextmanager
def mock_paper_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_settings.set_overrides(t5_vocabulary=STANDIN_VOCAB)
  try:
    with tfds.testing.mock_data(num_examples=512):
      yield
  finally:
    data_settings.set_overrides()


def measure(rounds: int, steps: int, paper: bool) -> dict:
  cli.parse([f'--gin_file={CONFIG}'])
  batch_size = gin.query_parameter('%BATCH_SIZE')
  mixture = gin.query_parameter('%MIXTURE_OR_TASK_NAME')
  cases = [(mixture, batch_size, contextlib.nullcontext)]
  cases += [
    (t, batch_size, contextlib.nullcontext)
    for t in pipeline.task_rates(mixture)
  ]
  if paper:
    cases += [(t, PAPER_BATCH, mock_paper_data) for t in PAPER_TASKS]
  results = {}
  for task, rows, context in cases:
    print(f'{task} (batch {rows}) ...', flush=True)
    with context():
      lengths = pipeline.feature_lengths(task) if task != mixture else None
    results[task] = {
      'batch_size': rows,
      'lengths': lengths,
      'mock_data': context is mock_paper_data,
      **rates_of(task, rows, rounds, steps, context),
    }
  return {
    'config': CONFIG,
    'rounds': rounds,
    'steps_per_round': steps,
    'tasks': results,
    'note': 'ratios from one run on this machine; alternating rounds after '
    'compile; absolute rates are noise',
  }


def markdown(result: dict, output: str) -> str:
  rows = [
    (
      task,
      str(r['batch_size']),
      'mock' if r['mock_data'] else 'stand-in',
      f'{r["unpacked"]["target_tokens_per_row"]:.1f}',
      f'{r["packed"]["target_tokens_per_row"]:.1f}',
      f'{r["unpacked"]["median_target_tokens_per_second"]:.0f}',
      f'{r["packed"]["median_target_tokens_per_second"]:.0f}',
      f'x{r["speed_up"]:.2f}',
    )
    for task, r in result['tasks'].items()
  ]
  return (
    '# What packing gains\n\nGenerated by `make bench-packing` '
    f'(tools/packing_throughput.py) into `{output}`: the train step of '
    f'{result["config"]} (CALM loss over every exit), '
    f'{result["rounds"]} alternating rounds of {result["steps_per_round"]} '
    'steps after compile, target tokens (loss weight > 0) per second.\n\n'
    + report_markdown.table(
      (
        'task',
        'batch',
        'data',
        'targets/row unpacked',
        'targets/row packed',
        'tokens/s unpacked',
        'tokens/s packed',
        'speed-up',
      ),
      rows,
    )
    + '\n\nThe paper tasks run on TFDS mock data (random texts) with the '
    'stand-in vocabulary: their rows show the mechanism at those feature '
    'lengths, not what the real datasets would gain. ' + result['note'] + '.\n'
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--no-paper', action='store_true')
  parser.add_argument('--output', default='docs/packing.json')
  args = parser.parse_args()
  result = measure(args.rounds, args.steps, not args.no_paper)
  files.atomic_write_json(args.output, result)
  files.atomic_write_text(
    args.output.replace('.json', '.md'), markdown(result, args.output)
  )
  for task, r in result['tasks'].items():
    print(f'{task}: x{r["speed_up"]:.2f}')
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
