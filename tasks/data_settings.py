"""Run-wide data settings the entry points set from gin (no TensorFlow).

- where the paper tasks read T5's vocabulary and their TFDS data. Precedence,
  highest first: gin (`calm_jax.data_settings.t5_vocabulary` /
  `.tfds_data_dir`), the environment (`CALM_T5_VOCAB` / `TFDS_DATA_DIR`),
  T5's defaults;
- per-task feature lengths that replace a task's defaults in every job
  (`calm_jax.data_settings.task_feature_lengths`), so training, decoding
  and calibration see the same shapes.

A vocabulary that cannot be read fails in about a second with a message
saying how to point at a local copy: without network a `gs://` read would
otherwise sit in retries.
"""

import os
import socket
from typing import Mapping
from typing import Optional

from calm_jax import errors

DEFAULT_T5_VOCABULARY = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
VOCABULARY_ENV = 'CALM_T5_VOCAB'
TFDS_DATA_DIR_ENV = 'TFDS_DATA_DIR'
# The cloud storage host a gs:// path is read from.
_GCS_HOST = ('storage.googleapis.com', 443)

_overrides: dict = {
  't5_vocabulary': None,
  'tfds_data_dir': None,
  'task_feature_lengths': {},
}


class VocabularyError(errors.UserError, ValueError):
  """The T5 vocabulary cannot be read."""


def set_overrides(
  *,
  t5_vocabulary: Optional[str] = None,
  tfds_data_dir: Optional[str] = None,
  task_feature_lengths: Optional[Mapping[str, Mapping[str, int]]] = None,
) -> None:
  """Sets (or, with None, clears) the entry point's choices."""
  _overrides['t5_vocabulary'] = t5_vocabulary
  _overrides['tfds_data_dir'] = tfds_data_dir
  _overrides['task_feature_lengths'] = {
    task: dict(lengths)
    for task, lengths in (task_feature_lengths or {}).items()
  }


def feature_lengths_override(task: str) -> Optional[dict[str, int]]:
  """The lengths set for `task`, or None to use the task's defaults."""
  lengths = _overrides['task_feature_lengths'].get(task)
  return dict(lengths) if lengths else None


def t5_vocabulary_path() -> str:
  return (
    _overrides['t5_vocabulary']
    or os.environ.get(VOCABULARY_ENV)
    or DEFAULT_T5_VOCABULARY
  )


def tfds_data_dir() -> Optional[str]:
  """The TFDS data dir to read, or None for TFDS's own default."""
  return _overrides['tfds_data_dir'] or os.environ.get(TFDS_DATA_DIR_ENV)


def _how_to_override() -> str:
  return (
    f'copy sentencepiece.model to a local file and set {VOCABULARY_ENV}'
    '=/path/sentencepiece.model or '
    '--gin.calm_jax.data_settings.t5_vocabulary="\'/path/'
    'sentencepiece.model\'"'
  )


def _reachable(host: tuple[str, int], timeout_s: float = 3.0) -> bool:
  try:
    socket.create_connection(host, timeout=timeout_s).close()
    return True
  except OSError:
    return False


def readable_vocabulary_path() -> str:
  """The vocabulary path, checked to be readable; VocabularyError if not."""
  path = t5_vocabulary_path()
  if path.startswith('gs://'):
    if not _reachable(_GCS_HOST):
      raise VocabularyError(
        f'cannot read the T5 vocabulary {path}: '
        f'{_GCS_HOST[0]} is unreachable; ' + _how_to_override()
      )
  elif not os.path.isfile(path):
    raise VocabularyError(
      f'T5 vocabulary not found at {path}; ' + _how_to_override()
    )
  return path
