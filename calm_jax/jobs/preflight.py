"""What a long job needs before its first measurement, checked in its first
seconds: a missing model dir or exit classifier is refused in one line
naming it and the command that makes it, instead of failing after minutes
of measurements.

Each job lists its needs for its settings (`bench.needs`, `report.needs`,
...); `refuse_unmet` runs before anything is measured. The Makefile's
targets make what their job needs first (tests/test_preflight.py checks
every documented target against the state `make demo` leaves).
"""

import dataclasses
from typing import Sequence

from calm_jax import errors
from calm_jax.model import model_files
from calm_jax.storage import files


@dataclasses.dataclass(frozen=True)
class Need:
  """One thing a job needs, whether it is there, and what makes it."""

  what: str  # e.g. 'an exit classifier in runs/demo/model'
  met: bool
  made_by: str  # the module and gin file that make it (a Makefile recipe's)
  command: str  # the whole command, for the refusal


def model_dir(path: str) -> Need:
  return Need(
    what=f'a trained model in {path}',
    met=files.exists(files.join(path, model_files.MODEL_JSON)),
    made_by='make demo',
    command='make demo',
  )


def classifier(path: str) -> Need:
  return Need(
    what=f'an exit classifier in {path}',
    met=model_files.has_classifier(path),
    made_by='calm_jax.train --gin_file=gin/runs/train_classifier.gin',
    command=model_files.train_classifier_command(path),
  )


def refuse_unmet(job: str, needs: Sequence[Need]) -> None:
  """A SettingError naming the first unmet need and its command (and how
  many more there are)."""
  unmet = [need for need in needs if not need.met]
  if not unmet:
    return
  more = f' (and {len(unmet) - 1} more)' if len(unmet) > 1 else ''
  raise errors.SettingError(
    f'{job} needs {unmet[0].what}{more}; make it first with '
    f'`{unmet[0].command}`'
  )
