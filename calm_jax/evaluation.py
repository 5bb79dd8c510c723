"""Evaluation on SeqIO splits: per-layer token accuracy and task metrics.

Used by the demo and by decode jobs; imports the data path (TensorFlow).
"""
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from calm_jax import data
from calm_jax import models


@dataclasses.dataclass
class EvalBatch:
  """A padded batch of eval examples and the texts behind it."""
  encoder_tokens: np.ndarray   # [b, s]
  target_tokens: np.ndarray    # [b, l]
  num_real: int                # rows that are real examples (rest padding)
  inputs: list[str]
  targets: list[str]


def eval_batches(task_name: str, split: str, *, batch_size: int,
                 num_examples: int | None) -> Iterator[EvalBatch]:
  """Fixed-shape batches (last one padded with empty rows)."""
  examples = data.eval_examples(task_name, split, num_examples=num_examples)
  lengths = data.feature_lengths(task_name)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    text = lambda key: [ex[key].decode() for ex in chunk]
    yield EvalBatch(
        encoder_tokens=data.pad_batch([ex['inputs'] for ex in chunk],
                                      lengths['inputs'], batch_size),
        target_tokens=data.pad_batch([ex['targets'] for ex in chunk],
                                     lengths['targets'], batch_size),
        num_real=len(chunk), inputs=text('inputs_pretokenized'),
        targets=text('targets_pretokenized'))


def shift_right(tokens: np.ndarray) -> np.ndarray:
  """Decoder inputs for teacher forcing: start token 0, then targets[:-1]."""
  return np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], 1)


def per_layer_accuracy(model: models.CalmModel, params: Any,
                       batches: Sequence[EvalBatch]) -> np.ndarray:
  """Teacher-forced next-token accuracy of every decoder layer [L]."""
  logits_fn = jax.jit(model.all_layer_logits)
  correct = np.zeros(model.config.num_decoder_layers)
  count = 0
  for batch in batches:
    logits = logits_fn(params, batch.encoder_tokens,
                       shift_right(batch.target_tokens))
    predicted = np.asarray(jnp.argmax(logits, -1))  # [L, b, l]
    mask = batch.target_tokens > 0
    correct += ((predicted == batch.target_tokens[None]) & mask[None]).sum(
        axis=(1, 2))
    count += mask.sum()
  return correct / max(count, 1)


def task_metric_fn(task_name: str) -> Callable[..., dict[str, float]]:
  task = seqio.get_mixture_or_task(task_name)
  fns = task.metric_fns
  return lambda targets, predictions: {
      k: v for fn in fns for k, v in fn(targets, predictions).items()}


def full_depth_predictions(model: models.CalmModel, params: Any,
                           task_name: str, batches: Sequence[EvalBatch]
                           ) -> list[str]:
  """Greedy full-depth decodes of every real row, as text."""
  max_length = data.feature_lengths(task_name)['targets']
  predict = jax.jit(lambda p, enc: model.predict_full_depth(p, enc,
                                                            max_length))
  predictions = []
  for batch in batches:
    tokens = np.asarray(predict(params, batch.encoder_tokens))
    predictions += [data.decode_text(task_name, row)
                    for row in tokens[:batch.num_real]]
  return predictions
