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
