"""The paper's SeqIO tasks, offline: TFDS mocks, a stand-in vocabulary,
T5's preprocessing conventions and fail-fast errors for missing inputs."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from calm_jax import data
from calm_jax import evaluation
from tasks import data_settings
from tasks import paper_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN_VOCAB = os.path.join(REPO, 'tasks', 'vocab', 'calm_synth.model')
PREFIXES = {'cnn_dailymail_v3': 'summarize: ',
            'wmt15_enfr': 'translate English to French: ',
            'squad_v010_allanswers': 'question: '}


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
  return {k: ([_text(x) for x in v] if isinstance(v, np.ndarray) else
              _text(v)) for k, v in out.items()}


def test_preprocessors_follow_t5s_conventions():
  cnn = _run_preprocessor(paper_tasks.summarize_cnn_dailymail, {
      'article': 'Storms hit the coast.\nTwo  died.',
      'highlights': 'Two men died .\nPolice said so .'})
  assert cnn == {'inputs': 'summarize: Storms hit the coast. Two died.',
                 'targets': 'Two men died . Police said so .'}
  wmt = _run_preprocessor(paper_tasks.translate_en_to_fr,
                          {'en': 'Good morning.', 'fr': 'Bonjour.'})
  assert wmt == {'inputs': 'translate English to French: Good morning.',
                 'targets': 'Bonjour.'}
  squad = _run_preprocessor(paper_tasks.squad_open_book, {
      'id': 'q1', 'question': "What's the capital of France?",
      'context': 'Paris is the capital.',
      'answers': {'text': ['Paris', 'Paris,'], 'answer_start': [0, 0]}})
  assert squad == {
      'inputs': "question: What ' s the capital of France ? context: Paris "
                'is the capital .',
      'targets': 'Paris', 'answers': ['Paris', 'Paris ,'], 'id': 'q1'}


def test_squad_postprocessor_scores_against_every_answer():
  example = {'answers': [b'Paris', b'the city of Paris']}
  assert paper_tasks.squad_references(b'x', example=example,
                                      is_target=True) == [
                                          'Paris', 'the city of Paris']
  assert paper_tasks.squad_references('Paris') == 'Paris'


@pytest.mark.parametrize('task', sorted(paper_tasks.TASKS))
def test_task_yields_tokenised_batches_under_mock_data(task, standin_vocab):
  vocab = paper_tasks.VOCABULARY
  lengths = data.feature_lengths(task)
  with tfds.testing.mock_data(num_examples=4):
    examples = data.eval_examples(task, 'validation', num_examples=3)
    batch = next(data.train_batches(task, batch_size=2))
  assert len(examples) == 3
  for ex in examples:
    inputs_text = ex['inputs_pretokenized'].decode()
    assert inputs_text.startswith(PREFIXES[task])
    for feature in ('inputs', 'targets'):
      tokens = list(ex[feature])
      assert tokens[-1] == 1 and 1 not in tokens[:-1]  # one EOS, at the end
      assert 2 < len(tokens) <= lengths[feature]
      text = ex[f'{feature}_pretokenized'].decode()
      assert vocab.decode(tokens[:-1]) == ' '.join(text.split())
  assert batch['encoder_input_tokens'].shape == (2, lengths['inputs'])
  targets = batch['decoder_target_tokens']
  assert targets.shape == (2, lengths['targets'])
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                targets[:, :-1])
  np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
  np.testing.assert_array_equal(batch['decoder_loss_weights'], targets > 0)


def test_squad_eval_batches_keep_every_reference(standin_vocab):
  with tfds.testing.mock_data(num_examples=4):
    examples = data.eval_examples('squad_v010_allanswers', 'validation',
                                  num_examples=2)
    batch = next(evaluation.eval_batches('squad_v010_allanswers',
                                         'validation', batch_size=2,
                                         num_examples=2))
  for ex, references in zip(examples, batch.references):
    assert references == [a.decode() for a in ex['answers']]
    assert references[0] == ex['targets_pretokenized'].decode()
  assert data.per_example_metric('squad_v010_allanswers') == 'f1'
  assert data.per_example_metric('cnn_dailymail_v3') == 'rougeL'
  assert data.per_example_metric('wmt15_enfr') == 'bleu'


def test_t5_vocabulary_is_t5s_by_default_and_follows_the_environment(
    monkeypatch):
  monkeypatch.delenv(data_settings.VOCABULARY_ENV, raising=False)
  assert paper_tasks.T5Vocabulary().sentencepiece_model_file == (
      data_settings.DEFAULT_T5_VOCABULARY)
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
  monkeypatch.setenv(data_settings.VOCABULARY_ENV,
                     str(tmp_path / 'missing.model'))
  with pytest.raises(data_settings.VocabularyError,
                     match='not found.*CALM_T5_VOCAB='):
    _ = paper_tasks.T5Vocabulary().vocab_size
  # The default gs:// file, with sockets off (conftest): no retries.
  monkeypatch.delenv(data_settings.VOCABULARY_ENV)
  start = time.perf_counter()
  with pytest.raises(data_settings.VocabularyError,
                     match='unreachable.*data_settings.t5_vocabulary'):
    _ = paper_tasks.T5Vocabulary().vocab_size
  assert time.perf_counter() - start < 5


def test_missing_tfds_data_fails_fast(standin_vocab, tmp_path):
  data_settings.set_overrides(t5_vocabulary=STANDIN_VOCAB,
                              tfds_data_dir=str(tmp_path))
  start = time.perf_counter()
  try:
    with pytest.raises(data.DataError,
                       match=r'no TFDS data .*wmt15_translate.*tfds build'):
      data.eval_examples('wmt15_enfr', 'validation', num_examples=1)
  finally:
    data_settings.set_overrides(t5_vocabulary=STANDIN_VOCAB)
    data.check_ready('synth_qa', 'validation')  # drops the dir override
  assert time.perf_counter() - start < 10


def test_train_entry_point_stops_in_one_line_before_writing(tmp_path):
  model_dir = tmp_path / 'model'
  cmd = [sys.executable, '-m', 'calm_jax.train',
         '--gin_file=gin/models/calm_t5_1_1_tiny.gin',
         '--gin_file=gin/runs/train.gin',
         f"--gin.MODEL_DIR='{model_dir}'",
         "--gin.MIXTURE_OR_TASK_NAME='squad_v010_allanswers'",
         '--gin.calm_jax.T5Config.vocab_size=1152',
         f"--gin.calm_jax.data_settings.tfds_data_dir='{tmp_path}'"]
  env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
  missing_vocab = subprocess.run(
      cmd + ["--gin.calm_jax.data_settings.t5_vocabulary='/no/spm.model'"],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
  assert missing_vocab.returncode == 2
  assert missing_vocab.stderr.strip().splitlines()[-1].startswith(
      'error: T5 vocabulary not found at /no/spm.model')
  missing_data = subprocess.run(
      cmd + [f"--gin.calm_jax.data_settings.t5_vocabulary='{STANDIN_VOCAB}'"],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
  assert missing_data.returncode == 2
  assert missing_data.stderr.strip().splitlines()[-1].startswith(
      "error: no TFDS data for task 'squad_v010_allanswers'")
  assert not model_dir.exists()
