"""The decode job: early-exit decoding of task splits or of the user's file.

Writes, per task (or input file), OUTPUT_DIR/<name>.jsonl, one line per
example in input order (inputs, targets, prediction, tokens, exit_layers,
confidences), OUTPUT_DIR/summary.json (task metric, average decoder layers
per token, tokens/s, decode seconds, and the threshold used with where it
came from) and OUTPUT_DIR/run.json (the fingerprint of every setting).
Files appear whole or not at all.
"""

import os
from typing import Optional

from etils import epy
import gin

from calm_jax import arguments
from calm_jax import console
from calm_jax import errors
from calm_jax.analysis import plots
from calm_jax.calibration import records
from calm_jax.data import examples as examples_lib
from calm_jax.data import input_files
from calm_jax.decoding import speculative
from calm_jax.evaluation import decode_records
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import limits
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.jobs import settings
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import files
from calm_jax.storage import provenance

# The SeqIO pipeline (and with it TensorFlow) loads when a job first
# reads data, not when the command line registers every job.
with epy.lazy_imports():
  from calm_jax.data import pipeline

READS = ('calm_jax.decode', *settings.DECODE_SETTINGS)


def example_sets(
  model: loaded_lib.LoadedModel, inputs: settings.DecodeInputs
) -> list[examples_lib.ExampleSet]:
  """The task splits of a mixture, or the user's file."""
  if not inputs.input_file:
    return [
      pipeline.task_examples(
        task, inputs.split, num_examples=inputs.num_examples
      )
      for task in pipeline.task_rates(inputs.mixture_or_task_name)
    ]
  task = inputs.mixture_or_task_name
  lengths = (
    pipeline.feature_lengths(task) if task else dict(model.feature_lengths)
  )
  lengths['inputs'] = inputs.input_length or lengths['inputs']
  lengths['targets'] = inputs.target_length or lengths['targets']
  spec = input_files.InputFile(
    inputs.input_file,
    inputs.input_format,
    inputs.input_field,
    inputs.target_field,
  )
  return [
    input_files.file_examples(
      spec,
      model.vocab,
      lengths,
      num_examples=inputs.num_examples,
      metrics=pipeline.task_metrics(task) if task else None,
    )
  ]


def _stem(examples: examples_lib.ExampleSet) -> str:
  return os.path.splitext(os.path.basename(examples.name))[0]


def decode_run(
  model: loaded_lib.LoadedModel,
  choice: records.ThresholdChoice,
  mode: modes.EarlyExit | modes.Speculative,
  sets,
  seed: int,
) -> decode_records.DecodeRun:
  """Everything that determines a decode job's outputs."""
  return decode_records.DecodeRun(
    model=model.fingerprint(mode.measure),
    data={e.name: e.fingerprint for e in sets},
    decode=mode.exit_config.fingerprint(),
    threshold=choice.value,
    threshold_source=choice.source,
    seed=seed if mode.sampled else None,
    exact=mode.fingerprint() if mode.measure == 'exact' else None,
  )


def output_dir_for(
  model_dir: str, run: decode_records.DecodeRun, label: str
) -> str:
  """MODEL_DIR/decode/<split or file>_<measure>_<threshold>_<hash>: runs
  that differ in any setting never share a directory."""
  return files.join(model_dir, 'decode', f'{label}_{run.label}')


def claim_output_dir(
  output_dir: str, run: decode_records.DecodeRun, overwrite: bool
) -> None:
  """Marks `output_dir` as this run's (run.json); refuses a directory that
  holds another run's files unless `overwrite`."""
  if files.exists(output_dir) and not files.is_dir(output_dir):
    raise errors.SettingError(f'output_dir {output_dir} is a file')
  files.check_writable_dir(output_dir, 'output_dir')
  marker = files.join(output_dir, decode_records.RUN_JSON)
  if files.listdir(output_dir) and not overwrite:
    stored = (
      decode_records.read_run(marker).fingerprint()
      if files.exists(marker)
      else None
    )
    if stored is None or not provenance.same(stored, run.fingerprint()):
      what = (
        provenance.describe_changes(stored, run.fingerprint())
        if stored
        else f'files of another program, no {decode_records.RUN_JSON}'
      )
      raise provenance.ProvenanceError(
        f'{output_dir} holds another run ({what}); choose another '
        'output_dir, or pass `--gin.calm_jax.OutputSettings.overwrite=True`'
      )
  files.atomic_write_json(marker, run.to_json())


def summarize(
  examples: examples_lib.ExampleSet, decoded: engine.Decoded
) -> dict:
  result = {
    'num_examples': len(examples),
    'avg_decoder_layers': decoded.avg_layers,
    'tokens_per_second': (
      decoded.tokens / decoded.seconds if decoded.seconds else None
    ),
    'decode_seconds_after_compile': round(decoded.seconds, 3),
  }
  exact = decoded.speculative_summary()
  if exact is not None:
    result['exact_mode'] = exact
  if examples.metrics is not None:
    score = engine.Evaluator.score(examples, decoded.predictions)
    result.update(metric=score.metric, value=score.value, scores=score.scores)
  return result


def _write(
  output_dir: str,
  output: settings.OutputSettings,
  examples: examples_lib.ExampleSet,
  decoded: engine.Decoded,
  mode: modes.EarlyExit,
  num_layers: int,
) -> None:
  records = engine.example_records(examples, decoded)
  files.atomic_write_jsonl(
    files.join(output_dir, f'{_stem(examples)}.jsonl'), records
  )
  if output.exit_map:
    stem = files.join(output.exit_map, _stem(examples))
    paths = plots.write_exit_map(
      records[: output.exit_map_examples],
      num_layers,
      f'{examples.name}: exit layer per token ({mode.measure}, threshold '
      f'{mode.threshold:g})',
      stem + '.html',
      stem + '.png',
    )
    console.info(f'wrote {" and ".join(paths)}')


def check_sizes(model, sets, mode, batch_size: int) -> None:
  """Each set's decode at its longest (`limits.check`), before the output
  dir is claimed: a size the model or the device cannot take writes
  nothing."""
  devices = model.mesh.size if model.mesh is not None else 1
  for examples in sets:
    size = limits.DecodeSize.of(
      mode,
      min(batch_size, max(len(examples), 1)),
      examples.lengths['inputs'],
      examples.lengths['targets'],
    )
    limits.check(model.config, size, devices=devices)


@gin.configurable(module='calm_jax')
def decode(
  *,
  model_dir: str = gin.REQUIRED,
  threshold: Optional[float] = None,
  calibration_record: Optional[str] = None,
  inputs: Optional[settings.DecodeInputs] = None,
  exits: Optional[settings.ExitSettings] = None,
  sampling: Optional[settings.SamplingSettings] = None,
  output: Optional[settings.OutputSettings] = None,
  runtime: Optional[settings.RunSettings] = None,
  check_only: bool = False,
) -> Optional[decode_records.DecodeSummary]:
  """Decodes every task of a mixture (or the input file) with early exit;
  returns the summary.

  Without a threshold, the calibration record named `calibration_record`
  (default: the newest for the measure on the task and this very model)
  sets it; a record certified on another model or with other decode
  settings is refused. The settings groups default to their gin bindings
  (calm_jax.DecodeInputs, ExitSettings, SamplingSettings, OutputSettings,
  RunSettings). `RunSettings.batch_size` is global: with several processes
  each decodes its share and the primary one writes everything in input
  order. Every setting is checked before the model is loaded or a file
  written; `check_only` stops there.
  """
  inputs = (inputs or settings.DecodeInputs()).check()
  exits = (exits or settings.ExitSettings()).check()
  sampling = (sampling or settings.SamplingSettings()).check()
  output = (output or settings.OutputSettings()).check()
  runtime = (runtime or settings.RunSettings()).check()
  arguments.check(threshold=threshold)
  if check_only:
    return None
  model = loaded_lib.load(
    model_dir,
    mesh=partitioning.make_mesh(runtime.mesh_shape),
    dtype=runtime.dtype,
  )
  task = inputs.mixture_or_task_name
  choice = records.choose_threshold(
    model_dir,
    model.fingerprint,
    threshold,
    exits.confidence,
    exits.tau,
    calibration_record,
    task,
  )
  config = model.exit_config(
    exits.confidence,
    min_exit=exits.min_exit,
    tau=choice.tau,
    propagation=exits.propagation,
    sampling=sampling.sampling(),
  )
  if exits.mode == 'exact':
    # The draft layer is bounded by this model's depth, as the API bounds it.
    arguments.check(
      draft_layer=exits.draft_layer,
      num_layers=model.config.num_decoder_layers,
    )
    choice = records.exact_mode_draft(choice)
    mode = modes.Speculative(
      speculative.DraftConfig(
        config,
        gamma=exits.gamma,
        forced_layer=exits.draft_layer,
        min_confidence=exits.draft_min_confidence,
      ),
      choice.value,
    )
  else:
    records.check_decode_settings(choice, config.fingerprint())
    mode = modes.EarlyExit(config, choice.value)
  model.classifier_for(exits.confidence)
  sets = example_sets(model, inputs)
  check_sizes(model, sets, mode, runtime.batch_size)  # before any file
  run = decode_run(model, choice, mode, sets, sampling.seed)
  label = inputs.split if not inputs.input_file else _stem(sets[0])
  output_dir = output.output_dir or output_dir_for(model_dir, run, label)
  if multihost.is_primary():
    console.info(
      f'threshold {choice.value} ({choice.source}), confidence '
      f'{exits.confidence!r}, tau {choice.tau}'
    )
    claim_output_dir(output_dir, run, output.overwrite)
  evaluator = engine.Evaluator(
    decoder_lib.Decoder(model), batch_size=runtime.batch_size
  )
  summary = decode_records.DecodeSummary(
    checkpoint_step=model.step,
    dtype=model.config.dtype,
    confidence=exits.confidence,
    threshold=choice.value,
    threshold_source=choice.source,
    tau=choice.tau,
    split=None if inputs.input_file else inputs.split,
    tasks={},
  )
  for examples in sets:
    decoded = evaluator.decode(examples, mode, seed=sampling.seed)
    result = summarize(examples, decoded)
    summary.tasks[examples.name] = result
    if multihost.is_primary():
      _write(
        output_dir,
        output,
        examples,
        decoded,
        mode,
        model.config.num_decoder_layers,
      )
      score = (
        f'{result["metric"]} = {result["value"]:.2f}, '
        if 'metric' in result
        else ''
      )
      console.info(
        f'{examples.name}: {score}average layers '
        f'{result["avg_decoder_layers"]:.2f}'
      )
  if multihost.is_primary():
    files.atomic_write_json(
      files.join(output_dir, decode_records.SUMMARY_JSON), summary.to_json()
    )
    console.info(f'wrote {output_dir}')
  return summary


def run(check_only: bool = False) -> None:
  decode(check_only=check_only)
