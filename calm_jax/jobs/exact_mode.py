"""The exact-mode job: is it exact, and what does it cost?

On the demo model (runs/demo/model, `make demo`) and on the paper's small
dims with random weights:
1. Exactness: the exact mode's greedy tokens against the static full-depth
   decoder's on every test input of each embedded task (ragged lengths), at
   several batch sizes; mismatches are counted with the full model's top-2
   logit gap, never hidden.
2. Speed: full depth, calibrated CALM (the demo's softmax delta-0.25
   certificate per task) and the exact mode drafted by that same early
   exit, timed in turns on the same inputs after compiling, medians; with
   the exact mode's acceptance rate, tokens per verify pass and layers per
   token (drafts included).
Writes docs/exact_mode.json and docs/exact_mode.md.
"""

import dataclasses
import os
from typing import Optional
from typing import Sequence

from etils import epy
import gin
import jax
import numpy as np

from calm_jax import arguments
from calm_jax import console
from calm_jax.analysis import exact_mode_markdown
from calm_jax.calibration import records
from calm_jax.data import examples as examples_lib
from calm_jax.decoding import speculative
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.storage import files

with epy.lazy_imports():
  from calm_jax.data import pipeline

READS = ('calm_jax.exact_mode',)
DEFAULT_GIN_FILES = ('gin/runs/exact_mode.gin',)
TASKS = ('synth_summarize', 'synth_translate', 'synth_qa')


class _Ids:
  """Ids as text, for the random model."""

  def decode(self, ids):
    return ' '.join(map(str, ids))

  def pieces(self, ids):
    return [str(i) for i in ids]


def random_examples(
  count: int,
  input_length: int,
  output_length: int,
  vocab_size: int,
  seed: int = 0,
) -> examples_lib.ExampleSet:
  """Random inputs of ragged lengths (EOS last), for the random model."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(count):
    length = int(rng.integers(input_length // 2, input_length))
    ids = rng.integers(2, vocab_size, length - 1).tolist() + [1]
    rows.append(examples_lib.Example(inputs=str(i), input_ids=tuple(ids)))
  return examples_lib.ExampleSet(
    name='random',
    fingerprint={'random': seed, 'count': count},
    lengths={'inputs': input_length, 'targets': output_length},
    examples=tuple(rows),
    vocabulary=_Ids(),
  )


def exactness(
  model: loaded_lib.LoadedModel,
  examples: examples_lib.ExampleSet,
  mode: modes.Speculative,
  batch_sizes: Sequence[int],
) -> list:
  """Greedy tokens of the exact mode against the static decoder's."""
  rows = []
  for batch in batch_sizes:
    evaluator = engine.Evaluator(
      decoder_lib.Decoder(model), batch_size=batch, progress=False
    )
    full = evaluator.decode(examples, modes.FullDepth())
    exact = evaluator.decode(examples, mode)
    differing = [
      i
      for i, (a, b) in enumerate(zip(full.outputs, exact.outputs))
      if a['token_ids'] != b['token_ids']
    ]
    summary = exact.speculative_summary()
    rows.append(
      {
        'examples': examples.name,
        'batch_size': batch,
        'inputs': len(examples),
        'tokens': full.tokens,
        'differing_outputs': len(differing),
        'near_ties': summary['near_ties'],
        'first_differing': differing[:5],
      }
    )
    console.info(
      f'{examples.name} batch {batch}: {len(differing)} of '
      f'{len(examples)} outputs differ'
    )
  return rows


def speed(
  model: loaded_lib.LoadedModel,
  examples: examples_lib.ExampleSet,
  calm: modes.EarlyExit,
  exact: modes.Speculative,
  batch_sizes: Sequence[int],
  repeats: int,
  passes_of: int,
) -> list:
  """Full depth vs CALM vs the exact mode, in turns, per batch size."""
  rows = []
  for batch in batch_sizes:
    evaluator = engine.Evaluator(
      decoder_lib.Decoder(model), batch_size=batch, progress=False
    )
    count = min(len(examples), max(passes_of, batch * 2))
    speeds = evaluator.speedups(
      examples,
      {'calm': calm, 'exact': exact},
      batch_size=batch,
      repeats=repeats,
      num_examples=count,
      alternate='pass',
    )
    subset = dataclasses.replace(examples, examples=examples.examples[:count])
    costs = evaluator.decode(subset, exact).speculative_summary()
    layers = evaluator.decode(subset, calm).avg_layers
    rows.append(
      {
        'examples': examples.name,
        'batch_size': batch,
        'inputs': count,
        'calm_speedup': speeds['calm'].ratio,
        'calm_range': [speeds['calm'].low, speeds['calm'].high],
        'calm_avg_layers': layers,
        'exact_speedup': speeds['exact'].ratio,
        'exact_range': [speeds['exact'].low, speeds['exact'].high],
        **{
          k: costs[k]
          for k in ('acceptance_rate', 'tokens_per_pass', 'layers_per_token')
        },
      }
    )
    console.info(
      f'{examples.name} batch {batch}: CALM x{rows[-1]["calm_speedup"]:.2f}'
      f', exact x{rows[-1]["exact_speedup"]:.2f} '
      f'(acceptance {costs["acceptance_rate"]:.2f})'
    )
  return rows


def _modes(
  model: loaded_lib.LoadedModel,
  choice: records.ThresholdChoice,
  gamma: int,
  forced_layer: Optional[int] = None,
):
  """CALM at the chosen threshold, and the exact mode drafted by it."""
  config = model.exit_config('softmax')
  draft = speculative.DraftConfig(
    config, gamma=gamma, forced_layer=forced_layer
  )
  return (
    modes.EarlyExit(config, choice.value),
    modes.Speculative(draft, records.exact_mode_draft(choice).value),
  )


def demo_rows(model_dir: str, settings: dict) -> Optional[dict]:
  """Exactness and speed on the demo model, per task (None without it)."""
  if not files.exists(files.join(model_dir, model_files.MODEL_JSON)):
    console.info(f'no demo model in {model_dir} (make demo): skipped')
    return None
  model = loaded_lib.load(model_dir)
  out = {'exactness': [], 'speed': [], 'thresholds': {}}
  for task in TASKS:
    choice = records.choose_threshold(
      model_dir, model.fingerprint, None, 'softmax', task=task
    )
    out['thresholds'][task] = {'value': choice.value, 'source': choice.source}
    calm, exact = _modes(model, choice, settings['gamma'])
    examples = pipeline.task_examples(
      task, 'test', num_examples=settings['exactness_inputs']
    )
    out['exactness'] += exactness(
      model, examples, exact, settings['exactness_batches']
    )
    out['speed'] += speed(
      model,
      examples,
      calm,
      exact,
      settings['speed_batches'],
      settings['repeats'],
      settings['timing_inputs'],
    )
  return out


def paper_small_rows(settings: dict) -> dict:
  """The paper's small dims with random weights: exits never confident,
  drafts at a fixed layer (layer 2) rarely accepted."""
  model = models.CalmModel(network.T5Config())
  params = model.init_params(jax.random.PRNGKey(0))['params']
  loaded = loaded_lib.in_memory(model, params, name='paper_small_random')
  examples = random_examples(
    settings['timing_inputs'] * 2, 64, 32, network.T5Config().vocab_size
  )
  calm, exact = _modes(
    loaded,
    records.ThresholdChoice(0.9, None, 'given'),
    settings['gamma'],
    forced_layer=2,
  )
  return {
    'exactness': exactness(loaded, examples, exact, (1, 8)),
    'speed': speed(
      loaded,
      examples,
      calm,
      exact,
      settings['speed_batches'],
      settings['repeats'],
      settings['timing_inputs'],
    ),
  }


@gin.configurable(module='calm_jax')
def exact_mode(
  *,
  demo_model_dir: str = 'runs/demo/model',
  output: str = 'docs/exact_mode.md',
  gamma: int = 4,
  exactness_inputs: int = 500,
  exactness_batches: Sequence[int] = (1, 4, 16),
  speed_batches: Sequence[int] = (1, 8, 32),
  timing_inputs: int = 32,
  repeats: int = 3,
  check_only: bool = False,
) -> Optional[dict]:
  """Measures exactness and speed; writes `output` and its JSON."""
  arguments.check(
    gamma=gamma,
    num_examples=exactness_inputs,
    repeats=repeats,
    timing_examples=timing_inputs,
  )
  for batch in (*exactness_batches, *speed_batches):
    arguments.check(batch_size=batch)
  if check_only:
    return None
  settings = dict(
    gamma=gamma,
    exactness_inputs=exactness_inputs,
    exactness_batches=tuple(exactness_batches),
    speed_batches=tuple(speed_batches),
    timing_inputs=timing_inputs,
    repeats=repeats,
  )
  saved = os.path.join(
    os.path.dirname(os.path.abspath(output)), 'exact_mode.json'
  )
  results = {'settings': settings, 'devices': [str(d) for d in jax.devices()]}
  # Each model's rows are written once measured: a run that stops after
  # the demo's keeps them ('complete' false until the end).
  for name, rows in (
    ('demo', lambda: demo_rows(demo_model_dir, settings)),
    ('paper_small_random', lambda: paper_small_rows(settings)),
  ):
    results[name] = rows()
    files.atomic_write_json(saved, {**results, 'complete': False})
  results['complete'] = True
  files.atomic_write_json(saved, results)
  files.atomic_write_text(output, exact_mode_markdown.render(results))
  console.info(f'wrote {output}')
  return results


def run(check_only: bool = False) -> None:
  exact_mode(check_only=check_only)
