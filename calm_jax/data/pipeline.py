"""Data path of the entry points: SeqIO tasks -> numpy batches.

Imports TensorFlow and SeqIO, so only entry points import this module.
Training batches come one task at a time (a mixture samples which task each
batch comes from, by its rates): each task keeps its own short lengths, which
measured 35-45% faster on CPU than padding every task to the longest.
"""
import os
from typing import Iterator, Mapping, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import logging  # pylint: disable=g-import-not-at-top
import tempfile

import jax
import numpy as np
import seqio
import tensorflow as tf

# Keep TensorFlow off any accelerator: JAX owns it.
tf.config.set_visible_devices([], 'GPU')

# pylint: disable=g-bad-import-order
from calm_jax.tasks import data_settings
from calm_jax.tasks import paper_tasks
from calm_jax.tasks import synthetic_tasks
# pylint: enable=g-bad-import-order

Batch = Mapping[str, np.ndarray]


class _DropUncachedWarning(logging.Filter):
  """The embedded tasks are index-seeded generators: caching adds nothing."""

  def filter(self, record):
    return 'uncached FunctionDataset' not in record.getMessage()


logging.getLogger('absl').addFilter(_DropUncachedWarning())


class DataError(ValueError):
  """A task or split that cannot feed the job (unknown, missing, empty)."""


# Known tasks' default lengths and the metric each is judged and calibrated by.
FEATURE_LENGTHS = {**synthetic_tasks.FEATURE_LENGTHS,
                   **paper_tasks.FEATURE_LENGTHS}
HEADLINE_METRICS = {**{name: spec[1] for name, spec
                       in synthetic_tasks.TASKS.items()},
                    **paper_tasks.HEADLINE_METRICS}


def get_task_or_mixture(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    valid = sorted(set(seqio.TaskRegistry.names())
                   | set(seqio.MixtureRegistry.names()))
    raise DataError(f'unknown task or mixture {name!r}; registered: '
                    f'{", ".join(valid)}') from e


def task_rates(name: str) -> dict[str, float]:
  """Task name -> sampling rate (1.0 for a single task)."""
  provider = get_task_or_mixture(name)
  if isinstance(provider, seqio.Mixture):
    return {t.name: float(provider.get_rate(t)) for t in provider.tasks}
  return {provider.name: 1.0}


def feature_lengths(task_name: str) -> dict[str, int]:
  """A task's input/target lengths: the run's override, else the task's."""
  override = data_settings.feature_lengths_override(task_name)
  if override:
    return override
  if task_name not in FEATURE_LENGTHS:
    raise DataError(f'no feature lengths for task {task_name!r}: bind '
                    'calm_jax.data_settings.task_feature_lengths')
  return dict(FEATURE_LENGTHS[task_name])


def _check_tfds_data(task: seqio.Task, split: str) -> None:
  """Fails in about a second when a TFDS-backed task's data is not built."""
  source = task.source
  if not isinstance(source, seqio.TfdsDataSource):
    return
  try:
    source.get_dataset(split=split, shuffle=False)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    name = source.tfds_dataset.name
    where = data_settings.tfds_data_dir() or '~/tensorflow_datasets'
    raise DataError(
        f'no TFDS data for task {task.name!r} ({name}) in {where}: run '
        f'`tfds build {name.split(":")[0]} --data_dir=DIR` on a machine with '
        f'network access, then set {data_settings.TFDS_DATA_DIR_ENV}=DIR or '
        '--gin.calm_jax.data_settings.tfds_data_dir="\'DIR\'"') from e


def check_ready(name: str, split: str) -> None:
  """Checks that every task of `name` can be read: its vocabulary and its
  data. Errors are one-line DataErrors or VocabularyErrors."""
  seqio.set_tfds_data_dir_override(data_settings.tfds_data_dir())
  for task_name in task_rates(name):
    task = seqio.get_mixture_or_task(task_name)
    task.output_features['targets'].vocabulary.vocab_size  # loads it
    _check_tfds_data(task, split)


def process_shard() -> seqio.ShardInfo:
  """This process's share of every dataset: 1 of `jax.process_count()`."""
  return seqio.ShardInfo(index=jax.process_index(),
                         num_shards=jax.process_count())


def _task_batches(task_name: str, lengths: Mapping[str, int], split: str,
                  batch_size: int, seed: int, shuffle: bool,
                  num_epochs: Optional[int],
                  shard: Optional[seqio.ShardInfo] = None) -> tf.data.Dataset:
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      lengths, split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      shard_info=shard, try_in_mem_cache=False)  # see eval_examples
  ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
  return ds.batch(batch_size, drop_remainder=True)


def train_batches(name: str, *, batch_size: int, seed: int = 0,
                  start_step: int = 0, shuffle: bool = True,
                  shard: Optional[seqio.ShardInfo] = None
                  ) -> Iterator[Batch]:
  """Endless deterministic training batches, resumed at `start_step`.

  The whole pipeline is a function of `seed`, so skipping the first
  `start_step` batches puts a resumed run at the same data position. With
  `shard`, the batches hold that shard's examples only (each process feeds
  its `batch_size` rows of the global batch); every shard picks the same task
  for a given step, since the mixture sampling depends only on `seed`.
  """
  rates = task_rates(name)
  check_ready(name, 'train')
  per_task = [_task_batches(task, feature_lengths(task),
                            'train', batch_size, seed, shuffle, None, shard)
              for task in rates]
  weights = np.array(list(rates.values()), np.float64)
  ds = (per_task[0] if len(per_task) == 1 else
        tf.data.Dataset.sample_from_datasets(
            per_task, weights=list(weights / weights.sum()), seed=seed))
  ds = ds.skip(start_step).prefetch(2)
  return ds.as_numpy_iterator()


def eval_examples(task_name: str, split: str, *, num_examples: Optional[int],
                  shard: Optional[seqio.ShardInfo] = None) -> list[dict]:
  """Tokenized examples with their text: inputs, targets, *_pretokenized.

  With `shard` (index i of n), only examples k*n + i of the first
  `num_examples`. Evaluation shards at the examples, not at the source
  (TFDS files), so that every example's position is known and per-example
  outputs can be merged back in input order (`multihost.interleave`).
  """
  task = get_task_or_mixture(task_name)
  if split not in task.splits:
    raise DataError(f'task {task_name!r} has no split {split!r}; it has: '
                    f'{", ".join(task.splits)}')
  check_ready(task_name, split)
  lengths = feature_lengths(task_name)
  # No in-memory cache: it asks the source for its size, which TFDS mocks
  # (and sources without metadata) cannot answer.
  ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1,
                        try_in_mem_cache=False)
  if num_examples is not None:
    ds = ds.take(num_examples)
  if shard is not None and shard.num_shards > 1:
    ds = ds.shard(shard.num_shards, shard.index)
  examples = list(ds.as_numpy_iterator())
  if not examples and (shard is None or shard.index == 0):  # 0 gets the most
    raise DataError(f'task {task_name!r} split {split!r} has no examples')
  return examples


def pad_batch(rows: list[np.ndarray], length: int, batch_size: int
              ) -> np.ndarray:
  """Right-pads token rows with 0 to [batch_size, length]."""
  out = np.zeros((batch_size, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row[:length]
  return out


def decode_text(task_name: str, ids: np.ndarray) -> str:
  """Token ids (stopping at EOS) -> text with the task's vocabulary."""
  vocab = seqio.get_mixture_or_task(task_name).output_features[
      'targets'].vocabulary
  ids = list(ids)
  if 1 in ids:
    ids = ids[:ids.index(1)]
  return vocab.decode([int(i) for i in ids])


def token_pieces(task_name: str, ids: np.ndarray) -> list[str]:
  """The SentencePiece piece of each id (ids past the model: sentinels)."""
  vocab = seqio.get_mixture_or_task(task_name).output_features[
      'targets'].vocabulary
  tokenizer = vocab.tokenizer
  size = tokenizer.GetPieceSize()
  return [tokenizer.id_to_piece(int(i)) if int(i) < size
          else f'<extra_id_{int(i) - size}>' for i in ids]


def vocabulary_path(name: str) -> str:
  """Local file of the SentencePiece model that a task's targets use (a
  remote one is copied to a temporary file)."""
  provider = get_task_or_mixture(name)
  vocab = provider.output_features['targets'].vocabulary
  if not isinstance(vocab, seqio.SentencePieceVocabulary):
    raise DataError(f'{name!r} has no SentencePiece vocabulary file')
  vocab.vocab_size  # loads it: an unreadable vocabulary fails here
  path = vocab.sentencepiece_model_file
  if '://' in path:
    local = os.path.join(tempfile.mkdtemp(), os.path.basename(path))
    tf.io.gfile.copy(path, local)
    path = local
  return path


def check_vocab_fits(name: str, model_vocab_size: int) -> None:
  size = get_task_or_mixture(name).output_features['targets'].vocabulary
  if size.vocab_size > model_vocab_size:
    raise DataError(f'vocabulary of {name!r} has {size.vocab_size} ids but '
                    f'the model has vocab_size={model_vocab_size}')


def headline_metric(task_name: str, scores: Mapping[str, float]) -> str:
  """The metric a task is judged by (its registered one, else the first)."""
  known = HEADLINE_METRICS.get(task_name)
  return known if known in scores else next(iter(scores))


def per_example_metric(task_name: str) -> str:
  """Name in `metrics.PER_EXAMPLE` of the metric a task calibrates with."""
  if task_name not in HEADLINE_METRICS:
    raise DataError(f'no per-example metric known for task {task_name!r}')
  return HEADLINE_METRICS[task_name]
