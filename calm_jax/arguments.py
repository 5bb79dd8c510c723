"""The one validation of every setting a user gives (no JAX, no TensorFlow).

Each setting has one rule, in `RULES`, and every caller checks through
`check(name=value, ...)`: the command line's settings groups
(`jobs.settings`), the jobs' own arguments, the Python API and the library
objects that hold settings (`ExitConfig`, the model configs). A wrong type,
a non-finite number, a value out of range or an unknown name is an
`errors.SettingError` naming the setting and what is valid, which the
commands print as one line (exit 2).

The valid names of the settings that choose among alternatives (confidence
measures, propagations, consistencies, dtypes) are defined here once; the
modules that implement them import these tuples.
"""

import dataclasses
import math
import numbers
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

from calm_jax import errors

# The vocabularies of the choice settings.
CONFIDENCE_MEASURES = ('softmax', 'softmax_max', 'state', 'classifier')
ORACLE = 'oracle'  # decode at the consistency oracle's exits (analysis)
PROPAGATIONS = ('hidden', 'kv_copy', 'none')
CONSISTENCIES = ('textual', 'risk')
DTYPES = ('float32', 'bfloat16')
# What a train step's layers keep for the backward pass (layers.py).
REMAT_POLICIES = ('none', 'minimal', 'full')
# 1: parameters split over 'model'; 2: over 'data' too (t5x's name).
PARAMETER_PARTITIONING_DIMS = (1, 2)
LOSS_WEIGHTINGS = ('linear', 'uniform', 'geometric')
# How the train step computes the exits' cross-entropy (model/fused_loss.py):
# 'fused' in TPU kernels with no logits in memory, 'streamed' one exit's
# logits at a time, 'auto' fused when compiling for TPU.
EXIT_LOSSES = ('auto', 'fused', 'streamed')
# 'early_exit': CALM at a certified threshold; 'exact': the full model's
# output, drafted by the early exits and verified (self-speculative).
DECODE_MODES = ('early_exit', 'exact')
OPTIMIZERS = ('adafactor', 'adamw')
SCHEDULES = ('constant', 'rsqrt', 'cosine')


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
  """`value` as an int in [low, high] (high None: no upper bound)."""
  if not _is_int(value):
    raise errors.SettingError(f'{name} must be an integer, got {value!r}')
  if value < low or (high is not None and value > high):
    bound = f'[{low}, {high}]' if high is not None else f'>= {low}'
    raise errors.SettingError(f'{name}={value} is out of range: valid {bound}')
  return int(value)


def real(
  name: str,
  value: Any,
  low: float,
  high: float = math.inf,
  *,
  open_low: bool = False,
  open_high: bool = False,
) -> float:
  """`value` as a finite float in the interval (ends open or closed)."""
  if not _is_real(value) or not math.isfinite(value):
    raise errors.SettingError(f'{name} must be a finite number, got {value!r}')
  too_low = value <= low if open_low else value < low
  too_high = value >= high if open_high else value > high
  if too_low or too_high:
    left = '(' if open_low else '['
    right = ')' if open_high or high == math.inf else ']'
    raise errors.SettingError(
      f'{name}={value} is out of range: valid {left}{low:g}, {high:g}{right}'
    )
  return float(value)


def choice(name: str, value: Any, valid: Sequence[str]) -> str:
  if value not in valid:
    raise errors.SettingError(
      f'unknown {name} {value!r}; valid: {", ".join(map(str, valid))}'
    )
  return value


def texts(value: Any) -> list[str]:
  """A list of input strings (a lone string is refused, not split), each
  valid Unicode."""
  if isinstance(value, (str, bytes)):
    raise errors.SettingError(
      'texts must be a list of strings; for one text pass [text]'
    )
  if not isinstance(value, Sequence) or not all(
    isinstance(t, str) for t in value
  ):
    raise errors.SettingError('texts must be a list of strings')
  return [unicode_text(f'texts[{i}]', t) for i, t in enumerate(value)]


def unicode_text(name: str, text: str) -> str:
  """`text` if it can be encoded as UTF-8; a lone surrogate (half of a
  UTF-16 pair, e.g. from a JSON escape) cannot, and no tokenizer takes it."""
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    raise errors.SettingError(
      f'{name} is not valid Unicode: a lone surrogate '
      f'U+{ord(text[e.start]):04X} at character {e.start}'
    ) from None
  return text


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one setting is checked: `test(name, value, context)`; None is
  valid when `optional`."""

  test: Callable[[str, Any, dict], Any]
  optional: bool = False


# The exact mode's cap on drafted tokens per round (speculative decoding
# gains little past 8; its draft loop is unrolled gamma times, so compile
# time grows with it): refused with the settings, before anything loads.
MAX_GAMMA = 16


def _gamma(name: str, value: Any, ctx: dict) -> int:
  del ctx
  integer(name, value, 1)
  if value > MAX_GAMMA:
    raise errors.SettingError(
      f'{name}={value} is above its cap, MAX_GAMMA={MAX_GAMMA} drafted '
      'tokens per round (the draft loop is unrolled gamma times)'
    )
  return int(value)


def _int(low: int, high_key: Optional[str] = None, optional=False) -> Rule:
  return Rule(lambda n, v, ctx: integer(n, v, low, ctx.get(high_key)), optional)


def _real(low: float, high: float = math.inf, optional=False, **ends) -> Rule:
  return Rule(lambda n, v, ctx: real(n, v, low, high, **ends), optional)


def _choice(valid: Sequence[str], optional=False) -> Rule:
  return Rule(lambda n, v, ctx: choice(n, v, valid), optional)


def _mesh_shape(name: str, value: Any, ctx: dict) -> None:
  if (
    not isinstance(value, (list, tuple))
    or len(value) != 2
    or not all(_is_int(v) and v >= 1 for v in value)
  ):
    raise errors.SettingError(
      f'{name} must be (data, model): two positive integers, got {value!r}'
    )


def _deltas(name: str, value: Any, ctx: dict) -> None:
  for delta in value if isinstance(value, (list, tuple)) else [value]:
    real(name, delta, 0.0, 1.0, open_low=True, open_high=True)


# Each setting's one rule. Context values (`num_layers`) bound some.
RULES: dict[str, Rule] = {
  # decoding
  'threshold': _real(0.0, optional=True),  # above 1: exits disabled
  'confidence': _choice((*CONFIDENCE_MEASURES, ORACLE)),
  'propagation': _choice(PROPAGATIONS),
  'min_exit': _int(1, 'num_layers'),
  'first_exit': _int(1, 'num_layers'),
  'exit_interval': _int(1),
  'tau': _real(0.0, optional=True, open_low=True),
  'temperature': _real(0.0),
  'top_k': _int(0),
  'top_p': _real(0.0, 1.0, open_low=True),
  'seed': _int(0),
  'mode': _choice(DECODE_MODES),
  'gamma': Rule(_gamma),
  'draft_layer': _int(1, 'num_layers', optional=True),
  'draft_min_confidence': _real(0.0, 1.0),
  'batch_size': _int(1),
  'mesh_shape': Rule(_mesh_shape, optional=True),  # fits the devices?
  # checked when the mesh is made
  'max_length': _int(1, optional=True),
  'max_input_length': _int(2),
  'num_examples': _int(1, optional=True),
  'input_length': _int(2, optional=True),
  'target_length': _int(1, optional=True),
  'exit_map_examples': _int(0),
  'dtype': _choice(DTYPES, optional=True),
  # calibration
  'delta': Rule(_deltas),
  'epsilon': _real(0.0, 1.0, open_low=True, open_high=True),
  'grid_step': _real(0.0, 1.0, open_low=True),
  'consistency': _choice(CONSISTENCIES),
  # training
  'optimizer': _choice(OPTIMIZERS),
  'schedule': _choice(SCHEDULES),
  'learning_rate': _real(0.0, open_low=True),
  'warmup_steps': _int(0),
  'total_steps': _int(1),
  'weight_decay': _real(0.0),
  'grad_clip_norm': _real(0.0),
  'num_train_steps': _int(1),
  'max_bad_steps': _int(0),
  'weighting': _choice(LOSS_WEIGHTINGS),  # of the per-exit losses
  'remat_policy': _choice(REMAT_POLICIES),
  'exit_loss': _choice(EXIT_LOSSES),
  'parameter_partitioning_dims': _choice(PARAMETER_PARTITIONING_DIMS),
  'z_loss': _real(0.0),
  'period': _int(1),
  'keep': _int(1, optional=True),
  'log_every': _int(1),
  'eval_every': _int(0),
  'eval_batches': _int(1),
  # benchmarks, the demo, the report and the validity protocol
  'repeats': _int(1),
  'splits': _int(1),
  **{
    name: _int(1)
    for name in (
      'eval_examples',
      'eval_batch_size',
      'timing_repeats',
      'cal_examples',
      'fit_examples',
      'test_examples',
      'timing_examples',
      'length',
    )
  },
}


def check(
  *, num_layers: Optional[int] = None, prefix: str = '', **settings: Any
) -> None:
  """Checks each setting by its rule; `num_layers` bounds the exit layers,
  `prefix` names the group in messages ('LogSettings.'). A name without a
  rule is a bug (KeyError), not a user error."""
  context = {'num_layers': num_layers}
  for name, value in settings.items():
    rule = RULES[name]
    if value is None and rule.optional:
      continue
    rule.test(prefix + name, value, context)
