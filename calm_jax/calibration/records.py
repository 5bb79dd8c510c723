"""Calibration records: certified thresholds kept next to the checkpoint.

MODEL_DIR/calibration/<name>.json holds one certificate: the threshold Learn
then Test chose, its table, and the fingerprint of everything it depends on
(the model's content hashes, the data, the decode and calibration settings).
A record applies only to a model whose fingerprint equals the record's
(`api.CalmLM.resolve_threshold`). No JAX, no TensorFlow.
"""
import os
import time
from typing import Optional

from calm_jax.storage import files
from calm_jax.storage import provenance

SUBDIR = 'calibration'


def directory(model_dir: str) -> str:
  return files.join(model_dir, SUBDIR)


def fingerprint(*, model: dict, data: dict, decode: dict, consistency: str,
                delta: float, epsilon: float, grid_step: float) -> dict:
  """Everything a record's certificate depends on."""
  return {'model': model, 'data': data, 'decode': decode,
          'calibration': {'consistency': consistency, 'delta': delta,
                          'epsilon': epsilon, 'grid_step': grid_step}}


def name(task: str, record_fingerprint: dict) -> str:
  """Readable, and distinct for any difference in data, decode or
  calibration settings; the same settings on a retrained model reuse the
  name, so its new record replaces the stale one."""
  settings = {k: v for k, v in record_fingerprint.items() if k != 'model'}
  cal = record_fingerprint['calibration']
  return (f'{task}_{record_fingerprint["decode"]["confidence"]}_'
          f'{cal["consistency"]}_delta{cal["delta"]:g}_eps{cal["epsilon"]:g}'
          f'_{provenance.short_hash(settings, 8)}')


def write(model_dir: str, record: dict) -> str:
  """Writes a record (whole or not at all); returns its path."""
  path = files.join(directory(model_dir), record['name'] + '.json')
  files.atomic_write_json(path, {'created': time.time(), **record})
  return path


def all_records(model_dir: str) -> list[tuple[str, dict]]:
  """(path, record) of every calibration record of a model dir."""
  return [(path, files.read_json(path, what='calibration record'))
          for path in files.glob(directory(model_dir), '*.json')]


def named(model_dir: str, record_name: str) -> list[tuple[str, dict]]:
  """The records called `record_name`, or whose name starts with it + '_'
  (the readable part of a name, before its settings hash); a
  ProvenanceError naming the available ones if there is none."""
  found = [(p, r) for p, r in all_records(model_dir)
           if os.path.basename(p)[:-len('.json')] == record_name
           or os.path.basename(p).startswith(record_name + '_')]
  if not found:
    names = [os.path.basename(p)[:-len('.json')]
             for p in files.glob(directory(model_dir), '*.json')]
    raise provenance.ProvenanceError(
        f'no calibration record {record_name!r} in {directory(model_dir)}; '
        f'there are: {", ".join(names) or "none"}')
  return found


def for_measure(model_dir: str, confidence: str, task: Optional[str]
                ) -> list[tuple[str, dict]]:
  """The measure's records of `task`; with task None, those of the only
  task that has any (several tasks: an error that lists them)."""
  found = [(p, r) for p, r in all_records(model_dir)
           if r.get('confidence') == confidence]
  if task is not None:
    return [(p, r) for p, r in found if r.get('task') == task]
  tasks = sorted({r.get('task') for _, r in found})
  if len(tasks) > 1:
    raise provenance.ProvenanceError(
        f'{model_dir} has {confidence!r} calibration records for several '
        f'tasks ({", ".join(tasks)}): pass task=... (or a threshold)')
  return found


def certified_target_length(record: Optional[dict]) -> Optional[int]:
  """The longest decode length a record was certified at."""
  if record is None:
    return None
  lengths = [d.get('feature_lengths', {}).get('targets') for d in
             record.get('fingerprint', {}).get('data', {}).values()]
  lengths = [l for l in lengths if l]
  return max(lengths) if lengths else None
