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
import os
from typing import Optional, Sequence

import gin

from calm_jax import api
from calm_jax import checkpoints
from calm_jax import decoding
from calm_jax import files
from calm_jax import gin_utils
from calm_jax import multihost
from calm_jax import partitioning


def _write_exit_map(directory: str, task: str, records: list[dict],
                    num_layers: int, confidence: str, threshold: float) -> None:
  from calm_jax import plots  # pylint: disable=g-import-not-at-top
  title = f'{task}: exit layer per token ({confidence}, threshold {threshold:g})'
  paths = plots.write_exit_map(
      records, num_layers, title, os.path.join(directory, f'{task}.html'),
      os.path.join(directory, f'{task}.png'))
  print(f'wrote {" and ".join(paths)}')


def _write_task_outputs(output_dir: str, task: str, records: list[dict],
                        exit_map: Optional[str], exit_map_examples: int,
                        num_layers: int, confidence: str, threshold: float
                        ) -> None:
  files.atomic_write_jsonl(os.path.join(output_dir, f'{task}.jsonl'),
                           records)
  if exit_map:
    _write_exit_map(exit_map, task, records[:exit_map_examples], num_layers,
                    confidence, threshold)


def _default_output_dir(checkpoint_path: str, split: str, confidence: str,
                        threshold: float, dtype: str) -> str:
  """MODEL_DIR/decode/<split>_<measure>_<threshold>[_bfloat16]."""
  suffix = '' if dtype == 'float32' else f'_{dtype}'
  return os.path.join(checkpoint_path, 'decode',
                      f'{split}_{confidence}_{threshold:g}{suffix}')


@gin.configurable(module='calm_jax')
def decode(*, checkpoint_path: str = gin.REQUIRED,
           mixture_or_task_name: str = gin.REQUIRED,
           output_dir: Optional[str] = None, split: str = 'validation',
           num_examples: Optional[int] = None, batch_size: int = 16,
           confidence: str = 'softmax', threshold: Optional[float] = None,
           tau: Optional[float] = None,
           calibration_record: Optional[str] = None, min_exit: int = 1,
           propagation: str = 'hidden', temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           exit_map: Optional[str] = None, exit_map_examples: int = 10,
           mesh_shape: Optional[Sequence[int]] = None,
           dtype: Optional[str] = None) -> dict:
  """Decodes every task of a mixture with early exit; returns the summary.

  Without a threshold, the calibration record named `calibration_record`
  (default: the newest for the measure) sets it. With `exit_map` (a
  directory), the first `exit_map_examples` examples of each task are also
  drawn as exit maps: <exit_map>/<task>.html and .png.

  Runs on a (data, model) mesh of `mesh_shape` (default: every device on
  'data'); `batch_size` is global. With several processes, each decodes its
  shard and the primary process writes everyone's records in input order.
  `dtype` overrides the model's activation dtype ('bfloat16' as on TPU/GPU).
  """
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  from calm_jax import evaluation  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(mesh_shape)
  lm = api.CalmLM(checkpoint_path, mesh=mesh, dtype=dtype)
  primary = multihost.is_primary()
  value, tau, source = lm.resolve_threshold(threshold, confidence, tau,
                                            calibration_record)
  exit_config = lm.exit_config(
      confidence, min_exit=min_exit, tau=tau, propagation=propagation,
      sampling=decoding.Sampling(temperature, top_k, top_p))
  output_dir = output_dir or _default_output_dir(
      checkpoint_path, split, confidence, value, lm.config.dtype)
  if primary:
    print(f'threshold {value} ({source}), confidence {confidence!r}, '
          f'tau {tau}')
    os.makedirs(output_dir, exist_ok=True)
  summary = {'checkpoint_step': lm.step, 'dtype': lm.config.dtype,
             'confidence': confidence, 'threshold': value,
             'threshold_source': source, 'tau': tau, 'split': split,
             'tasks': {}}
  for task in data.task_rates(mixture_or_task_name):
    records, seconds = evaluation.decode_task(
        lm.model, lm.params, task, split=split, num_examples=num_examples,
        batch_size=batch_size, exit_config=exit_config, threshold=value,
        seed=seed, classifier=lm.classifier_for(confidence), mesh=mesh)
    if primary:
      _write_task_outputs(output_dir, task, records, exit_map,
                          exit_map_examples, lm.config.num_decoder_layers,
                          confidence, value)
    timed = 1 - min(batch_size, len(records)) / max(len(records), 1)
    result = evaluation.summarize_decode(task, records, seconds, timed)
    summary['tasks'][task] = result
    print(f"{task}: {result['metric']} = {result['value']:.2f}, average "
          f"layers {result['avg_decoder_layers']:.2f}")
  if primary:
    checkpoints.atomic_write_json(os.path.join(output_dir, 'summary.json'),
                                  summary)
    print(f'wrote {output_dir}')
  return summary


def main() -> None:
  from calm_jax import train  # pylint: disable=g-import-not-at-top
  gin_utils.run(decode, user_errors=train.user_errors())


if __name__ == '__main__':
  main()
