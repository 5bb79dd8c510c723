"""metrics.py: per-example and corpus scores on hand-checked cases."""
import numpy as np
import pytest

from calm_jax import metrics


def test_squad_normalisation_and_f1():
  assert metrics.normalize_squad('The  Cat, sat!') == 'cat sat'
  f1 = metrics.token_f1_per_example(['the red cat', ['a dog', 'red cat']],
                                    ['red dog', 'Red cat.'])
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
  f1 = metrics.token_f1_per_example([['a red dog', 'cat']],
                                    ['The big red dog.'])
  np.testing.assert_allclose(f1, [0.8])
  em = metrics.exact_match_per_example([['pear', 'apple'], ['pear']],
                                       ['An apple!', 'apples'])
  np.testing.assert_allclose(em, [1.0, 0.0])
  scores = metrics.squad([['a red dog', 'cat'], ['pear']],
                         ['The big red dog.', 'pear'])
  assert scores == pytest.approx({'f1': 90.0, 'em': 50.0})


def test_rouge_l_on_known_strings():
  # LCS of 5 tokens: precision 5/5, recall 5/6, F = 10/11.
  score = metrics.rouge_per_example(['the cat sat on the mat'],
                                    ['the cat on the mat'])
  np.testing.assert_allclose(score, [10 / 11])


def test_summary_rouge_splits_sentences_as_t5_for_rouge_lsum():
  # Same two sentences in the other order: the plain LCS keeps 3 of 5
  # tokens, the sentence-level union LCS all 5.
  scores = metrics.summarization_rouge(['police said . two men died .'],
                                       ['two men died . police said .'])
  assert scores['rougeL'] == pytest.approx(60.0)
  assert scores['rougeLsum'] == pytest.approx(100.0)
  assert metrics.split_summary_sentences('a b . c d .') == 'a b .\nc d .'


def test_bleu_uses_t5s_international_tokenizer():
  # intl splits French guillemets off the words (13a would not, and score
  # this pair 29.8), so spacing around them does not cost BLEU.
  reference = ['il a dit «bonjour» à tous .']
  prediction = ['il a dit « bonjour » à tous .']
  assert metrics.bleu(reference, prediction)['bleu'] == pytest.approx(100.0)
  np.testing.assert_allclose(
      metrics.bleu_per_example(reference, prediction), [1.0])
