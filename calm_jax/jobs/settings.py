"""Grouped settings of the decode and calibrate jobs (gin configurables).

Each group is one gin-configurable dataclass, bound in the run files as
`calm_jax.<Group>.<field>`; a job builds the groups it reads when it starts,
so a binding applies wherever the group is used: `ExitSettings` and
`RunSettings` are shared by decode and calibrate, which is what keeps a
calibration record's settings and the decode that uses it the same.
"""

import dataclasses
from typing import Optional
from typing import Sequence

import gin

from calm_jax import arguments
from calm_jax import errors
from calm_jax.decoding import loops


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class ExitSettings:
  """How tokens may exit early.

  Attributes:
    confidence: the measure: softmax, softmax_max, state, classifier, oracle.
    tau: decay of the threshold over positions (None: constant; the
      paper's 4.0 for summaries and translations).
    min_exit: the lowest layer a token may exit at.
    propagation: what skipped layers' caches get: 'hidden' (CALM), or the
      ablations 'kv_copy' and 'none'.
    mode: 'early_exit' (CALM at the threshold) or 'exact' (the full
      model's output: the early exits draft up to `gamma` tokens that one
      full-depth pass verifies; decode only).
    gamma: the exact mode's drafted tokens per verify pass at most.
    draft_layer: the exact mode's fixed draft exit layer (None: the
      confidence threshold decides).
    draft_min_confidence: in the exact mode, a row stops drafting once its
      draft's confidence falls below it (0: always `gamma` drafts).
  """

  confidence: str = 'softmax'
  tau: Optional[float] = None
  min_exit: int = 1
  propagation: str = 'hidden'
  mode: str = 'early_exit'
  gamma: int = 4
  draft_layer: Optional[int] = None
  draft_min_confidence: float = 0.0

  def check(self) -> 'ExitSettings':
    arguments.check(**dataclasses.asdict(self))
    return self


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Where and how big the decodes run.

  Attributes:
    batch_size: the global batch (split over processes and 'data' shards).
    mesh_shape: the (data, model) device mesh; None: every device on 'data'.
    dtype: activation dtype; None keeps the model's, 'bfloat16' runs
      bfloat16 activations over the float32 parameters (TPU/GPU style).
  """

  batch_size: int = 32
  mesh_shape: Optional[Sequence[int]] = None
  dtype: Optional[str] = None

  def check(self) -> 'RunSettings':
    arguments.check(
      batch_size=self.batch_size, dtype=self.dtype, mesh_shape=self.mesh_shape
    )
    return self


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """What decode reads: a task or mixture's split, or the user's own file.

  Attributes:
    mixture_or_task_name: a SeqIO task or mixture. With `input_file`, the
      task whose metrics score a file that has targets (optional).
    split: the task split.
    num_examples: the first N examples (None: all).
    input_file: a JSONL, TSV or text file of inputs instead of a task.
    input_format: 'jsonl', 'tsv' or 'text' (None: from the extension).
    input_field, target_field: the JSONL fields of input and target.
    input_length, target_length: for a file, the longest input kept and
      the decode length (None: the lengths the model was trained with).
  """

  mixture_or_task_name: Optional[str] = None
  split: str = 'validation'
  num_examples: Optional[int] = None
  input_file: Optional[str] = None
  input_format: Optional[str] = None
  input_field: str = 'inputs'
  target_field: str = 'targets'
  input_length: Optional[int] = None
  target_length: Optional[int] = None

  def check(self) -> 'DecodeInputs':
    if not self.mixture_or_task_name and not self.input_file:
      raise errors.SettingError(
        'nothing to decode: set MIXTURE_OR_TASK_NAME (a SeqIO task) or '
        'INPUT_FILE (a JSONL, TSV or text file)'
      )
    arguments.check(
      num_examples=self.num_examples,
      input_length=self.input_length,
      target_length=self.target_length,
    )
    return self


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Token selection: greedy at temperature 0, else a seeded sample."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def check(self) -> 'SamplingSettings':
    arguments.check(**dataclasses.asdict(self))
    return self

  def sampling(self) -> loops.Sampling:
    return loops.Sampling(
      float(self.temperature), self.top_k, float(self.top_p)
    )


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class OutputSettings:
  """Where decode writes.

  Attributes:
    output_dir: None: MODEL_DIR/decode/<split>_<measure>_<threshold>_<hash
      of every setting>. A directory holding another run's files is
      refused unless `overwrite`.
    exit_map: a directory for HTML + PNG exit maps of the first
      `exit_map_examples` examples of each task (None: none).
  """

  output_dir: Optional[str] = None
  overwrite: bool = False
  exit_map: Optional[str] = None
  exit_map_examples: int = 10

  def check(self) -> 'OutputSettings':
    arguments.check(exit_map_examples=self.exit_map_examples)
    return self


SETTINGS = ('calm_jax.ExitSettings', 'calm_jax.RunSettings')
DECODE_SETTINGS = (
  *SETTINGS,
  'calm_jax.DecodeInputs',
  'calm_jax.SamplingSettings',
  'calm_jax.OutputSettings',
)


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """When training saves, how many steps it keeps, how it restores.

  Attributes:
    period: save every `period` steps (and at the end, and on Ctrl-C).
    keep: the newest steps kept (None: all); a step of non-finite values is
      never saved, so retention only ever drops finite checkpoints.
    restore_fallback: a damaged latest step is reported and the newest
      intact one resumed; False makes it an error.
  """

  period: int = 500
  keep: Optional[int] = 3
  restore_fallback: bool = True

  def check(self) -> 'CheckpointSettings':
    arguments.check(
      prefix='CheckpointSettings.', period=self.period, keep=self.keep
    )
    return self


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class LogSettings:
  """What training reports.

  Attributes:
    log_every: steps between console lines and TensorBoard scalars (loss,
      per-exit losses and accuracies, learning rate, steps/s).
    progress: the progress bar.
    eval_every: steps between validation metrics (the objective on the
      first `eval_batches` batches of each task's validation split, no
      dropout); 0: none.
    eval_batches: validation batches per task.
  """

  log_every: int = 50
  progress: bool = True
  eval_every: int = 0
  eval_batches: int = 4

  def check(self) -> 'LogSettings':
    arguments.check(
      prefix='LogSettings.',
      log_every=self.log_every,
      eval_every=self.eval_every,
      eval_batches=self.eval_batches,
    )
    return self


@gin.configurable(module='calm_jax')
@dataclasses.dataclass(frozen=True)
class LossSettings:
  """CALM's training objective: the per-exit weighting ('linear': w_i
  proportional to i, the paper's; 'uniform'; 'geometric'), the z-loss, and
  how the exits' cross-entropy is computed (`exit_loss`: 'fused', the output
  layer and the loss in TPU kernels with no logits in memory; 'streamed',
  one exit's logits at a time; 'auto', fused when compiling for TPU)."""

  weighting: str = 'linear'
  z_loss: float = 1e-4
  exit_loss: str = 'auto'

  def check(self) -> 'LossSettings':
    arguments.check(
      prefix='LossSettings.',
      weighting=self.weighting,
      z_loss=self.z_loss,
      exit_loss=self.exit_loss,
    )
    return self


TRAIN_SETTINGS = (
  'calm_jax.CheckpointSettings',
  'calm_jax.LogSettings',
  'calm_jax.LossSettings',
)
