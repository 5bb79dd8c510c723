"""The validity job: does the calibration keep its promise?

Decodes the model's validation data once per grid threshold (through the
engine's cache), then for each delta and consistency type draws random
80/20 calibration/test splits (the paper's protocol), certifies a threshold
on the 80% with Learn then Test and measures on the 20%: the fraction of
splits whose test risk exceeds delta (LTT promises <= epsilon), the mean
test risk, the mean average layers and the mean speed-up (full-depth decode
time over early-exit decode time of the same examples, as measured while
decoding). Writes OUTPUT_DIR/validity.json and validity.png.
"""

import os
from typing import Optional
from typing import Sequence

from etils import epy
import gin

from calm_jax import arguments
from calm_jax import console
from calm_jax.analysis import plots
from calm_jax.analysis import split_protocol
from calm_jax.calibration import ltt
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.jobs import calibrate as calibrate_job
from calm_jax.jobs import preflight
from calm_jax.jobs import settings
from calm_jax.storage import files

# The SeqIO pipeline (and with it TensorFlow) loads when a job first
# reads data, not when the command line registers every job.
with epy.lazy_imports():
  from calm_jax.data import pipeline

READS = ('calm_jax.validity',)
DEFAULT_GIN_FILES = ('gin/runs/validity.gin',)
DELTAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def needs(model_dir: str, confidence: str) -> list[preflight.Need]:
  """The trained model (and its classifier for the classifier measure)."""
  found = [preflight.model_dir(model_dir)]
  if confidence == 'classifier':
    found.append(preflight.classifier(model_dir))
  return found


@gin.configurable(module='calm_jax')
def validity(
  *,
  model_dir: str = gin.REQUIRED,
  mixture_or_task_name: str = 'synth_mix',
  num_examples: int = 300,
  splits: int = 50,
  epsilon: float = 0.05,
  confidence: str = 'softmax',
  deltas: Sequence[float] = DELTAS,
  output_dir: str = 'runs/validity',
  check_only: bool = False,
) -> Optional[dict]:
  """Runs the split protocol per consistency and delta; writes the results
  (`check_only`: checks the settings, runs nothing)."""
  arguments.check(
    num_examples=num_examples,
    splits=splits,
    epsilon=epsilon,
    confidence=confidence,
    delta=list(deltas),
  )
  files.check_writable_dir(output_dir, 'output_dir')
  if check_only:
    return None
  preflight.refuse_unmet('the validity protocol', needs(model_dir, confidence))
  model = loaded_lib.load(model_dir)
  calibration = calibrate_job.calibration_for(
    decoder_lib.Decoder(model),
    list(pipeline.task_rates(mixture_or_task_name)),
    settings.ExitSettings(confidence=confidence).check(),
    split='validation',
    num_examples=num_examples,
    batch_size=32,
  )
  grid = ltt.descending_grid(1.0, 0.0, 0.05)
  speedups = calibration.speedups(grid)
  results = []
  for consistency in arguments.CONSISTENCIES:
    table = calibration.loss_table(consistency, grid)
    for delta in deltas:
      row = split_protocol.run_splits(
        *table,
        grid,
        delta=delta,
        epsilon=epsilon,
        splits=splits,
        seed=0,
        num_layers=model.config.num_decoder_layers,
        speedups=speedups,
      )
      row['consistency'] = consistency
      results.append(row)
      console.info(
        f'{consistency:>8} delta={delta:<5} violations='
        f'{row["violation_rate"]:.3f} risk={row["mean_test_risk"]:.4f} '
        f'layers={row["mean_avg_layers"]:.2f} '
        f'speedup={row["mean_speedup"]:.2f}'
      )
  out = {
    'model_dir': model_dir,
    'checkpoint_step': model.step,
    'confidence': confidence,
    'n': int(table[0].shape[1]),
    'grid': grid,
    'speedup_by_threshold': speedups,
    'results': results,
  }
  files.atomic_write_json(os.path.join(output_dir, 'validity.json'), out)
  plots.risk_vs_delta(results, os.path.join(output_dir, 'validity.png'))
  console.info(f'wrote {output_dir}/validity.json and validity.png')
  return out


def run(check_only: bool = False) -> None:
  validity(check_only=check_only)
