"""Data path of the entry points: SeqIO tasks -> numpy batches.

Imports TensorFlow and SeqIO, so only entry points import this module.
Training batches come one task at a time (a mixture samples which task each
batch comes from, by its rates): each task keeps its own short lengths, which
measured 35-45% faster on CPU than padding every task to the longest.
"""

import os
from typing import Iterator
from typing import Mapping
from typing import Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import logging  # pylint: disable=g-import-not-at-top
import tempfile

import jax
import numpy as np

from calm_jax import console  # noqa: E402

# TensorFlow's native start-up lines (and the CUDA probe of keeping it off
# any accelerator: JAX owns them) hidden; any other line is shown.
with console.native_stderr_hidden(console.START_UP_NOISE):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')

# The tasks register themselves with SeqIO when imported.
from calm_jax.data import examples as examples_lib  # noqa: E402
from calm_jax.data import task_info  # noqa: E402
from calm_jax.tasks import data_settings  # noqa: E402
from calm_jax.tasks import paper_tasks  # noqa: E402, F401
from calm_jax.tasks import synthetic_tasks  # noqa: E402, F401

Batch = Mapping[str, np.ndarray]


class _DropUncachedWarning(logging.Filter):
  """The embedded tasks are index-seeded generators: caching adds nothing."""

  def filter(self, record):
    return 'uncached FunctionDataset' not in record.getMessage()


logging.getLogger('absl').addFilter(_DropUncachedWarning())


DataError = task_info.DataError
feature_lengths = task_info.feature_lengths


def get_task_or_mixture(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    valid = sorted(
      set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    )
    raise DataError(
      f'unknown task or mixture {name!r}; registered: {", ".join(valid)}'
    ) from e


def task_rates(name: str) -> dict[str, float]:
  """Task name -> sampling rate (1.0 for a single task)."""
  provider = get_task_or_mixture(name)
  if isinstance(provider, seqio.Mixture):
    return {t.name: float(provider.get_rate(t)) for t in provider.tasks}
  return {provider.name: 1.0}


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
      'pass `--gin.calm_jax.data_settings.tfds_data_dir="\'DIR\'"`'
    ) from e


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
  return seqio.ShardInfo(
    index=jax.process_index(), num_shards=jax.process_count()
  )


def _task_batches(
  task_name: str,
  lengths: Mapping[str, int],
  split: str,
  batch_size: int,
  seed: int,
  shuffle: bool,
  num_epochs: Optional[int],
  shard: Optional[seqio.ShardInfo] = None,
  pack: bool = False,
) -> tf.data.Dataset:
  """Feature-converted batches of one task; `pack` puts several examples
  in a row (SeqIO's packing: segment ids and positions per example)."""
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
    lengths,
    split=split,
    shuffle=shuffle,
    seed=seed,
    num_epochs=num_epochs,
    shard_info=shard,
    try_in_mem_cache=False,
  )  # see eval_examples
  if pack:  # the converter would drop them itself, with a warning
    ds = ds.map(lambda ex: {k: ex[k] for k in lengths})
  ds = seqio.EncDecFeatureConverter(pack=pack)(ds, lengths)
  return ds.batch(batch_size, drop_remainder=True)


def train_batches(
  name: str,
  *,
  batch_size: int,
  seed: int = 0,
  start_step: int = 0,
  shuffle: bool = True,
  shard: Optional[seqio.ShardInfo] = None,
  pack: bool = False,
) -> Iterator[Batch]:
  """Endless deterministic training batches, resumed at `start_step`
  (`pack`: several examples per row, as t5x's run configs train).

  The whole pipeline is a function of `seed`, so skipping the first
  `start_step` batches puts a resumed run at the same data position. With
  `shard`, the batches hold that shard's examples only (each process feeds
  its `batch_size` rows of the global batch); every shard picks the same task
  for a given step, since the mixture sampling depends only on `seed`.
  """
  rates = task_rates(name)
  check_ready(name, 'train')
  per_task = [
    _task_batches(
      task,
      feature_lengths(task),
      'train',
      batch_size,
      seed,
      shuffle,
      None,
      shard,
      pack,
    )
    for task in rates
  ]
  weights = np.array(list(rates.values()), np.float64)
  ds = (
    per_task[0]
    if len(per_task) == 1
    else tf.data.Dataset.sample_from_datasets(
      per_task, weights=list(weights / weights.sum()), seed=seed
    )
  )
  ds = ds.skip(start_step).prefetch(2)
  return ds.as_numpy_iterator()


def first_batches(
  name: str,
  split: str,
  *,
  batch_size: int,
  batches_per_task: int,
  shard: Optional[seqio.ShardInfo] = None,
  pack: bool = False,
) -> list[Batch]:
  """The first `batches_per_task` batches of each task's split, unshuffled,
  in the training batches' layout: what training reports on (validation),
  and one batch of each shape a mixture trains on (compiled up front)."""
  check_ready(name, split)
  out = []
  for task in task_rates(name):
    ds = _task_batches(
      task, feature_lengths(task), split, batch_size, 0, False, 1, shard, pack
    )
    out += list(ds.take(batches_per_task).as_numpy_iterator())
  if not out:
    raise DataError(f'{name!r} has no {split} batch of {batch_size} examples')
  return out


def _raw_examples(
  task_name: str, split: str, num_examples: Optional[int]
) -> list[dict]:
  """Tokenized examples with their text: inputs, targets, *_pretokenized."""
  task = get_task_or_mixture(task_name)
  if split not in task.splits:
    raise DataError(
      f'task {task_name!r} has no split {split!r}; it has: '
      f'{", ".join(task.splits)}'
    )
  check_ready(task_name, split)
  # No in-memory cache: it asks the source for its size, which TFDS mocks
  # (and sources without metadata) cannot answer.
  ds = task.get_dataset(
    feature_lengths(task_name),
    split=split,
    shuffle=False,
    num_epochs=1,
    try_in_mem_cache=False,
  )
  if num_examples is not None:
    ds = ds.take(num_examples)
  examples = list(ds.as_numpy_iterator())
  if not examples:
    raise DataError(f'task {task_name!r} split {split!r} has no examples')
  return examples


class SeqioVocabulary:
  """A SeqIO vocabulary as a `examples.Vocabulary`."""

  def __init__(self, vocabulary: seqio.Vocabulary):
    self.vocabulary = vocabulary

  def decode(self, ids) -> str:
    return self.vocabulary.decode([int(i) for i in ids])

  def pieces(self, ids) -> list[str]:
    tokenizer = self.vocabulary.tokenizer
    size = tokenizer.GetPieceSize()
    return [
      tokenizer.id_to_piece(int(i))
      if int(i) < size
      else f'<extra_id_{int(i) - size}>'
      for i in ids
    ]


def _example(raw: dict) -> examples_lib.Example:
  text = lambda key: raw[key].decode()
  # Tasks that keep every reference answer (SQuAD) are scored against all.
  references = (
    [a.decode() for a in raw['answers']] if 'answers' in raw else None
  )
  return examples_lib.Example(
    inputs=text('inputs_pretokenized'),
    input_ids=tuple(int(i) for i in raw['inputs']),
    targets=text('targets_pretokenized'),
    target_ids=tuple(int(i) for i in raw['targets']),
    references=references,
  )


def task_examples(
  task_name: str, split: str, *, num_examples: Optional[int] = None
) -> examples_lib.ExampleSet:
  """The first `num_examples` examples of a task split, ready to decode
  and score with the task's metrics."""
  raw = _raw_examples(task_name, split, num_examples)
  task = seqio.get_mixture_or_task(task_name)
  lengths = feature_lengths(task_name)
  return examples_lib.ExampleSet(
    name=task_name,
    fingerprint={
      'task': task_name,
      'split': split,
      'num_examples': num_examples,
      'feature_lengths': lengths,
    },
    lengths=lengths,
    examples=tuple(_example(r) for r in raw),
    vocabulary=SeqioVocabulary(task.output_features['targets'].vocabulary),
    metrics=task_metrics(task_name),
  )


def task_metrics(task_name: str) -> task_info.TaskMetrics:
  """How a registered task's outputs are scored (its SeqIO metric_fns)."""
  task = get_task_or_mixture(task_name)
  if isinstance(task, seqio.Mixture):
    raise DataError(f'{task_name!r} is a mixture; score its tasks one by one')
  return task_info.TaskMetrics(task_name, tuple(task.metric_fns))


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
    raise DataError(
      f'vocabulary of {name!r} has {size.vocab_size} ids but '
      f'the model has vocab_size={model_vocab_size}'
    )


def max_feature_lengths(name: str) -> dict[str, int]:
  """The longest input and target length over a mixture's tasks: what a
  model trained on it takes and produces (model.json records it)."""
  lengths = [feature_lengths(task) for task in task_rates(name)]
  return {key: max(l[key] for l in lengths) for key in ('inputs', 'targets')}
