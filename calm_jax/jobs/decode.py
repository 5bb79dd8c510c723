"""Batch decoding entry point with early exit (t5x-style flags).

  python -m calm_jax.decode --gin_file=gin/runs/decode.gin \
    --gin.CHECKPOINT_PATH="'runs/demo/model'" \
    --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" \
    --gin.CONFIDENCE="'softmax'" --gin.THRESHOLD=0.9

Writes, per task, OUTPUT_DIR/<task>.jsonl (one line per example: inputs,
targets, prediction, exit_layers, confidences) and OUTPUT_DIR/summary.json
(task metric, average decoder layers per token, tokens/s, wall time, and the
threshold used with where it came from), and OUTPUT_DIR/run.json (the
fingerprint of every setting of the run). Files appear whole or not at all.
"""
import os
from typing import Optional, Sequence

import gin

from calm_jax import api
from calm_jax import arguments
from calm_jax.decoding import loops
from calm_jax.storage import files
from calm_jax import cli
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import provenance


def _write_exit_map(directory: str, task: str, records: list[dict],
                    num_layers: int, confidence: str, threshold: float) -> None:
  from calm_jax.analysis import plots  # pylint: disable=g-import-not-at-top
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


RUN_JSON = 'run.json'


def run_fingerprint(lm: api.CalmLM, choice: api.ThresholdChoice,
                    exit_config: loops.ExitConfig, tasks: Sequence[str],
                    split: str, num_examples: Optional[int], seed: int
                    ) -> dict:
  """Everything that determines a decode job's outputs."""
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return {'model': lm.model_fingerprint(exit_config.confidence),
          'tasks': {t: pipeline.feature_lengths(t) for t in tasks},
          'split': split, 'num_examples': num_examples,
          'decode': exit_config.fingerprint(), 'threshold': choice.value,
          'threshold_source': choice.source,
          'seed': None if exit_config.sampling.greedy else seed}


def output_dir_for(checkpoint_path: str, fingerprint: dict) -> str:
  """MODEL_DIR/decode/<split>_<measure>_<threshold>_<fingerprint hash>:
  runs that differ in any setting never share a directory."""
  return os.path.join(
      checkpoint_path, 'decode',
      f'{fingerprint["split"]}_{fingerprint["decode"]["confidence"]}_'
      f'{fingerprint["threshold"]:g}_{provenance.short_hash(fingerprint, 8)}')


def claim_output_dir(output_dir: str, fingerprint: dict,
                     overwrite: bool) -> None:
  """Marks `output_dir` as this run's (run.json); refuses a directory that
  holds another run's files unless `overwrite`."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise arguments.InputError(f'output_dir {output_dir} is a file')
  marker = os.path.join(output_dir, RUN_JSON)
  if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
    stored = (files.read_json(marker, what='decode run marker')
              if os.path.exists(marker) else None)
    if stored != fingerprint:
      what = (provenance.describe_changes(stored, fingerprint) if stored
              else f'files of another program, no {RUN_JSON}')
      raise provenance.ProvenanceError(
          f'{output_dir} holds another run ({what}); choose another '
          'output_dir, or set calm_jax.decode.overwrite=True')
  files.atomic_write_json(marker, fingerprint)


def _check_arguments(lm: api.CalmLM, *, threshold, batch_size, min_exit,
                     tau, temperature, top_k, top_p, num_examples,
                     exit_map_examples) -> None:
  arguments.decoding(num_layers=lm.config.num_decoder_layers,
                     threshold=threshold, batch_size=batch_size,
                     min_exit=min_exit, tau=tau, temperature=temperature,
                     top_k=top_k, top_p=top_p)
  arguments.optional(arguments.integer, 'num_examples', num_examples, 1)
  arguments.integer('exit_map_examples', exit_map_examples, 0)


@gin.configurable(module='calm_jax')
def decode(*, checkpoint_path: str = gin.REQUIRED,
           mixture_or_task_name: str = gin.REQUIRED,
           output_dir: Optional[str] = None, overwrite: bool = False,
           split: str = 'validation', num_examples: Optional[int] = None,
           batch_size: int = 16, confidence: str = 'softmax',
           threshold: Optional[float] = None, tau: Optional[float] = None,
           calibration_record: Optional[str] = None, min_exit: int = 1,
           propagation: str = 'hidden', temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           exit_map: Optional[str] = None, exit_map_examples: int = 10,
           mesh_shape: Optional[Sequence[int]] = None,
           dtype: Optional[str] = None) -> dict:
  """Decodes every task of a mixture with early exit; returns the summary.

  Without a threshold, the calibration record named `calibration_record`
  (default: the newest for the measure on MIXTURE_OR_TASK_NAME) sets it; a
  record certified on another model or with other decode settings is
  refused. Outputs go to `output_dir`, by default a directory named after
  every setting (`output_dir_for`); a directory holding another run's files
  is refused unless `overwrite`. With `exit_map` (a directory), the first
  `exit_map_examples` examples of each task are also drawn as exit maps.

  Runs on a (data, model) mesh of `mesh_shape` (default: every device on
  'data'); `batch_size` is global. With several processes, each decodes its
  shard and the primary process writes everyone's records in input order.
  `dtype` overrides the model's activation dtype ('bfloat16' as on TPU/GPU).
  """
  from calm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(mesh_shape)
  lm = api.CalmLM(checkpoint_path, mesh=mesh, dtype=dtype)
  _check_arguments(lm, threshold=threshold, batch_size=batch_size,
                   min_exit=min_exit, tau=tau, temperature=temperature,
                   top_k=top_k, top_p=top_p, num_examples=num_examples,
                   exit_map_examples=exit_map_examples)
  choice = lm.resolve_threshold(threshold, confidence, tau,
                                calibration_record, task=mixture_or_task_name)
  exit_config = lm.exit_config(
      confidence, min_exit=min_exit, tau=choice.tau, propagation=propagation,
      sampling=loops.Sampling(float(temperature), top_k, float(top_p)))
  lm.check_settings(choice, exit_config)
  tasks = list(pipeline.task_rates(mixture_or_task_name))
  fingerprint = run_fingerprint(lm, choice, exit_config, tasks, split,
                                num_examples, seed)
  output_dir = output_dir or output_dir_for(checkpoint_path, fingerprint)
  if multihost.is_primary():
    print(f'threshold {choice.value} ({choice.source}), confidence '
          f'{confidence!r}, tau {choice.tau}')
    claim_output_dir(output_dir, fingerprint, overwrite)
  summary = _decode_tasks(lm, tasks, exit_config, choice, output_dir,
                          split=split, num_examples=num_examples,
                          batch_size=batch_size, seed=seed, mesh=mesh,
                          exit_map=exit_map,
                          exit_map_examples=exit_map_examples)
  if multihost.is_primary():
    files.atomic_write_json(os.path.join(output_dir, 'summary.json'), summary)
    print(f'wrote {output_dir}')
  return summary


def _decode_tasks(lm: api.CalmLM, tasks, exit_config, choice, output_dir, *,
                  split, num_examples, batch_size, seed, mesh, exit_map,
                  exit_map_examples) -> dict:
  from calm_jax.evaluation import engine  # pylint: disable=g-import-not-at-top
  confidence = exit_config.confidence
  summary = {'checkpoint_step': lm.step, 'dtype': lm.config.dtype,
             'confidence': confidence, 'threshold': choice.value,
             'threshold_source': choice.source, 'tau': choice.tau,
             'split': split, 'tasks': {}}
  for task in tasks:
    records, seconds = engine.decode_task(
        lm.model, lm.params, task, split=split, num_examples=num_examples,
        batch_size=batch_size, exit_config=exit_config, threshold=choice.value,
        seed=seed, classifier=lm.classifier_for(confidence), mesh=mesh)
    if multihost.is_primary():
      _write_task_outputs(output_dir, task, records, exit_map,
                          exit_map_examples, lm.config.num_decoder_layers,
                          confidence, choice.value)
    timed = 1 - min(batch_size, len(records)) / max(len(records), 1)
    result = engine.summarize_decode(task, records, seconds, timed)
    summary['tasks'][task] = result
    print(f"{task}: {result['metric']} = {result['value']:.2f}, average "
          f"layers {result['avg_decoder_layers']:.2f}")
  return summary


def main() -> None:
  from calm_jax.jobs import train  # pylint: disable=g-import-not-at-top
  cli.run(decode, user_errors=train.user_errors())


if __name__ == '__main__':
  main()
