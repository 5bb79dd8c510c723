"""Calibration records: certified thresholds kept next to the checkpoint.

MODEL_DIR/calibration/<name>.json holds one certificate (`CalibrationRecord`,
schema version 2): the threshold Learn then Test chose, the table of
per-threshold risks it was derived from, the fingerprint of everything it
depends on (the model's content hashes, the data, the decode and
calibration settings), and a sha256 digest of all of that.

A record is verified whenever it is read:
- its digest must match its content (a hand-edited record is refused by
  name, never obeyed);
- its threshold must be the one fixed-sequence testing certifies from its
  own table (p-values recomputed from the risks), so the certified value is
  bound to its evidence; this check also covers version-1 records (written
  before records were typed), which carry no digest.
An unknown schema version is refused with the file's name.

`choose_threshold` turns a model dir's records into the threshold a decode
uses: a record applies only to a model whose fingerprint equals the
record's. No JAX, no TensorFlow.
"""

import dataclasses
import hashlib
import os
import time
from typing import Any
from typing import Callable
from typing import Optional

from calm_jax.calibration import ltt
from calm_jax.decoding import thresholds
from calm_jax.storage import files
from calm_jax.storage import provenance

SUBDIR = 'calibration'
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the untyped records of earlier releases


class RecordError(provenance.ProvenanceError):
  """A calibration record that cannot be trusted or read."""


def directory(model_dir: str) -> str:
  return files.join(model_dir, SUBDIR)


def fingerprint(
  *,
  model: dict,
  data: dict,
  decode: dict,
  consistency: str,
  delta: float,
  epsilon: float,
  grid_step: float,
) -> dict:
  """Everything a record's certificate depends on."""
  return {
    'model': model,
    'data': data,
    'decode': decode,
    'calibration': {
      'consistency': consistency,
      'delta': delta,
      'epsilon': epsilon,
      'grid_step': grid_step,
    },
  }


def name(task: str, record_fingerprint: dict) -> str:
  """Readable, and distinct for any difference in data, decode or
  calibration settings; the same settings on a retrained model reuse the
  name, so its new record replaces the stale one."""
  settings = {k: v for k, v in record_fingerprint.items() if k != 'model'}
  cal = record_fingerprint['calibration']
  return (
    f'{task}_{record_fingerprint["decode"]["confidence"]}_'
    f'{cal["consistency"]}_delta{cal["delta"]:g}_eps{cal["epsilon"]:g}'
    f'_{provenance.short_hash(settings, 8)}'
  )


@dataclasses.dataclass(frozen=True)
class CalibrationRecord:
  """One certificate. `threshold` None: no early exit was certified."""

  name: str
  task: str
  confidence: str
  consistency: str
  delta: float
  epsilon: float
  tau: Optional[float]
  threshold: Optional[float]
  message: str
  n: int  # calibration examples
  checkpoint_step: int
  dtype: str
  fingerprint: dict  # see `fingerprint`
  table: tuple[dict, ...]  # ltt.TestRow dicts, in the order tested
  extra: dict = dataclasses.field(default_factory=dict)  # split, min_exit
  created: float = 0.0
  schema_version: int = SCHEMA_VERSION

  @property
  def certified(self) -> bool:
    return self.threshold is not None

  @property
  def grid_step(self) -> float:
    return self.fingerprint['calibration']['grid_step']

  def content(self) -> dict:
    """What the digest covers: every field, as written."""
    out = dataclasses.asdict(self)
    out['table'] = list(out['table'])
    return files.finite_json(out)

  def digest(self) -> str:
    return hashlib.sha256(
      provenance.canonical(self.content()).encode()
    ).hexdigest()

  def to_json(self) -> dict:
    return {
      **self.content(),
      'certified': self.certified,
      'digest': self.digest(),
    }


def new_record(
  result: ltt.CalibrationResult,
  *,
  task: str,
  record_fingerprint: dict,
  tau: Optional[float],
  checkpoint_step: int,
  dtype: str,
  extra: Optional[dict] = None,
) -> CalibrationRecord:
  """The record of a Learn then Test result."""
  cal = record_fingerprint['calibration']
  return CalibrationRecord(
    name=name(task, record_fingerprint),
    task=task,
    confidence=record_fingerprint['decode']['confidence'],
    consistency=cal['consistency'],
    delta=cal['delta'],
    epsilon=cal['epsilon'],
    tau=tau,
    threshold=result.threshold,
    message=result.message,
    n=result.n,
    checkpoint_step=checkpoint_step,
    dtype=dtype,
    fingerprint=record_fingerprint,
    table=tuple(row.as_dict() for row in result.table),
    extra=dict(extra or {}),
    created=time.time(),
  )


# --- reading and verifying ---------------------------------------------------

_LEGACY_FIELDS = (
  'name',
  'task',
  'confidence',
  'consistency',
  'delta',
  'epsilon',
  'tau',
  'threshold',
  'message',
  'n',
  'checkpoint_step',
  'dtype',
  'fingerprint',
  'table',
)
_FIELDS = {f.name for f in dataclasses.fields(CalibrationRecord)}


def from_json(path: str, obj: Any) -> CalibrationRecord:
  """The verified record in a file's JSON; a RecordError names the file."""
  if not isinstance(obj, dict):
    raise RecordError(
      f'calibration record {path} does not hold a JSON '
      'object: delete it and re-calibrate'
    )
  version = obj.get('schema_version', 1)
  if version not in READABLE_VERSIONS:
    raise RecordError(
      f'calibration record {path} has schema_version {version!r}; this '
      f'calm_jax reads versions {", ".join(map(str, READABLE_VERSIONS))}: '
      'upgrade calm_jax, or re-calibrate'
    )
  record = _legacy(path, obj) if version == 1 else _typed(path, obj)
  if version == 2 and obj.get('digest') != record.digest():
    raise RecordError(
      f'calibration record {path} was changed after it was written: its '
      'content does not match its digest; a certificate cannot be edited '
      '(delete it and re-calibrate)'
    )
  _check_evidence(path, record)
  return record


def _typed(path: str, obj: dict) -> CalibrationRecord:
  fields = {k: v for k, v in obj.items() if k in _FIELDS}
  missing = sorted(_FIELDS - set(fields) - {'extra', 'created'})
  if missing:
    raise RecordError(
      f'calibration record {path} lacks {", ".join(missing)}:'
      ' delete it and re-calibrate'
    )
  try:
    return CalibrationRecord(**{**fields, 'table': tuple(fields['table'])})
  except TypeError as e:
    raise RecordError(
      f'calibration record {path} is malformed ({e}): '
      'delete it and re-calibrate'
    ) from e


def _legacy(path: str, obj: dict) -> CalibrationRecord:
  """A version-1 record (a plain dict): its own fields, the rest as extra."""
  missing = [k for k in _LEGACY_FIELDS if k not in obj]
  if missing:
    raise RecordError(
      f'calibration record {path} lacks {", ".join(missing)}:'
      ' delete it and re-calibrate'
    )
  extra = {
    k: v
    for k, v in obj.items()
    if k not in _LEGACY_FIELDS and k not in ('certified', 'created')
  }
  return CalibrationRecord(
    **{k: obj[k] for k in _LEGACY_FIELDS if k != 'table'},
    table=tuple(obj['table']),
    extra=extra,
    created=obj.get('created', 0.0),
    schema_version=1,
  )


def _check_evidence(path: str, record: CalibrationRecord) -> None:
  """The certified threshold must be the one its own table certifies."""
  try:
    grid = ltt.descending_grid(1.0, 0.0, record.grid_step)
    certified = ltt.replay(
      record.table, grid, n=record.n, delta=record.delta, epsilon=record.epsilon
    )
  except (ValueError, KeyError, TypeError) as e:
    raise RecordError(
      f'calibration record {path} does not follow from its '
      f'own test table ({e}): delete it and re-calibrate'
    ) from e
  if certified != record.threshold:
    raise RecordError(
      f'calibration record {path} states threshold {record.threshold} but '
      f'its test table certifies {certified}: the record was edited; '
      'delete it and re-calibrate'
    )


def read(path: str) -> CalibrationRecord:
  return from_json(
    path,
    files.read_json(
      path, what='calibration record', recovery='delete it and re-calibrate'
    ),
  )


def write(model_dir: str, record: CalibrationRecord) -> str:
  """Writes a record (whole or not at all); returns its path."""
  path = files.join(directory(model_dir), record.name + '.json')
  files.atomic_write_json(path, record.to_json())
  return path


def all_records(model_dir: str) -> list[tuple[str, CalibrationRecord]]:
  """(path, record) of every calibration record of a model dir."""
  return [
    (path, read(path)) for path in files.glob(directory(model_dir), '*.json')
  ]


def _stem(path: str) -> str:
  return os.path.basename(path)[: -len('.json')]


def named(
  model_dir: str, record_name: str
) -> list[tuple[str, CalibrationRecord]]:
  """The records called `record_name`, or whose name starts with it + '_'
  (the readable part of a name, before its settings hash); a
  ProvenanceError naming the available ones if there is none."""
  paths = files.glob(directory(model_dir), '*.json')
  found = [
    (p, read(p))
    for p in paths
    if _stem(p) == record_name or _stem(p).startswith(record_name + '_')
  ]
  if not found:
    raise provenance.ProvenanceError(
      f'no calibration record {record_name!r} in {directory(model_dir)}; '
      f'there are: {", ".join(map(_stem, paths)) or "none"}'
    )
  return found


def for_measure(
  model_dir: str, confidence: str, task: Optional[str]
) -> list[tuple[str, CalibrationRecord]]:
  """The measure's records of `task`; with task None, those of the only
  task that has any (several tasks: an error that lists them)."""
  found = [
    (p, r) for p, r in all_records(model_dir) if r.confidence == confidence
  ]
  if task is not None:
    return [(p, r) for p, r in found if r.task == task]
  tasks = sorted({r.task for _, r in found})
  if len(tasks) > 1:
    raise provenance.ProvenanceError(
      f'{model_dir} has {confidence!r} calibration records for several '
      f'tasks ({", ".join(tasks)}): pass task=... (or a threshold)'
    )
  return found


def certified_target_length(
  record: Optional[CalibrationRecord],
) -> Optional[int]:
  """The longest decode length a record was certified at."""
  if record is None:
    return None
  lengths = [
    d.get('feature_lengths', {}).get('targets')
    for d in record.fingerprint.get('data', {}).values()
  ]
  lengths = [l for l in lengths if l]
  return max(lengths) if lengths else None


# --- the threshold a decode uses ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """The threshold a decode uses and where it came from."""

  value: float
  tau: Optional[float]
  source: str
  record: Optional[CalibrationRecord] = None  # the certificate, if used


def _quoted(value: str) -> str:
  return f'"\'{value}\'"'


def calibrate_command(model_dir: str, record: CalibrationRecord) -> str:
  """The command that certifies `record`'s settings again (with
  gin/runs/calibrate.gin; the settings that differ from its defaults are
  spelled out, so the new record replaces this one)."""
  flags = [
    f'--gin.MODEL_DIR={_quoted(model_dir)}',
    f'--gin.MIXTURE_OR_TASK_NAME={_quoted(record.task)}',
    f'--gin.DELTA={record.delta:g}',
    f'--gin.EPSILON={record.epsilon:g}',
    f'--gin.CONSISTENCY={_quoted(record.consistency)}',
    f'--gin.CONFIDENCE={_quoted(record.confidence)}',
  ]
  if record.tau is not None:
    flags.append(f'--gin.TAU={record.tau:g}')
  data = list(record.fingerprint.get('data', {}).values())
  first = data[0] if data else {}
  optional = {
    'calm_jax.calibrate.split': (first.get('split'), 'validation'),
    'calm_jax.calibrate.num_examples': (first.get('num_examples'), None),
    'calm_jax.calibrate.grid_step': (record.grid_step, 0.05),
    'calm_jax.ExitSettings.min_exit': (record.extra.get('min_exit'), 1),
    'calm_jax.ExitSettings.propagation': (
      record.fingerprint.get('decode', {}).get('propagation'),
      'hidden',
    ),
  }
  for name, (value, default) in optional.items():
    if value is not None and value != default:
      shown = _quoted(value) if isinstance(value, str) else f'{value:g}'
      flags.append(f'--gin.{name}={shown}')
  return (
    'python -m calm_jax.calibrate --gin_file=gin/runs/calibrate.gin '
    + ' '.join(flags)
  )


def choose_threshold(
  model_dir: str,
  model_fingerprint: Callable[[str], dict],
  threshold: Optional[float],
  confidence: str,
  tau: Optional[float] = None,
  record_name: Optional[str] = None,
  task: Optional[str] = None,
) -> ThresholdChoice:
  """The threshold to decode with: given, calibrated, or full depth.

  Without a threshold, the calibration record `record_name` (a whole
  name, or its readable part before the settings hash), else the newest
  record of the measure for `task` (task None: the only task with
  records) gives the base lambda and the tau it was calibrated with. A
  record is used only if its model fingerprint equals
  `model_fingerprint(confidence)`; otherwise this raises a ProvenanceError
  saying what changed and the command that re-calibrates. A record that
  certified no threshold, or none at all, means full depth.
  """
  if threshold is not None:
    return ThresholdChoice(float(threshold), tau, 'given')
  if record_name:
    candidates = named(model_dir, record_name)
    for _, record in candidates:
      if record.confidence != confidence:
        raise provenance.ProvenanceError(
          f'calibration record {record_name!r} is for '
          f'{record.confidence!r}, not {confidence!r}'
        )
  else:
    candidates = for_measure(model_dir, confidence, task)
  if not candidates:
    return ThresholdChoice(
      thresholds.EXITS_OFF,
      tau,
      f'full depth: no calibration record for '
      f'{confidence!r}' + (f' on {task!r}' if task else ''),
    )
  path, record = _matching(model_dir, candidates, model_fingerprint(confidence))
  source = f'{path} ({record.message})'
  tau = record.tau if tau is None else tau
  if record.threshold is None:
    return ThresholdChoice(
      thresholds.EXITS_OFF, tau, source + '; full depth', record
    )
  return ThresholdChoice(float(record.threshold), tau, source, record)


def _matching(
  model_dir: str, candidates: list[tuple[str, CalibrationRecord]], current: dict
) -> tuple[str, CalibrationRecord]:
  """The newest record certified on this very model, else an error."""
  newest = sorted(candidates, key=lambda pr: pr[1].created, reverse=True)
  for path, record in newest:
    if provenance.same(record.fingerprint.get('model'), current):
      return path, record
  path, record = newest[0]
  stored = record.fingerprint.get('model')
  what = (
    provenance.describe_changes(stored, current)
    if stored
    else 'the record carries no model fingerprint'
  )
  raise provenance.ProvenanceError(
    f'calibration record {path} was certified on another model ({what}); '
    f're-calibrate with `{calibrate_command(model_dir, record)}`, or pass '
    'a threshold'
  )


def check_decode_settings(
  choice: ThresholdChoice, decode_fingerprint: dict
) -> None:
  """Refuses to decode a record's threshold with other decode settings
  (measure, exit layers, tau, propagation, sampling) than it was certified
  with: its guarantee would not apply."""
  if choice.record is None:
    return
  stored = choice.record.fingerprint.get('decode')
  if not provenance.same(stored, decode_fingerprint):
    raise provenance.ProvenanceError(
      f'the calibration record was certified with other decode settings '
      f'({provenance.describe_changes(stored or {}, decode_fingerprint)});'
      ' decode with its settings, re-calibrate with these, or pass a '
      'threshold'
    )


# The exact mode's draft threshold when neither a threshold nor a record
# gives one (the output is the full model's whatever the draft; this only
# sets how much it drafts).
EXACT_DRAFT_THRESHOLD = 0.9


def exact_mode_draft(
  choice: ThresholdChoice,
) -> ThresholdChoice:
  """The exact mode's draft threshold: the chosen one, unless it disables
  exits (then EXACT_DRAFT_THRESHOLD)."""
  if not thresholds.exits_disabled(choice.value):
    return choice
  return dataclasses.replace(
    choice,
    value=EXACT_DRAFT_THRESHOLD,
    source=f'exact mode draft at {EXACT_DRAFT_THRESHOLD} ({choice.source})',
  )
