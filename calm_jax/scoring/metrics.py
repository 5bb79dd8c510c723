"""Task metrics, per example and per corpus: ROUGE, BLEU, SQuAD token F1.

Per-example scores in [0, 1] are what calibration needs (a loss per
calibration example); corpus scores are what tasks report (0-100 as T5 does).
No TensorFlow here.
"""

import collections
import contextlib
import functools
import re
import string
from typing import Sequence

import numpy as np
from rouge_score import rouge_scorer
from rouge_score import scoring
import sacrebleu

# T5's three keys first, in T5's order, so that the seeded bootstrap draws
# the same resamples for them as t5.evaluation.metrics.rouge does; ROUGE-L
# (the paper's CNN/DM metric) last.
ROUGE_KEYS = ('rouge1', 'rouge2', 'rougeLsum', 'rougeL')
BOOTSTRAP_SEED = 0


@functools.lru_cache(maxsize=None)
def _scorer(
  rouge_types: tuple[str, ...], use_stemmer: bool
) -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def rouge_per_example(
  targets: Sequence[str],
  predictions: Sequence[str],
  rouge_type: str = 'rougeL',
  *,
  use_stemmer: bool = False,
) -> np.ndarray:
  """F-measure of `rouge_type` for each (target, prediction) pair, in [0, 1].

  Summaries are split into sentences as T5 does (`split_summary_sentences`),
  which only ROUGE-Lsum reads.
  """
  scorer = _scorer((rouge_type,), use_stemmer)
  return np.array(
    [
      scorer.score(split_summary_sentences(t), split_summary_sentences(p))[
        rouge_type
      ].fmeasure
      for t, p in zip(targets, predictions)
    ],
    np.float64,
  )


def split_summary_sentences(summary: str) -> str:
  """T5's sentence split for ROUGE-Lsum: a newline after each " . "."""
  return summary.replace(' . ', ' .\n')


@contextlib.contextmanager
def _seeded_global_numpy(seed: int):
  """rouge_score's bootstrap draws from numpy's global generator: seed it
  for a reproducible score and put the caller's state back afterwards."""
  state = np.random.get_state()
  np.random.seed(seed)
  try:
    yield
  finally:
    np.random.set_state(state)


def rouge(
  targets: Sequence[str],
  predictions: Sequence[str],
  *,
  rouge_types: Sequence[str] = ROUGE_KEYS,
  use_stemmer: bool = False,
  bootstrap: bool = True,
  seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
  """Corpus ROUGE F-measures x100, as t5.evaluation.metrics.rouge reports.

  Defaults are T5's: no stemming, summaries split into sentences at " . "
  (newlines already in a reference, as in CNN/DM 3.4.0, split it too), and
  the median of 1,000 bootstrap resamples of the mean. The bootstrap is
  seeded (T5's is not), so a score is reproducible; with seed s, rouge1/2/Lsum
  equal T5's after `np.random.seed(s)`. `use_stemmer=True` gives the
  stemmed ROUGE that some summarisation papers report; `bootstrap=False` the
  plain mean.
  """
  scorer = _scorer(tuple(rouge_types), use_stemmer)
  aggregator = scoring.BootstrapAggregator()
  per_example = collections.defaultdict(list)
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(
      split_summary_sentences(target), split_summary_sentences(prediction)
    )
    aggregator.add_scores(scores)
    for key, score in scores.items():
      per_example[key].append(score.fmeasure)
  if not bootstrap:
    return {key: 100 * float(np.mean(per_example[key])) for key in rouge_types}
  with _seeded_global_numpy(seed):
    result = aggregator.aggregate()
  return {key: 100 * float(result[key].mid.fmeasure) for key in rouge_types}


# t5.evaluation's BLEU settings: the international tokenizer, exp smoothing.
BLEU_TOKENIZER = 'intl'


def bleu(
  targets: Sequence[str], predictions: Sequence[str]
) -> dict[str, float]:
  """sacrebleu corpus BLEU with t5.evaluation's settings, 0-100 (the task
  metric; not the mean of `bleu_per_example`)."""
  result = sacrebleu.corpus_bleu(
    list(predictions),
    [list(targets)],
    smooth_method='exp',
    smooth_value=0.0,
    force=False,
    lowercase=False,
    tokenize=BLEU_TOKENIZER,
    use_effective_order=False,
  )
  return {'bleu': float(result.score)}


def bleu_per_example(
  targets: Sequence[str], predictions: Sequence[str]
) -> np.ndarray:
  """Sentence BLEU in [0, 1] (exp smoothing so short outputs are not 0):
  calibration needs a loss per example, which T5 does not define."""
  return np.array(
    [
      sacrebleu.sentence_bleu(
        p, [t], smooth_method='exp', tokenize=BLEU_TOKENIZER
      ).score
      / 100
      for t, p in zip(targets, predictions)
    ],
    np.float64,
  )


def normalize_squad(text: str) -> str:
  """SQuAD's answer normalisation: lower, drop punctuation and articles."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  """The official SQuAD v1.1 F1 (and T5's): 0 without a shared token, also
  when an answer normalises to nothing (`the`, `...`)."""
  target_tokens = normalize_squad(target).split()
  prediction_tokens = normalize_squad(prediction).split()
  common = collections.Counter(target_tokens) & collections.Counter(
    prediction_tokens
  )
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
  return np.array(
    [
      max(_token_f1(a, p) for a in _as_answers(t))
      for t, p in zip(targets, predictions)
    ],
    np.float64,
  )


def exact_match_per_example(targets, predictions: Sequence[str]) -> np.ndarray:
  return np.array(
    [
      max(
        float(normalize_squad(a) == normalize_squad(p)) for a in _as_answers(t)
      )
      for t, p in zip(targets, predictions)
    ],
    np.float64,
  )


def squad(targets, predictions: Sequence[str]) -> dict[str, float]:
  """Mean token F1 and exact match, x100 (SQuAD's official reporting)."""
  return {
    'f1': 100 * float(np.mean(token_f1_per_example(targets, predictions))),
    'em': 100 * float(np.mean(exact_match_per_example(targets, predictions))),
  }


# Per-example scorers by metric name, for calibration losses.
PER_EXAMPLE = {
  'rougeL': rouge_per_example,
  'bleu': bleu_per_example,
  'f1': token_f1_per_example,
}
