"""Task metrics, per example and per corpus: ROUGE, BLEU, SQuAD token F1.

Per-example scores in [0, 1] are what calibration needs (a loss per
calibration example); corpus scores are what tasks report (0-100 as T5 does).
No TensorFlow here.
"""
import collections
import re
import string
from typing import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

_ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeLsum', 'rougeL')
_SCORER = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)


def rouge_per_example(targets: Sequence[str], predictions: Sequence[str],
                      rouge_type: str = 'rougeL') -> np.ndarray:
  """F-measure of `rouge_type` for each (target, prediction) pair, in [0, 1]."""
  return np.array([_SCORER.score(t, p)[rouge_type].fmeasure
                   for t, p in zip(targets, predictions)], np.float64)


def rouge(targets: Sequence[str], predictions: Sequence[str]
          ) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measures, x100 (T5's reporting)."""
  return {name: 100 * float(np.mean(rouge_per_example(targets, predictions,
                                                      name)))
          for name in ('rouge1', 'rouge2', 'rougeL')}


def split_summary_sentences(summary: str) -> str:
  """T5's sentence split for ROUGE-Lsum: a newline after each " . "."""
  return summary.replace(' . ', ' .\n')


def summarization_rouge(targets: Sequence[str], predictions: Sequence[str]
                        ) -> dict[str, float]:
  """ROUGE-1/2/L and ROUGE-Lsum (sentences split as T5 does), x100."""
  scores = rouge(targets, predictions)
  scores['rougeLsum'] = 100 * float(np.mean(rouge_per_example(
      [split_summary_sentences(t) for t in targets],
      [split_summary_sentences(p) for p in predictions], 'rougeLsum')))
  return scores


# t5.evaluation's BLEU settings: the international tokenizer, exp smoothing.
BLEU_TOKENIZER = 'intl'


def bleu(targets: Sequence[str], predictions: Sequence[str]
         ) -> dict[str, float]:
  """sacrebleu corpus BLEU with t5.evaluation's settings, 0-100."""
  result = sacrebleu.corpus_bleu(list(predictions), [list(targets)],
                                 smooth_method='exp', tokenize=BLEU_TOKENIZER)
  return {'bleu': float(result.score)}


def bleu_per_example(targets: Sequence[str], predictions: Sequence[str]
                     ) -> np.ndarray:
  """Sentence BLEU in [0, 1] (exp smoothing so short outputs are not 0)."""
  return np.array([sacrebleu.sentence_bleu(p, [t], smooth_method='exp',
                                           tokenize=BLEU_TOKENIZER).score
                   / 100 for t, p in zip(targets, predictions)], np.float64)


def normalize_squad(text: str) -> str:
  """SQuAD's answer normalisation: lower, drop punctuation and articles."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  target_tokens = normalize_squad(target).split()
  prediction_tokens = normalize_squad(prediction).split()
  if not target_tokens or not prediction_tokens:
    return float(target_tokens == prediction_tokens)
  common = (collections.Counter(target_tokens)
            & collections.Counter(prediction_tokens))
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision = overlap / len(prediction_tokens)
  recall = overlap / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def _as_answers(target) -> list[str]:
  return [target] if isinstance(target, str) else list(target)


def token_f1_per_example(targets, predictions: Sequence[str]) -> np.ndarray:
  """SQuAD token F1 in [0, 1], max over each example's reference answers."""
  return np.array([max(_token_f1(a, p) for a in _as_answers(t))
                   for t, p in zip(targets, predictions)], np.float64)


def exact_match_per_example(targets, predictions: Sequence[str]
                            ) -> np.ndarray:
  return np.array([max(float(normalize_squad(a) == normalize_squad(p))
                       for a in _as_answers(t))
                   for t, p in zip(targets, predictions)], np.float64)


def squad(targets, predictions: Sequence[str]) -> dict[str, float]:
  """Mean token F1 and exact match, x100 (SQuAD's official reporting)."""
  return {'f1': 100 * float(np.mean(token_f1_per_example(targets,
                                                         predictions))),
          'em': 100 * float(np.mean(exact_match_per_example(targets,
                                                            predictions)))}


# Per-example scorers by metric name, for calibration losses.
PER_EXAMPLE = {
    'rougeL': rouge_per_example,
    'bleu': bleu_per_example,
    'f1': token_f1_per_example,
}
