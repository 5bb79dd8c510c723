"""The plan job: every program of a training and decoding run compiled for
a TPU topology on this machine (no TPU, no parameters), against the chip's
memory, with FLOPs, bytes, roofline bounds and per-token decode costs.

A program that does not fit is refused in one line (exit 2) naming the
topology, the memory it needs against the HBM and its largest arrays.
"""

import dataclasses
import json
import pathlib
from typing import Optional
from typing import Sequence

import gin

from calm_jax import arguments
from calm_jax import console
from calm_jax import errors
from calm_jax.model import fused_loss
from calm_jax.model import model_files
from calm_jax.planning import plan as plan_lib
from calm_jax.planning import tpu
from calm_jax.storage import files
from calm_jax.training import optim

READS = ('calm_jax.plan', 'calm_jax.T5Config', 'calm_jax.LlamaConfig')
DEFAULT_GIN_FILES = ('gin/runs/plan.gin',)
# It starts libtpu itself (planning.tpu), to compile for a TPU on any machine.
STARTS_TPU_COMPILER = True
MEASURED = {
  # Exit histograms measured on this CPU, keyed by what they measured: the
  # demo model's certified softmax exits at delta 0.25 (make reproduce) and
  # SmolLM2's classifier exits with adapters at delta 0.25 (make
  # real-model).
  'reproduction': 'docs/reproduction.json',
  'real_model': 'docs/real_model.json',
  'exact_mode': 'docs/exact_mode.json',
}


@gin.configurable(module='calm_jax')
def plan(
  *,
  model_config: Optional[model_files.Config] = gin.REQUIRED,
  topology: str = gin.REQUIRED,
  mesh_shape: Optional[Sequence[int]] = None,
  name: Optional[str] = None,
  train_batch_size: int = 128,
  input_length: int = 512,
  target_length: int = 128,
  stages: Sequence[str] = ('model', 'classifier'),
  decode_batch_sizes: Sequence[int] = (1, 32),
  decode_input_length: int = 512,
  max_decode_length: int = 128,
  measures: Sequence[str] = ('softmax', 'state', 'classifier'),
  gamma: int = 4,
  decode_model_parallelism: int = 1,
  remat_policy: str = 'none',
  exit_loss: str = 'auto',
  scan_layers: bool = False,
  parameter_partitioning_dims: int = 1,
  pack: bool = False,
  decoders: bool = True,
  token_costs: bool = True,
  token_exit_layers: Optional[Sequence[int]] = None,
  histograms: Optional[str] = None,
  output: Optional[str] = None,
  check_only: bool = False,
) -> Optional[dict]:
  """Compiles the run's programs for `topology` and writes `output` (JSON).

  `exit_loss` is the train step's (`LossSettings.exit_loss`: 'auto' fuses
  the exits' head and cross-entropy on TPU; 'streamed' plans the unfused).
  `histograms`: 'reproduction' or 'real_model' predicts the early exit's
  and the exact mode's speed-up at that measured exit histogram.
  """
  if model_config is None:
    raise errors.SettingError('plan needs a model config (gin/models/*.gin)')
  arguments.check(
    mesh_shape=mesh_shape, remat_policy=remat_policy, exit_loss=exit_loss
  )
  if histograms is not None:
    arguments.choice('histograms', histograms, ('reproduction', 'real_model'))
  settings = plan_lib.PlanSettings(
    topology=topology,
    mesh_shape=tuple(mesh_shape) if mesh_shape else None,
    parameter_partitioning_dims=parameter_partitioning_dims,
    pack=pack,
    train_batch_size=train_batch_size,
    input_length=input_length,
    target_length=target_length,
    stages=tuple(stages),
    decode_batch_sizes=tuple(decode_batch_sizes),
    decode_input_length=decode_input_length,
    max_decode_length=max_decode_length,
    measures=tuple(measures),
    gamma=gamma,
    decode_model_parallelism=decode_model_parallelism,
    decoders=decoders,
    token_costs=token_costs,
    token_exit_layers=tuple(token_exit_layers) if token_exit_layers else None,
  ).check()
  if output:
    files.check_writable_dir(str(pathlib.Path(output).parent) or '.', 'OUTPUT')
  if check_only:
    return None
  tpu.start(topology)
  model_config = dataclasses.replace(model_config, scan_layers=scan_layers)
  model = model_files.model_for(
    model_config, remat_policy=remat_policy, exit_loss=exit_loss
  )
  optimizer = dataclasses.replace(
    optim.make_optimizer(name='adafactor', learning_rate=1e-3),
    per_layer=scan_layers,
  )
  console.info(
    f'planning {name or type(model_config).__name__} on {topology} '
    '(the TPU compiler on this machine: memory and costs, no timings)'
  )
  result = plan_lib.plan(model, optimizer, settings, on_report=_line)
  result['name'] = name
  result['config'] = dataclasses.asdict(model_config)
  result['remat_policy'] = remat_policy
  # What the train step ran: 'auto' resolved for TPU at this embedding.
  fused = fused_loss.use_fused(exit_loss, 'tpu', model_config.emb_dim)
  result['exit_loss'] = 'fused' if fused else 'streamed'
  if histograms and token_costs:
    result['predictions'] = predictions(result, model_config, histograms)
  if output:
    files.atomic_write_json(output, result)
    console.info(f'wrote {output}')
  return result


def _line(report) -> None:
  console.info(
    f'  {report.name}: {report.total_bytes / 2**30:.2f} GiB of '
    f'{report.hbm_bytes / 2**30:.0f} GiB per device, '
    f'{report.flops / 1e9:.3g} GFLOP, {report.bytes_accessed / 1e9:.3g} GB, '
    f'roofline >= {report.roofline_seconds * 1e3:.3g} ms ({report.bound})'
  )


def measured_histograms(source: str) -> list[dict]:
  """[{'label', 'measure', 'histogram'}] from a measured JSON file."""
  data = json.loads(files.read_text(MEASURED[source]))
  if source == 'reproduction':
    return [
      {
        'label': f'{row["task"]} {row["measure"]} delta {row["delta"]}',
        'measure': row['measure'],
        'histogram': row['exit_layers_histogram'],
      }
      for row in data['table']
      if row['consistency'] == 'textual' and row['delta'] == 0.25
    ]
  return [
    {
      'label': f'{row["measure"]} {row["adapters"]} every {row["exit_layers"][0]}'
      f' delta {row["delta"]}',
      'measure': row['measure'],
      'histogram': row['exit_histogram'],
    }
    for row in data['calibration']
    if row['delta'] == 0.25 and row['adapters'] == 'adapters'
  ]


def _tokens_per_pass(source: str) -> dict:
  """The exact mode's measured tokens per verify pass at batch 1, per demo
  task (none for the real model: its exact mode was not measured)."""
  if source != 'reproduction':
    return {}
  data = json.loads(files.read_text(MEASURED['exact_mode']))
  return {
    row['examples']: row['tokens_per_pass']
    for row in data['demo']['speed']
    if row['batch_size'] == 1
  }


def predictions(result: dict, config, source: str) -> list[dict]:
  layers = config.num_decoder_layers
  per_pass = _tokens_per_pass(source)
  out = []
  for entry in measured_histograms(source):
    for batch, costs in result['token_costs'].items():
      if entry['measure'] not in costs['exits']:
        continue
      task = entry['label'].split()[0]
      out.append(
        {
          **entry,
          'batch_size': int(batch),
          'calm_speedup_bound': plan_lib.predicted_speedup(
            costs, entry['measure'], entry['histogram'], int(batch), layers
          ),
          'exact': plan_lib.exact_round(
            costs,
            entry['measure'],
            entry['histogram'],
            int(batch),
            layers,
            per_pass.get(task) if entry['measure'] == 'softmax' else None,
          ),
        }
      )
  return out


def run(check_only: bool = False) -> None:
  plan(check_only=check_only)
