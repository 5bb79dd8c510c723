"""The records a decode job writes beside its outputs, typed and versioned.

OUTPUT_DIR/run.json (`DecodeRun`) holds everything that determines the
job's outputs: a directory belongs to one run, and another run is refused
there. OUTPUT_DIR/summary.json (`DecodeSummary`) holds what the run
measured per task. Both carry `schema_version` (2); files written before
that field existed read as version 1, and an unknown version is refused
with a one-line error naming the file.
"""

import dataclasses
from typing import Any
from typing import Optional

from calm_jax.storage import files
from calm_jax.storage import provenance

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the plain dicts of earlier releases
RUN_JSON = 'run.json'
SUMMARY_JSON = 'summary.json'


class DecodeRecordError(provenance.ProvenanceError):
  """A run or summary file that cannot be read as one."""


def _version(path: str, obj: Any, what: str) -> int:
  if not isinstance(obj, dict):
    raise DecodeRecordError(f'{what} {path} does not hold a JSON object')
  version = obj.get('schema_version', 1)
  if version not in READABLE_VERSIONS:
    raise DecodeRecordError(
      f'{what} {path} has schema_version {version!r}; this calm_jax reads '
      f'versions {", ".join(map(str, READABLE_VERSIONS))}: upgrade calm_jax,'
      ' or decode into a new OUTPUT_DIR'
    )
  return version


def _fields(cls, path: str, obj: dict, what: str) -> dict:
  names = {f.name for f in dataclasses.fields(cls)} - {'schema_version'}
  optional = {f.name for f in dataclasses.fields(cls) if f.default is None}
  missing = sorted(names - set(obj) - optional)
  if missing:
    raise DecodeRecordError(f'{what} {path} lacks {", ".join(missing)}')
  return {k: obj[k] for k in names if k in obj}


@dataclasses.dataclass(frozen=True)
class DecodeRun:
  """What determines a decode job's outputs (run.json)."""

  model: dict  # the model's fingerprint (config, step, content hashes)
  data: dict  # per example set: its fingerprint
  decode: dict  # the exit settings' fingerprint
  threshold: float
  threshold_source: str
  seed: Optional[int]  # None when greedy: the seed changes nothing
  schema_version: int = SCHEMA_VERSION
  exact: Optional[dict] = None  # the exact mode's draft settings

  def fingerprint(self) -> dict:
    """The settings two runs must share to share a directory."""
    out = dataclasses.asdict(self)
    del out['schema_version']
    if out['exact'] is None:  # as early-exit runs wrote it before
      del out['exact']
    return out

  @property
  def label(self) -> str:
    """`<measure>_<threshold>_<hash of every setting>`, for dir names."""
    return (
      f'{self.decode["confidence"]}_{self.threshold:g}_'
      f'{provenance.short_hash(self.fingerprint(), 8)}'
    )

  def to_json(self) -> dict:
    return files.finite_json(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, path: str, obj: Any) -> 'DecodeRun':
    version = _version(path, obj, 'decode run record')
    return cls(
      **_fields(cls, path, obj, 'decode run record'), schema_version=version
    )


def read_run(path: str) -> DecodeRun:
  return DecodeRun.from_json(
    path, files.read_json(path, what='decode run record')
  )


@dataclasses.dataclass(frozen=True)
class DecodeSummary:
  """What a decode job measured (summary.json)."""

  checkpoint_step: int
  dtype: str
  confidence: str
  threshold: float
  threshold_source: str
  tau: Optional[float]
  split: Optional[str]  # None for the user's file
  # Per task or file: num_examples, avg_decoder_layers, tokens_per_second,
  # decode_seconds_after_compile, and metric / value / scores when scored.
  tasks: dict
  schema_version: int = SCHEMA_VERSION

  def to_json(self) -> dict:
    return files.finite_json(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, path: str, obj: Any) -> 'DecodeSummary':
    version = _version(path, obj, 'decode summary')
    return cls(
      **_fields(cls, path, obj, 'decode summary'), schema_version=version
    )


def read_summary(path: str) -> DecodeSummary:
  return DecodeSummary.from_json(
    path, files.read_json(path, what='decode summary')
  )
