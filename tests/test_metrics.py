"""metrics.py: per-example and corpus scores on hand-checked cases.

Every expected score marked "T5" is what t5 0.9.4's own
t5.evaluation.metrics function returns on the same inputs (its `rouge`
after np.random.seed(0)).
"""

import numpy as np
import pytest

from calm_jax.scoring import metrics


def test_squad_normalisation_and_f1():
  assert metrics.normalize_squad('The  Cat, sat!') == 'cat sat'
  f1 = metrics.token_f1_per_example(
    ['the red cat', ['a dog', 'red cat']], ['red dog', 'Red cat.']
  )
  np.testing.assert_allclose(f1, [0.5, 1.0])
  em = metrics.exact_match_per_example([['a dog', 'red cat']], ['Red cat.'])
  np.testing.assert_allclose(em, [1.0])
  assert metrics.squad(['x y'], ['x'])['f1'] == pytest.approx(100 * 2 / 3)


def test_rouge_and_bleu_are_one_for_identical_text_and_lower_otherwise():
  targets = ['lyon : 42 orders , up 3 percent .']
  same = metrics.rouge_per_example(targets, targets)
  other = metrics.rouge_per_example(targets, ['paris : 42 orders .'])
  np.testing.assert_allclose(same, [1.0])
  assert 0 < other[0] < 1
  assert metrics.bleu(targets, targets)['bleu'] == pytest.approx(100.0)
  assert metrics.bleu_per_example(targets, ['nothing alike'])[0] < 0.2


def test_squad_normalisation_drops_articles_punctuation_and_spaces():
  assert metrics.normalize_squad('An  apple, THE pear; a-b!') == 'apple pear ab'
  assert metrics.normalize_squad('theater anthem') == 'theater anthem'
  # "big red dog" against "red dog": precision 2/3, recall 1, F1 0.8; the
  # other reference shares nothing, and the max over references is taken.
  f1 = metrics.token_f1_per_example(
    [['a red dog', 'cat']], ['The big red dog.']
  )
  np.testing.assert_allclose(f1, [0.8])
  em = metrics.exact_match_per_example(
    [['pear', 'apple'], ['pear']], ['An apple!', 'apples']
  )
  np.testing.assert_allclose(em, [1.0, 0.0])
  scores = metrics.squad(
    [['a red dog', 'cat'], ['pear']], ['The big red dog.', 'pear']
  )
  assert scores == pytest.approx({'f1': 90.0, 'em': 50.0})


def test_rouge_l_on_known_strings():
  # LCS of 5 tokens: precision 5/5, recall 5/6, F = 10/11.
  score = metrics.rouge_per_example(
    ['the cat sat on the mat'], ['the cat on the mat']
  )
  np.testing.assert_allclose(score, [10 / 11])


def test_summary_rouge_splits_sentences_as_t5_for_rouge_lsum():
  # Same two sentences in the other order: the plain LCS keeps 3 of 5
  # tokens, the sentence-level union LCS all 5.
  scores = metrics.rouge(
    ['police said . two men died .'], ['two men died . police said .']
  )
  assert scores['rougeL'] == pytest.approx(60.0)
  assert scores['rougeLsum'] == pytest.approx(100.0)
  assert metrics.split_summary_sentences('a b . c d .') == 'a b .\nc d .'


def test_rouge_lsum_reads_cnn_dailymail_highlight_lines():
  # TFDS cnn_dailymail 3.4.0 highlights: one sentence a line, '.' without a
  # space, so " . " never splits them; the newlines do. The model's output
  # (SentencePiece text) has no newline. T5: rougeLsum 100.0; the same
  # reference joined onto one line scores 50.0.
  reference = 'Police said so.\nTwo men died.'
  prediction = 'Two men died. Police said so.'
  assert metrics.rouge([reference], [prediction])['rougeLsum'] == (
    pytest.approx(100.0)
  )
  assert metrics.rouge([reference.replace('\n', ' ')], [prediction])[
    'rougeLsum'
  ] == pytest.approx(50.0)


# Three CNN/DM-style pairs; T5's scores on them (np.random.seed(0)).
CNN_REFERENCES = [
  'Two men died.\nPolice said so.\nThe storm moved on.',
  'Rain fell all day .\nRoads closed .',
  'A cat sat on the mat. Dogs ran.',
]
CNN_PREDICTIONS = [
  'Two men died. Police said so. The storm moved east.',
  'Rain fell all day . Roads were closed .',
  'The cats were sitting on mats and dogs running.',
]


def test_rouge_equals_t5s_corpus_rouge_without_stemming():
  scores = metrics.rouge(CNN_REFERENCES, CNN_PREDICTIONS)
  assert scores == pytest.approx(
    {
      'rouge1': 72.5339,
      'rouge2': 53.8721,
      'rougeLsum': 68.6124,
      'rougeL': 68.6124,
    },
    abs=1e-4,
  )
  # Stemming (an option, off as in T5) matches "cats"/"cat", "mats"/"mat".
  stemmed = metrics.rouge(CNN_REFERENCES, CNN_PREDICTIONS, use_stemmer=True)
  assert stemmed['rouge1'] == pytest.approx(80.3771, abs=1e-4)
  per_example = metrics.rouge_per_example(CNN_REFERENCES, CNN_PREDICTIONS)
  np.testing.assert_allclose(per_example, [0.9, 12 / 13, 4 / 17])


def test_rouge_reports_the_seeded_bootstrap_median_not_the_mean():
  # Skewed per-example scores: the bootstrap median sits off the mean.
  targets = ['a b c d e f g h i j'] * 5
  predictions = ['a', 'a b', 'a b c', 'x', 'a b c d e f g h i j']
  median = metrics.rouge(targets, predictions)
  mean = metrics.rouge(targets, predictions, bootstrap=False)
  assert mean['rouge1'] == pytest.approx(
    100 * (2 / 11 + 1 / 3 + 6 / 13 + 1) / 5
  )
  assert median['rouge1'] != pytest.approx(mean['rouge1'], abs=1e-3)
  assert median['rouge1'] == pytest.approx(37.5758, abs=1e-4)  # T5
  assert abs(median['rouge1'] - mean['rouge1']) < 5
  # Reproducible, and the caller's numpy random state is left as it was.
  np.random.seed(11)
  expected_draw = np.random.rand()
  np.random.seed(11)
  assert metrics.rouge(targets, predictions) == median
  assert np.random.rand() == expected_draw


def test_squad_f1_of_a_gold_answer_that_normalises_to_nothing_is_zero():
  # The official v1.1 rule, as T5: no shared token, F1 0, though the empty
  # strings are exactly equal (EM 100).
  assert metrics.squad([['the']], ['the']) == {'f1': 0.0, 'em': 100.0}
  assert metrics.squad([['...']], ['x']) == {'f1': 0.0, 'em': 0.0}
  assert metrics.squad([['the']], ['an']) == {'f1': 0.0, 'em': 100.0}
  # Another gold answer still counts: the max over answers is taken.
  assert metrics.squad([['the', 'Paris']], ['Paris']) == {
    'f1': 100.0,
    'em': 100.0,
  }


def test_squad_scores_on_t5_padded_references_as_t5():
  targets = [
    ['Beyoncé Knowles'],
    ['the'],
    ['...'],
    ['the', 'Paris'],
    ['U . S . ', 'United States'],
    ['Tōkyō'],
    ['a red cat', 'cat'],
    ['the'],
  ]
  predictions = [
    'Beyoncé Knowles',
    'the',
    'x',
    'Paris',
    'US',
    'Tokyo',
    'Red cat!',
    'an',
  ]
  np.testing.assert_allclose(
    metrics.token_f1_per_example(targets, predictions), [1, 0, 0, 1, 0, 0, 1, 0]
  )
  assert metrics.squad(targets, predictions) == pytest.approx(
    {'f1': 37.5, 'em': 62.5}
  )


def test_wmt_bleu_is_t5s_corpus_bleu_not_a_mean_of_sentences():
  targets = [
    'Le chat est assis sur le tapis.',
    'Bonjour à tous, mes amis.',
    "L'été à Zürich.",
  ]
  predictions = [
    'Le chat est sur le tapis.',
    'Bonjour à tous mes amis !',
    "L'été à Zurich.",
  ]
  assert metrics.bleu(targets, predictions)['bleu'] == pytest.approx(
    43.9376, abs=1e-4
  )  # T5
  # Calibration's per-example loss is sentence BLEU; its mean differs.
  assert 100 * metrics.bleu_per_example(targets, predictions).mean() == (
    pytest.approx(45.8109, abs=1e-4)
  )


def test_bleu_uses_t5s_international_tokenizer():
  # intl splits French guillemets off the words (13a would not, and score
  # this pair 29.8), so spacing around them does not cost BLEU.
  reference = ['il a dit «bonjour» à tous .']
  prediction = ['il a dit « bonjour » à tous .']
  assert metrics.bleu(reference, prediction)['bleu'] == pytest.approx(100.0)
  np.testing.assert_allclose(
    metrics.bleu_per_example(reference, prediction), [1.0]
  )
