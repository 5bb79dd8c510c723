"""Measurements behind the reproduction report (calm_jax.report).

Each function measures one of the paper's findings on a trained model dir and
returns plain dicts. Calibration uses the validation split; every reported
quality, layer count, FLOPs ratio and speed-up comes from the test split.
Decodes go through the calibration cache (MODEL_DIR/calibration/cache), so a
rerun after an interruption redoes only what is missing. Speed-ups compare
the full-depth and the early-exit decode of the same test inputs at batch 1
as in the paper, after compile, alternating on every input; medians over
repeated passes.
Imports the data path (TensorFlow): entry points only.
"""
import dataclasses
import functools
import statistics
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import api
from calm_jax.jobs import calibrate
from calm_jax.calibration import ltt
from calm_jax.data import pipeline
from calm_jax.decoding import loops
from calm_jax.evaluation import engine
from calm_jax.analysis import flops
from calm_jax.evaluation import timing

FULL = calibrate.FULL
GRID = ltt.descending_grid(1.0, 0.0, 0.05)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every measurement shares."""
  lm: api.CalmLM
  cal_examples: int
  test_examples: int
  timing_examples: int
  batch_size: int = 32
  epsilon: float = 0.05
  repeats: int = 5

  def cache(self, measure: str, split: str, tau=None
            ) -> calibrate.DecodeCache:
    return _cache(self, measure, split, tau)


@functools.lru_cache(maxsize=None)
def _cache(setup: Setup, measure: str, split: str, tau
           ) -> calibrate.DecodeCache:
  examples = setup.cal_examples if split == 'validation' else (
      setup.test_examples)
  return calibrate.DecodeCache(setup.lm, measure=measure, tau=tau,
                               split=split, num_examples=examples,
                               batch_size=setup.batch_size, min_exit=1)


def headline(task: str, references: Sequence, predictions: Sequence[str]
             ) -> tuple[str, float]:
  scores = engine.task_metric_fn(task)(list(references),
                                           list(predictions))
  name = pipeline.headline_metric(task, scores)
  return name, float(scores[name])


def certify(setup: Setup, task: str, measure: str, consistency: str,
            delta: float, tau=None) -> Optional[float]:
  """The threshold Learn then Test certifies on the validation split."""
  cache = setup.cache(measure, 'validation', tau)
  result = ltt.fixed_sequence_test(
      GRID, lambda t: calibrate.losses_at_threshold(cache, [task],
                                                    consistency, t),
      delta=delta, epsilon=setup.epsilon)
  return result.threshold


def flops_ratio(setup: Setup, task: str, measure: str,
                full_exits: list, early_exits: list) -> float:
  """Decoder FLOPs of the full-depth decode over those of the early-exit
  decode (confidence heads and K/V fills of skipped layers counted)."""
  cfg = setup.lm.config
  lengths = pipeline.feature_lengths(task)
  shape = dict(batch_size=1, input_length=lengths['inputs'],
               cache_length=lengths['targets'])
  static = flops.static_flops(cfg, num_tokens=sum(map(len, full_exits)),
                              **shape)
  allowed = exit_config(setup, measure).exit_layers
  early = flops.early_exit_flops(
      cfg, [l for row in early_exits for l in row], measure=measure,
      allowed_exits=allowed, **shape)
  return static / early


def test_outcome(setup: Setup, task: str, measure: str, consistency: str,
                 threshold: Optional[float], tau=None) -> dict:
  """Quality, risk, layers, FLOPs and speed on the test split at a
  certified threshold (None: no exit certified, the full model)."""
  cache = setup.cache(measure, 'test', tau)
  full = cache.get(task, FULL)
  early = full if threshold is None else cache.get(task, threshold)
  metric, quality = headline(task, full['targets'], early['predictions'])
  losses = ltt.consistency_losses(
      consistency, pipeline.per_example_metric(task), early['predictions'],
      full['predictions'], references=full['targets'])
  layers = [l for row in early['exit_layers'] for l in row]
  return {
      'threshold': threshold, 'metric': metric, 'quality': quality,
      'full_quality': headline(task, full['targets'],
                               full['predictions'])[1],
      'test_risk': float(losses.mean()),
      'avg_layers': float(np.mean(layers)),
      'flops_ratio': (1.0 if threshold is None else flops_ratio(
          setup, task, measure, full['exit_layers'], early['exit_layers'])),
      **_speed_fields(setup, task, measure, threshold, tau),
      'exit_layers': layers}


def _speed_fields(setup, task, measure, threshold, tau) -> dict:
  if threshold is None:  # the full model itself
    return {'speedup': 1.0, 'speedup_range': [1.0, 1.0]}
  median, low, high = speedup(setup, task, measure, threshold, tau)
  return {'speedup': median, 'speedup_range': [low, high]}


# --- wall-clock speed ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _timing_inputs(setup: Setup, task: str) -> tuple:
  batches = engine.eval_batches(task, 'test', batch_size=1,
                                    num_examples=setup.timing_examples)
  return tuple(jnp.asarray(b.encoder_tokens) for b in batches)


@functools.lru_cache(maxsize=None)
def _static_fn(setup: Setup, max_length: int):
  model = setup.lm.model
  return jax.jit(lambda p, e: model.decode_static(p, e, max_length).tokens)


def exit_config(setup: Setup, measure: str, tau=None,
                propagation: str = 'hidden') -> loops.ExitConfig:
  """The exit settings of the model dir for a measure (and tau, propagation)."""
  cfg = setup.lm.config
  return loops.ExitConfig.create(
      cfg.num_decoder_layers, confidence=measure, first_exit=cfg.first_exit,
      exit_interval=cfg.exit_interval, tau=tau, propagation=propagation)


@functools.lru_cache(maxsize=None)
def speedup(setup: Setup, task: str, measure: str, threshold: float,
            tau=None) -> tuple[float, float, float]:
  """Full-depth seconds over early-exit seconds, same test inputs at batch
  1, alternating on every input after compile: the ratio of the medians
  over repeated passes, and the lowest and highest per-pass ratio."""
  lm = setup.lm
  length = pipeline.feature_lengths(task)['targets']
  inputs = _timing_inputs(setup, task)
  static = _static_fn(setup, length)
  early = engine.early_exit_fn(
      lm.model, exit_config(setup, measure, tau).for_threshold(threshold),
      length)
  classifier = lm.classifier_for(measure)
  key = jax.random.PRNGKey(0)
  runs = {'full': lambda e: static(lm.params, e),
          'early': lambda e: early(lm.params, classifier, e, threshold, key)}
  for fn in runs.values():  # compile
    jax.block_until_ready(fn(inputs[0]))
  times = timing.alternating_seconds(runs, inputs, setup.repeats)
  per_pass = [f / e for f, e in zip(times['full'], times['early'])]
  return (statistics.median(times['full']) / statistics.median(times['early']),
          min(per_pass), max(per_pass))


# --- oracle, truncated models and state propagation ----------------------

def _test_batches(setup: Setup, task: str) -> list:
  return list(engine.eval_batches(task, 'test',
                                      batch_size=setup.batch_size,
                                      num_examples=setup.test_examples))


def _texts(task: str, batches, outputs) -> list[str]:
  return [pipeline.decode_text(task, np.asarray(out.tokens[row]))
          for batch, out in zip(batches, outputs)
          for row in range(batch.num_real)]


def _real_layers(batches, outputs) -> list[int]:
  layers = []
  for batch, out in zip(batches, outputs):
    rows = np.asarray(out.exit_layers[:batch.num_real])
    layers += rows[rows > 0].tolist()
  return layers


def oracle(setup: Setup, task: str) -> dict:
  """The consistency oracle: each token's first layer whose argmax equals
  the full model's; its tokens are the full model's."""
  lm = setup.lm
  length = pipeline.feature_lengths(task)['targets']
  fn = jax.jit(lambda p, e: lm.model.decode_static(p, e, length,
                                                   oracle=True))
  batches = _test_batches(setup, task)
  outputs = [jax.device_get(fn(lm.params, jnp.asarray(b.encoder_tokens)))
             for b in batches]
  references = [r for b in batches for r in b.references]
  metric, quality = headline(task, references, _texts(task, batches,
                                                      outputs))
  return {'avg_layers': float(np.mean(_real_layers(batches, outputs))),
          'metric': metric, 'quality': quality, 'outputs': outputs}


@functools.lru_cache(maxsize=None)
def _forced_fn(setup: Setup, length: int, propagation: str):
  model = setup.lm.model
  settings = exit_config(setup, 'softmax', propagation=propagation)
  return jax.jit(lambda p, e, forced: model.decode_early_exit(
      p, e, length, exit_config=settings, threshold=0.0,
      forced_exit_layers=forced))


def forced_exits(setup: Setup, task: str, exits_per_batch: Sequence,
                 propagation: str) -> dict:
  """Decodes the test split with given exit layers [b, t] per batch."""
  lm = setup.lm
  length = pipeline.feature_lengths(task)['targets']
  fn = _forced_fn(setup, length, propagation)
  batches = _test_batches(setup, task)
  outputs = [jax.device_get(fn(lm.params, jnp.asarray(b.encoder_tokens),
                               jnp.asarray(np.maximum(exits, 1))))
             for b, exits in zip(batches, exits_per_batch)]
  references = [r for b in batches for r in b.references]
  texts = _texts(task, batches, outputs)
  metric, quality = headline(task, references, texts)
  return {'metric': metric, 'quality': quality, 'predictions': texts,
          'avg_layers': float(np.mean(_real_layers(batches, outputs)))}


def truncated_curve(setup: Setup, task: str) -> list[tuple[float, float]]:
  """(k, quality) of static models that always stop at layer k."""
  length = pipeline.feature_lengths(task)['targets']
  shapes = [(b.encoder_tokens.shape[0], length)
            for b in _test_batches(setup, task)]
  return [(float(k), forced_exits(setup, task, [np.full(s, k, np.int32)
                                                for s in shapes],
                                  'hidden')['quality'])
          for k in range(1, setup.lm.config.num_decoder_layers + 1)]


def propagation_ablation(setup: Setup, task: str, exits_per_batch: Sequence
                         ) -> dict:
  """Quality and agreement with the full model per propagation mode, all at
  the same exit layers."""
  cache = setup.cache('softmax', 'test')
  full = cache.get(task, FULL)['predictions']
  out = {}
  for mode in loops.PROPAGATIONS:
    result = forced_exits(setup, task, exits_per_batch, mode)
    losses = ltt.consistency_losses(
        'textual', pipeline.per_example_metric(task), result['predictions'],
        full)
    out[mode] = {'quality': result['quality'], 'metric': result['metric'],
                 'agreement_with_full': float(1 - losses.mean()),
                 'avg_layers': result['avg_layers']}
  return out


def early_exit_curve(setup: Setup, task: str, measure: str,
                     thresholds: Sequence[float]) -> list[tuple[float, float]]:
  """(avg layers, quality) of early exit over a threshold sweep (test)."""
  cache = setup.cache(measure, 'test')
  references = cache.get(task, FULL)['targets']
  points = []
  for threshold in thresholds:
    early = cache.get(task, threshold)
    layers = [l for row in early['exit_layers'] for l in row]
    points.append((float(np.mean(layers)),
                   headline(task, references, early['predictions'])[1]))
  return points
