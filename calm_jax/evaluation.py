"""Evaluation on SeqIO splits: per-layer token accuracy and task metrics.

Used by the demo, decode, calibrate and validity jobs; imports the data path
(TensorFlow). No gin: entry points configure, this module computes.
"""
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tqdm

from calm_jax import data
from calm_jax import decoding
from calm_jax import models


@dataclasses.dataclass
class EvalBatch:
  """A padded batch of eval examples and the texts behind it."""
  encoder_tokens: np.ndarray   # [b, s]
  target_tokens: np.ndarray    # [b, l]
  num_real: int                # rows that are real examples (rest padding)
  inputs: list[str]
  targets: list[str]
  # What the metric scores against: the target text, or every reference
  # answer for tasks that keep them (SQuAD).
  references: list


def _references(example: dict):
  if 'answers' in example:
    return [a.decode() for a in example['answers']]
  return example['targets_pretokenized'].decode()


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
        targets=text('targets_pretokenized'),
        references=[_references(ex) for ex in chunk])


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


@functools.lru_cache(maxsize=32)
def early_exit_fn(model: models.CalmModel, exit_config: decoding.ExitConfig,
                  max_length: int):
  """One jitted early-exit decode per (model, config, length): the threshold
  is an argument, so a threshold sweep compiles once."""
  return jax.jit(lambda p, c, e, t, r: model.decode_early_exit(
      p, e, max_length, exit_config=exit_config, threshold=t, rng=r,
      classifier=c))


def _example_records(batch, out: decoding.DecodeOutput, task: str
                     ) -> list[dict]:
  records = []
  for row in range(batch.num_real):
    tokens = list(np.asarray(out.tokens[row]))
    length = tokens.index(1) + 1 if 1 in tokens else len(tokens)
    record = {
        'inputs': batch.inputs[row], 'targets': batch.targets[row],
        'prediction': data.decode_text(task, np.asarray(tokens)),
        'tokens': data.token_pieces(task, tokens[:length]),
        'exit_layers': [int(l) for l in out.exit_layers[row, :length]],
        'confidences': [round(float(c), 4)
                        for c in out.confidences[row, :length]]}
    if isinstance(batch.references[row], list):
      record['references'] = batch.references[row]
    records.append(record)
  return records


def references(records: Sequence[dict]) -> list:
  """What each record's prediction is scored against (see EvalBatch)."""
  return [r.get('references', r['targets']) for r in records]


def decode_task(model: models.CalmModel, params, task: str, *, split: str,
                num_examples: Optional[int], batch_size: int,
                exit_config: decoding.ExitConfig, threshold: float,
                seed: int, classifier=None) -> tuple[list[dict], float]:
  """Decodes a task split; returns the records and the decode seconds."""
  max_length = data.feature_lengths(task)['targets']
  fn = early_exit_fn(model, exit_config.for_threshold(threshold), max_length)
  batches = list(eval_batches(task, split, batch_size=batch_size,
                                         num_examples=num_examples))
  records, seconds = [], 0.0
  for index, batch in enumerate(tqdm.tqdm(batches, desc=task, unit='batch')):
    start = time.perf_counter()
    out = jax.device_get(fn(params, classifier,
                            jnp.asarray(batch.encoder_tokens), threshold,
                            jax.random.PRNGKey(seed + index)))
    if index > 0:  # the first batch includes compilation
      seconds += time.perf_counter() - start
    records += _example_records(batch, out, task)
  return records, seconds


def summarize_decode(task: str, records: list[dict], seconds: float,
              timed_fraction: float) -> dict:
  scores = task_metric_fn(task)(
      references(records), [r['prediction'] for r in records])
  layers = np.concatenate([r['exit_layers'] for r in records])
  headline = data.headline_metric(task, scores)
  return {'metric': headline, 'value': scores[headline], 'scores': scores,
          'num_examples': len(records),
          'avg_decoder_layers': float(layers.mean()),
          'tokens_per_second': (layers.size * timed_fraction / seconds
                                if seconds else None),
          'decode_seconds_after_compile': round(seconds, 3)}
