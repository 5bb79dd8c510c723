"""The paper's SeqIO tasks, offline: TFDS mocks, a stand-in vocabulary,
T5's preprocessing conventions and fail-fast errors for missing inputs."""

import os
import re
import shlex
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from calm_jax.data import pipeline
from calm_jax.scoring import metrics
from calm_jax.tasks import data_settings
from calm_jax.tasks import paper_tasks

import entry_points  # tests/entry_points.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN_VOCAB = os.path.join(REPO, 'tasks', 'vocab', 'calm_synth.model')
PREFIXES = {
  'cnn_dailymail_v3': 'summarize: ',
  'wmt15_enfr': 'translate English to French: ',
  'squad_v010_allanswers': 'question: ',
}


@pytest.fixture
def standin_vocab():
  """The small embedded SentencePiece model in place of T5's."""
  data_settings.set_overrides(t5_vocabulary=STANDIN_VOCAB)
  yield
  data_settings.set_overrides()


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else value


def _run_preprocessor(preprocessor, example: dict) -> dict:
  ds = preprocessor(tf.data.Dataset.from_tensors(example))
  out = next(iter(ds.as_numpy_iterator()))
  return {
    k: ([_text(x) for x in v] if isinstance(v, np.ndarray) else _text(v))
    for k, v in out.items()
  }


# Expected strings are what t5 0.9.4's own preprocessors (t5.data.
# preprocessors.summarize / translate / squad) return on the same examples.
def test_cnn_and_wmt_preprocessors_are_t5s():
  cnn = _run_preprocessor(
    paper_tasks.summarize_cnn_dailymail,
    {
      'article': 'Storms  hit.\nTwo died.',
      'highlights': 'Two men died.\nPolice said so.',
    },
  )
  # Untouched: the highlight lines reach ROUGE-Lsum as sentences.
  assert cnn == {
    'inputs': 'summarize: Storms  hit.\nTwo died.',
    'targets': 'Two men died.\nPolice said so.',
  }
  wmt = _run_preprocessor(
    paper_tasks.translate_en_to_fr, {'en': 'Good  morning.', 'fr': 'Bonjour.'}
  )
  assert wmt == {
    'inputs': 'translate English to French: Good  morning.',
    'targets': 'Bonjour.',
  }


SQUAD_CASES = [
  # Letters of any script stay whole; ASCII punctuation (underscore too)
  # is padded; curly quotes, dashes, '€' and '…' are not.
  (
    {
      'question': 'Who’s “the” best_player? (née X)',
      'context': 'Tōkyō (東京) is big_city. Naïve café, 50€. “Quoted” '
      'don’t… a–b',
      'answers': ['Beyoncé Knowles', 'U.S.', '50€.'],
    },
    {
      'inputs': 'question: Who’s “the” best _ player ? ( née X ) context: '
      'Tōkyō ( 東京 ) is big _ city . Naïve café , 50€ . “Quoted” '
      'don’t… a–b',
      'targets': 'Beyoncé Knowles',
      'answers': ['Beyoncé Knowles', 'U . S . ', '50€ . '],
    },
  ),
  (
    {
      'question': "What's 2+2=4 [sic] {x} <y> @z #1 $5 %6 ^7 &8 *9 ~ | \\ "
      '/ ; :',
      'context': "Μόσχα — Москва; «Moskva» ‘quoted’ `tick` 'single' "
      '"double"\ttab\n\nnewline  spaces',
      'answers': ['Москва', "'single'"],
    },
    {
      'inputs': "question: What ' s 2 + 2 = 4 [ sic ] { x } < y > @ z # 1 "
      '$ 5 % 6 ^ 7 & 8 * 9 ~ | \\ / ; : context: Μόσχα — Москва ; '
      '«Moskva» ‘quoted’ ` tick ` \' single \' " double " tab '
      'newline spaces',
      'targets': 'Москва',
      'answers': ['Москва', " ' single ' "],
    },
  ),
  (
    {
      'question': 'ÀÉÎÕÜ çñ ß?',
      'context': 'São Paulo, Zürich; Kraków... Ελλάδα! हिन्दी؟ العربية، עברית.',
      'answers': ['São Paulo'],
    },
    {
      'inputs': 'question: ÀÉÎÕÜ çñ ß ? context: São Paulo , Zürich ; '
      'Kraków . . . Ελλάδα ! हिन्दी؟ العربية، עברית . ',
      'targets': 'São Paulo',
      'answers': ['São Paulo'],
    },
  ),
]


@pytest.mark.parametrize('raw, expected', SQUAD_CASES)
def test_squad_preprocessor_is_t5s(raw, expected):
  out = _run_preprocessor(
    paper_tasks.squad_open_book,
    {
      'id': 'q1',
      'question': raw['question'],
      'context': raw['context'],
      'answers': {
        'text': raw['answers'],
        'answer_start': [0] * len(raw['answers']),
      },
    },
  )
  assert out == {**expected, 'id': 'q1'}


def test_squad_prediction_with_accents_scores_as_in_t5():
  out = _run_preprocessor(
    paper_tasks.squad_open_book,
    {
      'id': 'q',
      'question': 'Who sang?',
      'context': 'Beyoncé Knowles sang.',
      'answers': {'text': ['Beyoncé Knowles'], 'answer_start': [0]},
    },
  )
  assert metrics.squad([out['answers']], ['Beyoncé Knowles']) == {
    'f1': 100.0,
    'em': 100.0,
  }


def test_squad_postprocessor_scores_against_every_answer():
  example = {'answers': [b'Paris', b'the city of Paris']}
  assert paper_tasks.squad_references(
    b'x', example=example, is_target=True
  ) == ['Paris', 'the city of Paris']
  assert paper_tasks.squad_references('Paris') == 'Paris'


@pytest.mark.parametrize('task', sorted(paper_tasks.TASKS))
def test_task_yields_tokenised_batches_under_mock_data(task, standin_vocab):
  vocab = paper_tasks.VOCABULARY
  lengths = pipeline.feature_lengths(task)
  with tfds.testing.mock_data(num_examples=4):
    examples = pipeline.task_examples(task, 'validation', num_examples=3)
    batch = next(pipeline.train_batches(task, batch_size=2))
  assert len(examples) == 3 and examples.lengths == lengths
  for ex in examples.examples:
    assert ex.inputs.startswith(PREFIXES[task])
    for text, tokens, length in (
      (ex.inputs, ex.input_ids, lengths['inputs']),
      (ex.targets, ex.target_ids, lengths['targets']),
    ):
      tokens = list(tokens)
      assert tokens[-1] == 1 and 1 not in tokens[:-1]  # one EOS, at the end
      assert 2 < len(tokens) <= length
      assert vocab.decode(tokens[:-1]) == ' '.join(text.split())
  assert batch['encoder_input_tokens'].shape == (2, lengths['inputs'])
  targets = batch['decoder_target_tokens']
  assert targets.shape == (2, lengths['targets'])
  np.testing.assert_array_equal(
    batch['decoder_input_tokens'][:, 1:], targets[:, :-1]
  )
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
  np.testing.assert_array_equal(batch['decoder_loss_weights'], targets > 0)


def test_squad_eval_batches_keep_every_reference(standin_vocab):
  with tfds.testing.mock_data(num_examples=4):
    examples = pipeline.task_examples(
      'squad_v010_allanswers', 'validation', num_examples=2
    )
  for ex, references in zip(examples.examples, examples.references):
    assert isinstance(references, list) and references == ex.references
    assert references[0] == ex.targets
  per_example = lambda task: pipeline.task_metrics(task).per_example()
  assert per_example('squad_v010_allanswers') == 'f1'
  assert per_example('cnn_dailymail_v3') == 'rougeL'
  assert per_example('wmt15_enfr') == 'bleu'


def _cnn_highlights_dataset(self, *args, **kwargs):
  del self, args, kwargs
  return tf.data.Dataset.from_tensor_slices(
    {
      'article': ['Storms hit. Two men died. Police said so.'],
      'highlights': ['Police said so.\nTwo men died.'],
      'id': ['a'],
    }
  )


def test_cnn_dailymail_is_scored_on_highlight_lines_as_t5(standin_vocab):
  # TFDS 3.4.0 layout: a highlight a line. T5's pipeline scores this
  # prediction rougeLsum 100; joining the lines with spaces gave 50.
  with tfds.testing.mock_data(as_dataset_fn=_cnn_highlights_dataset):
    examples = pipeline.task_examples(
      'cnn_dailymail_v3', 'validation', num_examples=1
    )
  assert examples.references == ['Police said so.\nTwo men died.']
  scores = examples.metrics.scores(
    examples.references, ['Two men died. Police said so.']
  )
  assert scores['rougeLsum'] == pytest.approx(100.0)
  assert scores['rougeL'] == pytest.approx(50.0)


def test_t5_vocabulary_is_t5s_by_default_and_follows_the_environment(
  monkeypatch,
):
  monkeypatch.delenv(data_settings.VOCABULARY_ENV, raising=False)
  assert paper_tasks.T5Vocabulary().sentencepiece_model_file == (
    data_settings.DEFAULT_T5_VOCABULARY
  )
  monkeypatch.setenv(data_settings.VOCABULARY_ENV, STANDIN_VOCAB)
  vocab = paper_tasks.T5Vocabulary()
  # 1,024 pieces of the stand-in plus T5's 100 sentinel ids.
  assert vocab.vocab_size == 1024 + paper_tasks.T5_EXTRA_IDS
  assert vocab.sentencepiece_model_file == STANDIN_VOCAB
  data_settings.set_overrides(t5_vocabulary='/elsewhere/spm.model')
  try:  # gin's choice wins over the environment
    assert data_settings.t5_vocabulary_path() == '/elsewhere/spm.model'
  finally:
    data_settings.set_overrides()


def test_unreadable_vocabulary_fails_fast_with_a_fix(monkeypatch, tmp_path):
  monkeypatch.setenv(
    data_settings.VOCABULARY_ENV, str(tmp_path / 'missing.model')
  )
  with pytest.raises(
    data_settings.VocabularyError, match='not found.*CALM_T5_VOCAB='
  ):
    _ = paper_tasks.T5Vocabulary().vocab_size
  # The default gs:// file, with sockets off (conftest): no retries.
  monkeypatch.delenv(data_settings.VOCABULARY_ENV)
  start = time.perf_counter()
  with pytest.raises(
    data_settings.VocabularyError,
    match='unreachable.*data_settings.t5_vocabulary',
  ):
    _ = paper_tasks.T5Vocabulary().vocab_size
  assert time.perf_counter() - start < 5


def test_missing_tfds_data_fails_fast(standin_vocab, tmp_path):
  data_settings.set_overrides(
    t5_vocabulary=STANDIN_VOCAB, tfds_data_dir=str(tmp_path)
  )
  start = time.perf_counter()
  try:
    with pytest.raises(
      pipeline.DataError, match=r'no TFDS data .*wmt15_translate.*tfds build'
    ):
      pipeline.task_examples('wmt15_enfr', 'validation', num_examples=1)
  finally:
    data_settings.set_overrides(t5_vocabulary=STANDIN_VOCAB)
    pipeline.check_ready('synth_qa', 'validation')  # drops the dir override
  assert time.perf_counter() - start < 10


def test_train_entry_point_stops_in_one_line_before_writing(tmp_path):
  model_dir = tmp_path / 'model'
  args = [
    '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
    '--gin_file=gin/runs/train.gin',
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='squad_v010_allanswers'",
    '--gin.calm_jax.T5Config.vocab_size=1152',
    f"--gin.calm_jax.data_settings.tfds_data_dir='{tmp_path}'",
  ]
  # New processes: the vocabulary this process loaded stays cached in it.
  missing_vocab = entry_points.run_subprocess(
    'calm_jax.train',
    *args,
    "--gin.calm_jax.data_settings.t5_vocabulary='/no/spm.model'",
  )
  assert missing_vocab.returncode == 2, missing_vocab.stderr
  assert (
    missing_vocab.stderr.strip()
    .splitlines()[-1]
    .startswith('error: T5 vocabulary not found at /no/spm.model')
  )
  missing_data = entry_points.run_subprocess(
    'calm_jax.train',
    *args,
    f"--gin.calm_jax.data_settings.t5_vocabulary='{STANDIN_VOCAB}'",
  )
  assert missing_data.returncode == 2, missing_data.stderr
  assert (
    missing_data.stderr.strip()
    .splitlines()[-1]
    .startswith("error: no TFDS data for task 'squad_v010_allanswers'")
  )
  assert not model_dir.exists()
  # The hint's flag, with a directory, is one the command takes.
  [flag] = re.findall(r'`(--gin[^`]+)`', missing_data.stderr)
  checked = entry_points.run_module(
    'calm_jax.train',
    *args[:-1],
    *shlex.split(flag.replace('DIR', str(tmp_path))),  # as a shell would
    check_only=True,
  )
  assert checked.returncode == 0, checked.stderr
