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
from jax.sharding import Mesh, PartitionSpec as P

from calm_jax import api
from calm_jax.data import pipeline
from calm_jax.decoding import loops
from calm_jax.model import models
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning


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
                 num_examples: int | None, shard=None) -> Iterator[EvalBatch]:
  """Fixed-shape batches (last one padded with empty rows) of the examples,
  or of `shard`'s examples (a seqio.ShardInfo; an empty shard gives one
  empty batch)."""
  examples = pipeline.eval_examples(task_name, split, num_examples=num_examples,
                                shard=shard)
  lengths = pipeline.feature_lengths(task_name)
  for start in range(0, max(len(examples), 1), batch_size):
    chunk = examples[start:start + batch_size]
    text = lambda key: [ex[key].decode() for ex in chunk]
    yield EvalBatch(
        encoder_tokens=pipeline.pad_batch([ex['inputs'] for ex in chunk],
                                      lengths['inputs'], batch_size),
        target_tokens=pipeline.pad_batch([ex['targets'] for ex in chunk],
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
  max_length = pipeline.feature_lengths(task_name)['targets']
  predict = jax.jit(lambda p, enc: model.predict_full_depth(p, enc,
                                                            max_length))
  predictions = []
  for batch in batches:
    tokens = np.asarray(predict(params, batch.encoder_tokens))
    predictions += [pipeline.decode_text(task_name, row)
                    for row in tokens[:batch.num_real]]
  return predictions


# Per 'data' shard: the decode's rows, and the summed evaluation count.
_SHARDED_OUTPUT = loops.DecodeOutput(
    tokens=P('data'), exit_layers=P('data'), confidences=P('data'),
    layer_evals=P())


@functools.lru_cache(maxsize=32)
def early_exit_fn(model: models.CalmModel, exit_config: loops.ExitConfig,
                  max_length: int, mesh: Optional[Mesh] = None):
  """One jitted early-exit decode per (model, config, length, mesh): the
  threshold is an argument, so a threshold sweep compiles once.

  (params, classifier, encoder tokens [b, s], threshold, rng) -> output.
  On a mesh of several devices every 'data' shard runs its own loop over
  its rows (params replicated over 'data', split over 'model' by the rules);
  greedy results equal the one-device decode, while sampling folds the shard
  index into the rng.
  """
  def decode(params, classifier, encoder_tokens, threshold, rng):
    return model.decode_early_exit(
        params, encoder_tokens, max_length, exit_config=exit_config,
        threshold=threshold, rng=rng, classifier=classifier)

  if mesh is None or mesh.size == 1:
    return jax.jit(decode)

  def decode_shard(params, classifier, encoder_tokens, threshold, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index('data'))
    out = decode(params, classifier, encoder_tokens, threshold, rng)
    return out.replace(layer_evals=jax.lax.psum(out.layer_evals, 'data'))

  return partitioning.per_data_shard(
      decode_shard, mesh, in_specs=(P(), P(), P('data'), P(), P()),
      out_specs=_SHARDED_OUTPUT)


def _example_records(batch, out: loops.DecodeOutput, task: str
                     ) -> list[dict]:
  records = []
  for row in range(batch.num_real):
    tokens = list(np.asarray(out.tokens[row]))
    length = tokens.index(1) + 1 if 1 in tokens else len(tokens)
    record = {
        'inputs': batch.inputs[row], 'targets': batch.targets[row],
        'prediction': pipeline.decode_text(task, np.asarray(tokens)),
        'tokens': pipeline.token_pieces(task, tokens[:length]),
        'exit_layers': [int(l) for l in out.exit_layers[row, :length]],
        'confidences': api.token_confidences(out.confidences[row, :length])}
    if isinstance(batch.references[row], list):
      record['references'] = batch.references[row]
    records.append(record)
  return records


def references(records: Sequence[dict]) -> list:
  """What each record's prediction is scored against (see EvalBatch)."""
  return [r.get('references', r['targets']) for r in records]


def _empty_batch(like: EvalBatch) -> EvalBatch:
  return EvalBatch(np.zeros_like(like.encoder_tokens),
                   np.zeros_like(like.target_tokens), 0, [], [], [])


def process_batches(task: str, split: str, *, num_examples: Optional[int],
                    batch_size: int) -> list[EvalBatch]:
  """This process's batches of a split: `batch_size` is the global batch,
  each process holds batch_size / processes rows of it, and every process
  gets the same number of batches (padded with empty ones) because each
  batch is one collective program."""
  batches = list(eval_batches(task, split,
                              batch_size=multihost.local_batch_size(batch_size),
                              num_examples=num_examples,
                              shard=pipeline.process_shard()))
  total = multihost.process_max(len(batches))
  return batches + [_empty_batch(batches[0])] * (total - len(batches))


def decode_task(model: models.CalmModel, params, task: str, *, split: str,
                num_examples: Optional[int], batch_size: int,
                exit_config: loops.ExitConfig, threshold: float,
                seed: int, classifier=None, mesh: Optional[Mesh] = None
                ) -> tuple[list[dict], float]:
  """Decodes a task split; returns the records, in input order, and the
  decode seconds (this process's, compilation excluded).

  On a mesh, `params` and `classifier` must already be placed on it
  (`partitioning.param_shardings`), and the batches go over 'data'.
  """
  max_length = pipeline.feature_lengths(task)['targets']
  sharded = mesh is not None and mesh.size > 1
  if sharded:
    partitioning.check_batch_fits(batch_size, mesh)
  fn = early_exit_fn(model, exit_config.for_threshold(threshold), max_length,
                     mesh if sharded else None)
  place = ((lambda x: partitioning.global_batch(x, mesh)) if sharded
           else jnp.asarray)
  put = (lambda x: partitioning.replicate(x, mesh)) if sharded else (
      lambda x: x)
  fetch = multihost.host_rows if sharded else np.asarray
  batches = process_batches(task, split, num_examples=num_examples,
                            batch_size=batch_size)
  records, seconds = [], 0.0
  for index, batch in enumerate(tqdm.tqdm(
      batches, desc=task, unit='batch', disable=not multihost.is_primary())):
    start = time.perf_counter()
    out = fn(params, classifier, place(batch.encoder_tokens),
             put(np.float32(threshold)), put(jax.random.PRNGKey(seed + index)))
    out = jax.tree_util.tree_map(fetch, out)
    if index > 0:  # the first batch includes compilation
      seconds += time.perf_counter() - start
    records += _example_records(batch, out, task)
  return multihost.gather_in_input_order(records), seconds


def summarize_decode(task: str, records: list[dict], seconds: float,
              timed_fraction: float) -> dict:
  scores = task_metric_fn(task)(
      references(records), [r['prediction'] for r in records])
  layers = np.concatenate([r['exit_layers'] for r in records])
  headline = pipeline.headline_metric(task, scores)
  return {'metric': headline, 'value': scores[headline], 'scores': scores,
          'num_examples': len(records),
          'avg_decoder_layers': float(layers.mean()),
          'tokens_per_second': (layers.size * timed_fraction / seconds
                                if seconds else None),
          'decode_seconds_after_compile': round(seconds, 3)}
