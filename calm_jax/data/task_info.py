"""What the jobs need to know of a task beyond its SeqIO registration.

SeqIO gives a task's metric functions; it has no feature lengths (t5x takes
them from gin) and no notion of which metric is the headline or which
per-example metric calibration uses. Those come from here:

- the embedded and the paper's tasks `register` theirs where they are
  defined (calm_jax/tasks);
- a user's own task needs no entry at all when its lengths are bound with
  `calm_jax.data_settings.task_feature_lengths` and its first metric is the
  headline; otherwise their module calls
  `calm_jax.data.task_info.register('my_task', feature_lengths={...},
  headline='rougeL')` next to their `seqio.TaskRegistry.add`, as t5x users
  add tasks without editing the library.

No TensorFlow: the SeqIO lookups happen in `data.pipeline`, which passes the
task's metric functions in.
"""

import dataclasses
from typing import Callable
from typing import Mapping
from typing import Optional
from typing import Sequence

from calm_jax import errors
from calm_jax.scoring import metrics
from calm_jax.tasks import data_settings

MetricFn = Callable[..., Mapping[str, float]]


class DataError(errors.UserError, ValueError):
  """A task or split that cannot feed the job (unknown, missing, empty)."""


@dataclasses.dataclass(frozen=True)
class _Registered:
  feature_lengths: Optional[Mapping[str, int]]
  headline: Optional[str]
  per_example: Optional[str]


_REGISTRY: dict[str, _Registered] = {}


def register(
  name: str,
  *,
  feature_lengths: Optional[Mapping[str, int]] = None,
  headline: Optional[str] = None,
  per_example: Optional[str] = None,
) -> None:
  """Declares a task's default lengths, headline metric (a key its metric
  functions return) and per-example metric (a name in
  `metrics.PER_EXAMPLE`; default: the headline). Registering again
  replaces the entry."""
  if per_example is not None and per_example not in metrics.PER_EXAMPLE:
    raise DataError(
      f'unknown per-example metric {per_example!r} for '
      f'{name!r}; valid: {", ".join(metrics.PER_EXAMPLE)}'
    )
  _REGISTRY[name] = _Registered(
    dict(feature_lengths) if feature_lengths else None, headline, per_example
  )


def feature_lengths(name: str) -> dict[str, int]:
  """A task's input/target lengths: the run's override, else registered."""
  override = data_settings.feature_lengths_override(name)
  if override:
    return override
  entry = _REGISTRY.get(name)
  if entry is None or entry.feature_lengths is None:
    raise DataError(
      f'no feature lengths for task {name!r}: bind calm_jax.data_settings.'
      f"task_feature_lengths={{'{name}': {{'inputs': N, 'targets': M}}}} "
      'or call calm_jax.data.task_info.register'
    )
  return dict(entry.feature_lengths)


@dataclasses.dataclass(frozen=True)
class TaskMetrics:
  """How a task's outputs are scored: its metric functions, the headline
  among their keys, and the per-example metric calibration uses."""

  task: str
  metric_fns: tuple[MetricFn, ...]

  @property
  def _entry(self) -> Optional[_Registered]:
    return _REGISTRY.get(self.task)

  def scores(
    self, references: Sequence, predictions: Sequence[str]
  ) -> dict[str, float]:
    """Every metric of the task (corpus level), by name."""
    return {
      k: float(v)
      for fn in self.metric_fns
      for k, v in fn(list(references), list(predictions)).items()
    }

  def headline(self, scores: Mapping[str, float]) -> str:
    """The metric the task is judged by: registered, else the first."""
    name = self._entry.headline if self._entry else None
    return name if name in scores else next(iter(scores))

  def per_example(self) -> str:
    """Name in `metrics.PER_EXAMPLE` of the per-example metric: the
    registered one, else the headline's per-example form."""
    entry = self._entry
    name = entry and (entry.per_example or entry.headline)
    if name is None:  # unregistered: the first metric the functions return
      try:
        name = next(iter(self.scores(['a b'], ['a b'])), None)
      except Exception:  # pylint: disable=broad-except
        name = None  # a metric that cannot score a stand-in pair
    if name not in metrics.PER_EXAMPLE:
      raise DataError(
        f'no per-example metric known for task {self.task!r}: call '
        f"calm_jax.data.task_info.register('{self.task}', "
        f'per_example=...) with one of {", ".join(metrics.PER_EXAMPLE)}'
      )
    return name

  def headline_score(
    self, references: Sequence, predictions: Sequence[str]
  ) -> tuple[str, float]:
    scores = self.scores(references, predictions)
    name = self.headline(scores)
    return name, scores[name]
