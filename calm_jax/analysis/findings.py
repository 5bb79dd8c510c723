"""Measurements behind the reproduction report (the report job).

Each function measures one of the paper's findings on a trained model dir and
returns plain dicts. Calibration uses the validation split; every reported
quality, layer count, FLOPs ratio and speed-up comes from the test split.
Every decode goes through the evaluation engine and its cache
(MODEL_DIR/calibration/cache), so a rerun after an interruption redoes only
what is missing. Speed-ups compare the full-depth and the early-exit decode
of the same test inputs at batch 1 as in the paper, after compile,
alternating on every input; medians over repeated passes.
"""

import dataclasses
import functools
from typing import Callable
from typing import Optional
from typing import Sequence

from calm_jax import arguments
from calm_jax.analysis import flops
from calm_jax.calibration import ltt
from calm_jax.data import examples as examples_lib
from calm_jax.decoding import loops
from calm_jax.evaluation import certify
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes

GRID = ltt.descending_grid(1.0, 0.0, 0.05)


@dataclasses.dataclass(eq=False)
class Setup:
  """What every measurement shares: the model, its engine, the examples."""

  model: loaded_lib.LoadedModel
  load_examples: Callable  # (task, split, num_examples) -> ExampleSet
  cache_dir: Optional[str]
  cal_examples: int
  test_examples: int
  timing_examples: int
  batch_size: int = 32
  epsilon: float = 0.05
  repeats: int = 5
  _examples: dict = dataclasses.field(default_factory=dict, repr=False)

  @functools.cached_property
  def evaluator(self) -> engine.Evaluator:
    return engine.Evaluator(
      decoder_lib.Decoder(self.model),
      batch_size=self.batch_size,
      cache_dir=self.cache_dir,
    )

  def examples(self, task: str, split: str) -> examples_lib.ExampleSet:
    """A task split's examples, loaded once per Setup."""
    if (task, split) not in self._examples:
      count = self.cal_examples if split == 'validation' else self.test_examples
      self._examples[task, split] = self.load_examples(task, split, count)
    return self._examples[task, split]

  def exit_config(
    self, measure: str, tau=None, propagation: str = 'hidden'
  ) -> loops.ExitConfig:
    return self.model.exit_config(measure, tau=tau, propagation=propagation)

  def calibration(
    self,
    tasks: Sequence[str],
    measure: str,
    tau=None,
    split: str = 'validation',
  ) -> certify.Calibration:
    return certify.Calibration(
      self.evaluator,
      tuple(self.examples(t, split) for t in tasks),
      self.exit_config(measure, tau),
    )

  def decode(self, task: str, split: str, mode: modes.Mode) -> engine.Decoded:
    return self.evaluator.decode(self.examples(task, split), mode)

  def full(self, task: str, split: str = 'test') -> engine.Decoded:
    return self.decode(task, split, modes.FullDepth())

  def early(
    self,
    task: str,
    measure: str,
    threshold: Optional[float],
    tau=None,
    split: str = 'test',
  ) -> engine.Decoded:
    """The decode at a certified threshold (None: the full model)."""
    if threshold is None:
      return self.full(task, split)
    return self.decode(
      task, split, modes.EarlyExit(self.exit_config(measure, tau), threshold)
    )

  def headline(
    self, task: str, predictions: Sequence[str]
  ) -> tuple[str, float]:
    score = self.evaluator.score(self.examples(task, 'test'), predictions)
    return score.metric, score.value


def certify_threshold(
  setup: Setup,
  task: str,
  measure: str,
  consistency: str,
  delta: float,
  tau=None,
) -> Optional[float]:
  """The threshold Learn then Test certifies on the validation split."""
  return (
    setup.calibration([task], measure, tau)
    .certify(consistency, delta, setup.epsilon)
    .threshold
  )


def flops_ratio(
  setup: Setup, task: str, measure: str, full_exits: list, early_exits: list
) -> float:
  """Decoder FLOPs of the full-depth decode over those of the early-exit
  decode (confidence heads and K/V fills of skipped layers counted)."""
  lengths = setup.examples(task, 'test').lengths
  shape = dict(
    batch_size=1,
    input_length=lengths['inputs'],
    cache_length=lengths['targets'],
  )
  static = flops.static_flops(
    setup.model.config, num_tokens=sum(map(len, full_exits)), **shape
  )
  early = flops.early_exit_flops(
    setup.model.config,
    [l for row in early_exits for l in row],
    measure=measure,
    allowed_exits=setup.exit_config(measure).exit_layers,
    **shape,
  )
  return static / early


def test_outcome(
  setup: Setup,
  task: str,
  measure: str,
  consistency: str,
  threshold: Optional[float],
  tau=None,
) -> dict:
  """Quality, risk, layers, FLOPs and speed on the test split at a
  certified threshold (None: no exit certified, the full model)."""
  examples = setup.examples(task, 'test')
  full = setup.full(task)
  early = setup.early(task, measure, threshold, tau)
  losses = setup.evaluator.losses(examples, consistency, early, full)
  metric, quality = setup.headline(task, early.predictions)
  return {
    'threshold': threshold,
    'metric': metric,
    'quality': quality,
    'full_quality': setup.headline(task, full.predictions)[1],
    'test_risk': float(losses.mean()),
    'avg_layers': early.avg_layers,
    'flops_ratio': (
      1.0
      if threshold is None
      else flops_ratio(
        setup, task, measure, full.exit_layers, early.exit_layers
      )
    ),
    **_speed_fields(setup, task, measure, threshold, tau),
    'exit_layers': [l for row in early.exit_layers for l in row],
  }


def _speed_fields(setup, task, measure, threshold, tau) -> dict:
  if threshold is None:  # the full model itself
    return {'speedup': 1.0, 'speedup_range': [1.0, 1.0]}
  speed = speedup(setup, task, measure, threshold, tau)
  return {'speedup': speed.ratio, 'speedup_range': [speed.low, speed.high]}


def speedup(
  setup: Setup, task: str, measure: str, threshold: float, tau=None
) -> engine.Speed:
  """Full depth vs early exit on the same test inputs at batch 1, as the
  paper times it (memoised: several table rows share a threshold)."""
  key = (task, measure, threshold, tau)
  memo = setup.__dict__.setdefault('_speedups', {})
  if key not in memo:
    memo[key] = setup.evaluator.speedup(
      setup.examples(task, 'test'),
      modes.EarlyExit(setup.exit_config(measure, tau), threshold),
      batch_size=1,
      repeats=setup.repeats,
      num_examples=setup.timing_examples,
    )
  return memo[key]


# --- oracle, truncated models and state propagation ----------------------


def oracle(setup: Setup, task: str) -> dict:
  """The consistency oracle: each token's first layer whose argmax equals
  the full model's; its tokens are the full model's."""
  decoded = setup.decode(task, 'test', modes.FullDepth(oracle=True))
  metric, quality = setup.headline(task, decoded.predictions)
  return {
    'avg_layers': decoded.avg_layers,
    'metric': metric,
    'quality': quality,
    'exit_layers': decoded.exit_layers,
  }


def forced_exits(
  setup: Setup,
  task: str,
  propagation: str,
  *,
  layer: Optional[int] = None,
  exit_layers: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
  """Decodes the test split with every token stopping at `layer`, or at
  the given per-example exit layers (positions past a row's end: 1)."""
  mode = modes.ForcedExits(
    setup.exit_config('softmax', propagation=propagation),
    layer=layer,
    exit_layers=None
    if exit_layers is None
    else tuple(tuple(int(l) for l in row) for row in exit_layers),
  )
  decoded = setup.decode(task, 'test', mode)
  metric, quality = setup.headline(task, decoded.predictions)
  return {
    'metric': metric,
    'quality': quality,
    'predictions': decoded.predictions,
    'avg_layers': decoded.avg_layers,
  }


def truncated_curve(setup: Setup, task: str) -> list[tuple[float, float]]:
  """(k, quality) of static models that always stop at layer k."""
  return [
    (float(k), forced_exits(setup, task, 'hidden', layer=k)['quality'])
    for k in range(1, setup.model.config.num_decoder_layers + 1)
  ]


def propagation_ablation(
  setup: Setup, task: str, exit_layers: Sequence[Sequence[int]]
) -> dict:
  """Quality and agreement with the full model per propagation mode, all at
  the same exit layers."""
  examples = setup.examples(task, 'test')
  full = setup.full(task)
  out = {}
  for mode in arguments.PROPAGATIONS:
    result = forced_exits(setup, task, mode, exit_layers=exit_layers)
    losses = ltt.consistency_losses(
      'textual',
      examples.require_metrics().per_example(),
      result['predictions'],
      full.predictions,
    )
    out[mode] = {
      'quality': result['quality'],
      'metric': result['metric'],
      'agreement_with_full': float(1 - losses.mean()),
      'avg_layers': result['avg_layers'],
    }
  return out


def early_exit_curve(
  setup: Setup, task: str, measure: str, thresholds: Sequence[float]
) -> list[tuple[float, float]]:
  """(avg layers, quality) of early exit over a threshold sweep (test)."""
  points = []
  for threshold in thresholds:
    early = setup.early(task, measure, threshold)
    points.append(
      (early.avg_layers, setup.headline(task, early.predictions)[1])
    )
  return points
