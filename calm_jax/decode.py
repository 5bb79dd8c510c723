"""Batch decoding entry point with early exit (t5x-style flags).

  python -m calm_jax.decode --gin_file=gin/runs/decode.gin \
    --gin.CHECKPOINT_PATH="'runs/demo/model'" \
    --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" \
    --gin.CONFIDENCE="'softmax'" --gin.THRESHOLD=0.9

Writes, per task, OUTPUT_DIR/<task>.jsonl (one line per example: inputs,
targets, prediction, exit_layers, confidences) and OUTPUT_DIR/summary.json
(task metric, average decoder layers per token, tokens/s, wall time, and the
threshold used with where it came from). Files appear whole or not at all.
"""
import json
import os
import time
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from calm_jax import api
from calm_jax import checkpoints
from calm_jax import decoding
from calm_jax import gin_utils
from calm_jax import models


def _example_records(batch, out: decoding.DecodeOutput, task: str
                     ) -> list[dict]:
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  records = []
  for row in range(batch.num_real):
    tokens = list(np.asarray(out.tokens[row]))
    length = tokens.index(1) + 1 if 1 in tokens else len(tokens)
    records.append({
        'inputs': batch.inputs[row], 'targets': batch.targets[row],
        'prediction': data.decode_text(task, np.asarray(tokens)),
        'exit_layers': [int(l) for l in out.exit_layers[row, :length]],
        'confidences': [round(float(c), 4)
                        for c in out.confidences[row, :length]]})
  return records


def decode_task(model: models.CalmModel, params, task: str, *, split: str,
                num_examples: Optional[int], batch_size: int,
                exit_config: decoding.ExitConfig, threshold: float,
                seed: int, classifier=None) -> tuple[list[dict], float]:
  """Decodes a task split; returns the records and the decode seconds."""
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  from calm_jax import evaluation  # pylint: disable=g-import-not-at-top
  max_length = data.feature_lengths(task)['targets']
  fn = jax.jit(lambda p, c, e, t, r: model.decode_early_exit(
      p, e, max_length, exit_config=exit_config, threshold=t, rng=r,
      classifier=c))
  batches = list(evaluation.eval_batches(task, split, batch_size=batch_size,
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


def summarize(task: str, records: list[dict], seconds: float,
              timed_fraction: float) -> dict:
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  from calm_jax import evaluation  # pylint: disable=g-import-not-at-top
  scores = evaluation.task_metric_fn(task)(
      [r['targets'] for r in records], [r['prediction'] for r in records])
  layers = np.concatenate([r['exit_layers'] for r in records])
  headline = data.headline_metric(task, scores)
  return {'metric': headline, 'value': scores[headline], 'scores': scores,
          'num_examples': len(records),
          'avg_decoder_layers': float(layers.mean()),
          'tokens_per_second': (layers.size * timed_fraction / seconds
                                if seconds else None),
          'decode_seconds_after_compile': round(seconds, 3)}


def _write_jsonl(path: str, records: list[dict]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  os.replace(tmp, path)


@gin.configurable(module='calm_jax')
def decode(*, checkpoint_path: str = gin.REQUIRED,
           mixture_or_task_name: str = gin.REQUIRED,
           output_dir: Optional[str] = None, split: str = 'validation',
           num_examples: Optional[int] = None, batch_size: int = 16,
           confidence: str = 'softmax', threshold: Optional[float] = None,
           tau: Optional[float] = None, min_exit: int = 1,
           propagation: str = 'hidden', temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> dict:
  """Decodes every task of a mixture with early exit; returns the summary."""
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  lm = api.CalmLM(checkpoint_path)
  value, tau, source = lm.resolve_threshold(threshold, confidence, tau)
  print(f'threshold {value} ({source}), confidence {confidence!r}, '
        f'tau {tau}')
  exit_config = decoding.ExitConfig.create(
      lm.config.num_decoder_layers, confidence=confidence,
      first_exit=lm.config.first_exit, exit_interval=lm.config.exit_interval,
      min_exit=min_exit, tau=tau, propagation=propagation,
      sampling=decoding.Sampling(temperature, top_k, top_p))
  output_dir = output_dir or os.path.join(
      checkpoint_path, 'decode', f'{split}_{confidence}_{value:g}')
  os.makedirs(output_dir, exist_ok=True)
  summary = {'checkpoint_step': lm.step, 'confidence': confidence,
             'threshold': value, 'threshold_source': source, 'tau': tau,
             'split': split, 'tasks': {}}
  for task in data.task_rates(mixture_or_task_name):
    records, seconds = decode_task(
        lm.model, lm.params, task, split=split, num_examples=num_examples,
        batch_size=batch_size, exit_config=exit_config, threshold=value,
        seed=seed, classifier=lm.classifier_for(confidence))
    _write_jsonl(os.path.join(output_dir, f'{task}.jsonl'), records)
    timed = 1 - min(batch_size, len(records)) / max(len(records), 1)
    summary['tasks'][task] = summarize(task, records, seconds, timed)
    print(f"{task}: {summary['tasks'][task]['metric']} = "
          f"{summary['tasks'][task]['value']:.2f}, average layers "
          f"{summary['tasks'][task]['avg_decoder_layers']:.2f}")
  checkpoints.atomic_write_json(os.path.join(output_dir, 'summary.json'),
                                summary)
  print(f'wrote {output_dir}')
  return summary


def main() -> None:
  from calm_jax import train  # pylint: disable=g-import-not-at-top
  gin_utils.run(decode, user_errors=train.user_errors())


if __name__ == '__main__':
  main()
