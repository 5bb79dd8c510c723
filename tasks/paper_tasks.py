"""SeqIO registration of the paper's tasks over TFDS, as t5 0.9.4 does them.

The preprocessors and metrics give the `t5` package's results (its
`summarize`, `translate` and `squad` preprocessors, its `rouge`, `bleu` and
`squad` metrics); tests/test_paper_tasks.py and tests/test_metrics.py hold
the expected strings and scores.

  cnn_dailymail_v3       cnn_dailymail:3.4.0      "summarize: " + article ->
                         highlights; ROUGE-1/2/Lsum as T5, plus ROUGE-L
                         (the paper's headline)
  wmt15_enfr             wmt15_translate/fr-en:1.0.0
                         "translate English to French: " + en -> fr; BLEU
  squad_v010_allanswers  squad/v1.1:3.0.0
                         "question: ... context: ..." -> first answer, every
                         answer kept for scoring; token F1 and exact match

Data is the user's to prepare (`tfds build` where there is network, then
TFDS_DATA_DIR): sources are read-only, so a missing dataset fails at once
instead of entering TFDS's download retries. The vocabulary is T5's
SentencePiece model (32,000 pieces + 100 extra ids), resolved when first
used; see tasks/data_settings.py for overriding it.
"""

import dataclasses
from typing import Callable
from typing import Optional

import seqio
import tensorflow as tf

from calm_jax.data import task_info
from calm_jax.scoring import metrics
from calm_jax.tasks import data_settings

T5_EXTRA_IDS = 100


class T5Vocabulary(seqio.SentencePieceVocabulary):
  """T5's SentencePiece vocabulary whose file is chosen when first loaded,
  so a gin binding or CALM_T5_VOCAB set after import still applies."""

  def __init__(self):
    super().__init__(
      data_settings.DEFAULT_T5_VOCABULARY, extra_ids=T5_EXTRA_IDS
    )

  @property
  def sentencepiece_model_file(self) -> str:
    if self._model is None:
      return data_settings.t5_vocabulary_path()
    return self._sentencepiece_model_file

  def _model_context(self):
    if self._model is None:
      self._sentencepiece_model_file = data_settings.readable_vocabulary_path()
    return super()._model_context()


VOCABULARY = T5Vocabulary()
OUTPUT_FEATURES = {
  'inputs': seqio.Feature(VOCABULARY, add_eos=True, required=False),
  'targets': seqio.Feature(VOCABULARY, add_eos=True),
}


def _collapse_spaces(text: tf.Tensor) -> tf.Tensor:
  return tf.strings.regex_replace(text, r'\s+', ' ')


def pad_punctuation(text: tf.Tensor) -> tf.Tensor:
  """T5's SQuAD convention: a space on each side of every ASCII punctuation
  mark (RE2's [[:punct:]], so `_` too), then runs of whitespace collapsed.

  Letters of any script stay whole (`Beyoncé`, `東京`), and non-ASCII marks
  (curly quotes, `€`, `…`) are left in place, exactly as t5 0.9.4 does; no
  strip, so a trailing mark leaves a trailing space as in T5's targets.
  """
  return _collapse_spaces(
    tf.strings.regex_replace(text, r'([[:punct:]])', r' \1 ')
  )


def _join_words(parts) -> tf.Tensor:
  return _collapse_spaces(tf.strings.join(parts, separator=' '))


@seqio.map_over_dataset
def summarize_cnn_dailymail(x):
  """Article -> highlights, untouched, as t5's `summarize` preprocessor.

  TFDS 3.4.0 puts one highlight sentence per line; the newlines reach the
  metric through `targets_pretokenized`, which is how ROUGE-Lsum sees the
  reference's sentences (SentencePiece maps them to spaces for training).
  """
  return {
    'inputs': tf.strings.join(['summarize:', x['article']], ' '),
    'targets': x['highlights'],
  }


@seqio.map_over_dataset
def translate_en_to_fr(x):
  return {
    'inputs': tf.strings.join(['translate English to French: ', x['en']]),
    'targets': x['fr'],
  }


@seqio.map_over_dataset
def squad_open_book(x):
  """Question and context -> the first answer; all answers kept (T5's
  `squad` preprocessor, include_context=True)."""
  answers = pad_punctuation(x['answers']['text'])  # [n]
  inputs = _join_words(
    [
      'question:',
      pad_punctuation(x['question']),
      'context:',
      pad_punctuation(x['context']),
    ]
  )
  return {
    'inputs': inputs,
    'targets': answers[0],
    'answers': answers,
    'id': x['id'],
  }


def squad_references(output_or_target, example=None, is_target=False):
  """seqio postprocessor: a target becomes all of its reference answers."""
  if is_target:
    return [tf.compat.as_text(a) for a in example['answers']]
  return output_or_target


@dataclasses.dataclass(frozen=True)
class PaperTask:
  tfds_name: str
  splits: tuple[str, ...]
  preprocessor: Callable
  metric_fn: Callable
  headline_metric: str  # the metric the task is judged by
  feature_lengths: dict[str, int]  # T5-style defaults; override per run
  postprocess_fn: Optional[Callable] = None


TASKS = {
  'cnn_dailymail_v3': PaperTask(
    'cnn_dailymail:3.4.0',
    ('train', 'validation', 'test'),
    summarize_cnn_dailymail,
    metrics.rouge,
    'rougeL',
    {'inputs': 512, 'targets': 128},
  ),
  # T5's wmt15_enfr_v003, the same preprocessing and corpus BLEU.
  'wmt15_enfr': PaperTask(
    'wmt15_translate/fr-en:1.0.0',
    ('train', 'validation', 'test'),
    translate_en_to_fr,
    metrics.bleu,
    'bleu',
    {'inputs': 256, 'targets': 128},
  ),
  'squad_v010_allanswers': PaperTask(
    'squad/v1.1:3.0.0',
    ('train', 'validation'),
    squad_open_book,
    metrics.squad,
    'f1',
    {'inputs': 512, 'targets': 32},
    postprocess_fn=squad_references,
  ),
}


def register() -> None:
  """Registers the three tasks (idempotent)."""
  for name, task in TASKS.items():
    task_info.register(
      name, feature_lengths=task.feature_lengths, headline=task.headline_metric
    )
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
      name,
      source=seqio.TfdsDataSource(
        task.tfds_name, splits=task.splits, read_only=True
      ),
      preprocessors=[
        task.preprocessor,
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=OUTPUT_FEATURES,
      postprocess_fn=task.postprocess_fn,
      metric_fns=[task.metric_fn],
    )


register()
