"""A job's plan on a TPU topology: every program it runs, compiled there,
and what the early exit and the exact mode would gain per token.

No gin (the plan job is the entry point), no parameter ever materialised.
"""

import dataclasses
import functools
import math
from typing import Callable
from typing import Mapping
from typing import Optional
from typing import Sequence

import numpy as np

from calm_jax import arguments
from calm_jax import errors
from calm_jax.model import fused_loss
from calm_jax.parallel import partitioning
from calm_jax.planning import chips
from calm_jax.planning import compiled as compiled_lib
from calm_jax.planning import programs
from calm_jax.planning import tpu


@dataclasses.dataclass(frozen=True)
class PlanSettings:
  """What is planned (lengths are token counts; batches are global)."""

  topology: str
  mesh_shape: Optional[tuple[int, int]] = None  # train: (data, model)
  parameter_partitioning_dims: int = 1  # train: 2 splits 'embed' over 'data'
  pack: bool = False  # train: packed batches (segment ids in every mask)
  train_batch_size: int = 128
  input_length: int = 512
  target_length: int = 128
  stages: tuple[str, ...] = ('model', 'classifier')
  decode_batch_sizes: tuple[int, ...] = (1, 32)
  decode_input_length: int = 512
  max_decode_length: int = 128
  measures: tuple[str, ...] = ('softmax', 'state', 'classifier')
  gamma: int = 4
  # The decoders' smallest 'model' axis: 1 puts rows on 'data' as far as
  # the batch splits; a model whose float32 parameters do not fit one
  # device is split over this many at every batch.
  decode_model_parallelism: int = 1
  decoders: bool = True  # the whole decode programs of each mode
  token_costs: bool = True  # the one-position programs
  # Exit layers whose one-position program is compiled (None: every one);
  # costs in between are interpolated linearly.
  token_exit_layers: Optional[tuple[int, ...]] = None

  def check(self) -> 'PlanSettings':
    chips.parse_topology(self.topology)
    arguments.check(
      parameter_partitioning_dims=self.parameter_partitioning_dims
    )
    for name in ('train_batch_size', 'input_length', 'target_length'):
      arguments.integer(name, getattr(self, name), 1)
    names = ('decode_input_length', 'max_decode_length', 'gamma')
    for name in (*names, 'decode_model_parallelism'):
      arguments.integer(name, getattr(self, name), 1)
    for size in self.decode_batch_sizes:
      arguments.integer('decode_batch_sizes', size, 1)
    for measure in self.measures:
      arguments.check(confidence=measure)
    for stage in self.stages:
      arguments.choice('stages', stage, ('model', 'classifier'))
    return self


def train_mesh(settings: PlanSettings, devices: Sequence):
  shape = settings.mesh_shape or (len(devices), 1)
  return partitioning.make_mesh(shape, devices)


def decode_mesh_shape(
  batch_size: int, num_devices: int, model_parallelism: int = 1
) -> tuple[int, int]:
  """(data, model): rows over 'data' as far as the batch splits, keeping
  at least `model_parallelism` devices on 'model'; the rest on 'model'."""
  if num_devices % model_parallelism:
    raise errors.SettingError(
      f'decode_model_parallelism {model_parallelism} does not divide the '
      f'{num_devices} devices'
    )
  data = math.gcd(batch_size, num_devices // model_parallelism)
  return data, num_devices // data


def decode_mesh(batch_size: int, devices: Sequence, model_parallelism: int = 1):
  shape = decode_mesh_shape(batch_size, len(devices), model_parallelism)
  return partitioning.make_mesh(shape, devices)


def plan(
  model,
  optimizer,
  settings: PlanSettings,
  *,
  refuse: bool = True,
  on_report: Optional[Callable[[compiled_lib.ProgramReport], None]] = None,
  devices: Optional[Sequence] = None,
) -> dict:
  """Compiles every program of `settings` for its topology; the reports
  and the per-token costs as a JSON-ready dict. With `refuse`, the first
  program that does not fit raises DoesNotFitError (one line). `devices`
  replaces the topology's (the tests compile the same programs for CPU
  devices; the chip's figures still come from the topology)."""
  if devices is None:
    devices = tpu.devices(settings.topology)
  topology = chips.parse_topology(settings.topology)
  budget = chips.DeviceBudget.of(topology, len(devices))
  reports = []

  def run(program: programs.Program, adjust=None) -> compiled_lib.ProgramReport:
    report = compiled_lib.compile_program(program, budget, settings.topology)
    # Refused on the program's own memory (what `adjust` adds is costs, not
    # bytes held), before compiling what `adjust` needs.
    if refuse and not report.fits:
      raise compiled_lib.DoesNotFitError(
        compiled_lib.refusal(report, settings.topology)
      )
    if adjust is not None:  # costs the analysis leaves out, added
      report = adjust(report)
    reports.append(report)
    if on_report is not None:
      on_report(report)
    return report

  train = _train_reports(model, optimizer, settings, devices, run, budget)
  decode, tokens = {}, {}
  for batch in settings.decode_batch_sizes:
    mesh = decode_mesh(batch, devices, settings.decode_model_parallelism)
    if settings.decoders:
      decode[batch] = _decode_reports(model, settings, mesh, batch, run)
    if settings.token_costs:
      tokens[batch] = token_costs(model, settings, mesh, batch, run)
  return {
    'topology': settings.topology,
    'devices': len(devices),
    'chip': dataclasses.asdict(topology.chip),
    'device_budget': dataclasses.asdict(budget),
    'settings': dataclasses.asdict(settings),
    'train': train,
    'decode': {str(b): r for b, r in decode.items()},
    'token_costs': {str(b): t for b, t in tokens.items()},
  }


def _train_reports(
  model, optimizer, settings, devices, run, budget
) -> list[dict]:
  if not settings.stages:
    return []
  mesh = train_mesh(settings, devices)
  shapes = dict(
    batch_size=settings.train_batch_size,
    input_length=settings.input_length,
    target_length=settings.target_length,
    rules=partitioning.rules_for(settings.parameter_partitioning_dims),
    pack=settings.pack,
  )
  partitioning.check_batch_fits(settings.train_batch_size, mesh)
  build = {'model': programs.train_step, 'classifier': programs.classifier_step}
  out = []
  for stage in settings.stages:
    exit_loop = functools.partial(
      _with_exit_loop, model, stage, mesh, settings, budget
    )
    layer_scan = functools.partial(
      _with_layer_scan,
      lambda m, stage=stage: build[stage](m, optimizer, mesh, **shapes),
      model,
      budget,
    )
    adjust = lambda report, e=exit_loop, l=layer_scan: e(l(report))
    report = run(build[stage](model, optimizer, mesh, **shapes), adjust)
    out.append(
      {'stage': stage, 'mesh': list(mesh.devices.shape), **report.as_json()}
    )
  return out


def _with_exit_loop(model, stage, mesh, settings, budget, report):
  """The step's FLOPs and bytes with every iteration of its loop over the
  exits (the cost analysis counted one): the model stage's streamed loss
  runs len(exits) iterations, the classifier stage's labels len(exits)
  + 1 (its exits and the top). One iteration is compiled alone. The fused
  loss has no such loop (every exit in one kernel call)."""
  platform = mesh.devices.flat[0].platform
  embed = model.config.emb_dim
  if stage == 'model' and fused_loss.use_fused(
    model.exit_loss, platform, embed
  ):
    return report
  trips = (
    len(model.config.exit_layers)
    if stage == 'model'
    else len(model.classifier_exit_layers()) + 1
  )
  if trips <= 1:
    return report
  iteration = compiled_lib.compile_program(
    programs.exit_loop_iteration(
      model,
      mesh,
      batch_size=settings.train_batch_size,
      target_length=settings.target_length,
      backward=stage == 'model',
      rules=partitioning.rules_for(settings.parameter_partitioning_dims),
    ),
    budget,
  )
  added = trips - 1
  loop = {
    'iterations': trips,
    'iteration_flops': iteration.flops,
    'iteration_bytes_accessed': iteration.bytes_accessed,
    'counted_flops': report.flops,
    'counted_bytes_accessed': report.bytes_accessed,
  }
  return dataclasses.replace(
    report,
    flops=report.flops + added * iteration.flops,
    bytes_accessed=report.bytes_accessed + added * iteration.bytes_accessed,
    exit_loop=loop,
  )


def layer_depths(config) -> dict[str, int]:
  """The depth of each of a config's layer stacks, by field name."""
  fields = ('num_encoder_layers', 'num_decoder_layers', 'num_layers')
  return {f: getattr(config, f) for f in fields if f in vars(config)}


def _shallow(model, depths: Mapping[str, int]):
  """The model unrolled at the given depths, every layer an exit (valid
  at any depth; the loop over the exits is counted the same way)."""
  config = model.config
  changes = {'scan_layers': False, 'first_exit': 1, 'exit_interval': 1}
  if 'exit_layer_list' in vars(config):
    changes['exit_layer_list'] = ()
  config = dataclasses.replace(config, **changes, **depths)
  return dataclasses.replace(model, config=config)


def _with_layer_scan(build, model, budget, report):
  """A scanned step's FLOPs and bytes as its layers' work: the cost
  analysis counts a scan's body once, one layer per stack, and counts the
  scan's in-place slicing of stacked arrays as whole-array traffic. The
  unrolled step's figures stand in, extrapolated from unrolled compiles at
  depth 1 and 2 of each stack (cost is linear in each stack's depth; the
  loop over the exits is counted once in each, as in the scanned step, and
  `_with_exit_loop` adds the rest). Memory stays the scanned program's."""
  if not model.config.scan_layers:
    return report
  depths = layer_depths(model.config)
  ones = {f: 1 for f in depths}
  base = compiled_lib.compile_program(build(_shallow(model, ones)), budget)
  stacks = {}
  flops, accessed = base.flops, base.bytes_accessed
  for field, depth in depths.items():
    deeper = compiled_lib.compile_program(
      build(_shallow(model, {**ones, field: 2})), budget
    )
    layer_flops = deeper.flops - base.flops
    layer_bytes = deeper.bytes_accessed - base.bytes_accessed
    stacks[field] = {
      'layers': depth,
      'layer_flops': layer_flops,
      'layer_bytes_accessed': layer_bytes,
    }
    flops += (depth - 1) * layer_flops
    accessed += (depth - 1) * layer_bytes
  scan = {
    'stacks': stacks,
    'one_layer_flops': base.flops,
    'one_layer_bytes_accessed': base.bytes_accessed,
    'counted_flops': report.flops,
    'counted_bytes_accessed': report.bytes_accessed,
  }
  return dataclasses.replace(
    report, flops=flops, bytes_accessed=accessed, layer_scan=scan
  )


def _decode_reports(model, settings, mesh, batch, run) -> list[dict]:
  out = []
  for mode in programs.decode_modes(model, settings.measures, settings.gamma):
    program = programs.decode_program(
      model,
      mode,
      mesh,
      batch_size=batch,
      input_length=settings.decode_input_length,
      max_length=settings.max_decode_length,
    )
    report = run(program)
    out.append(
      {'mode': mode.label, 'mesh': list(mesh.devices.shape), **report.as_json()}
    )
  return out


def token_costs(model, settings, mesh, batch, run) -> dict:
  """Roofline bounds (seconds) and compiler figures of one position: at
  full depth, exiting after each layer under each measure, and the exact
  mode's verify pass."""
  setting = programs.TokenSetting(
    batch, settings.decode_input_length, settings.max_decode_length
  )
  top = model.config.num_decoder_layers

  def figures(report):
    return {
      'flops': report.flops,
      'bytes_accessed': report.bytes_accessed,
      'roofline_seconds': report.roofline_seconds,
      'bound': report.bound,
      'compile_seconds': report.compile_seconds,
    }

  full = run(programs.exit_token(model, mesh, setting, 'full', top))
  out = {'full': figures(full), 'exits': {}}
  for measure in settings.measures:
    layers = [*model.exit_config(measure).exit_layers, top]
    if settings.token_exit_layers is not None:
      chosen = set(settings.token_exit_layers) & set(layers)
      layers = sorted(chosen | {layers[0], top})
    out['exits'][measure] = {
      str(k): figures(
        run(programs.exit_token(model, mesh, setting, measure, k))
      )
      for k in layers
    }
  verify = run(programs.verify_pass(model, mesh, setting, settings.gamma))
  out['verify'] = {'gamma': settings.gamma, **figures(verify)}
  return out


# --- predictions ---------------------------------------------------------------


def exit_cost_curve(per_layer: dict, num_layers: int) -> np.ndarray:
  """Seconds of a token exiting after layer k, k = 1..L: the compiled
  layers' bounds, linear in between; a layer below the first compiled
  exit (a measure's floor) costs what that exit costs."""
  known = sorted((int(k), v['roofline_seconds']) for k, v in per_layer.items())
  xs, ys = zip(*known)
  return np.interp(np.arange(1, num_layers + 1), xs, ys)


def rescaled_histogram(
  histogram: Sequence[float], num_layers: int
) -> np.ndarray:
  """An exit histogram over L' layers mapped onto L by relative depth
  (layer k of L' -> the layer nearest k L / L'): an assumption, used when
  the planned model is deeper or shallower than the measured one."""
  counts = np.asarray(histogram, np.float64)
  source = len(counts)
  out = np.zeros(num_layers)
  for k, count in enumerate(counts, start=1):
    target = min(num_layers, max(1, round(k * num_layers / source)))
    out[target - 1] += count
  total = out.sum()
  if total <= 0:
    raise errors.UserError('an exit histogram with no tokens')
  return out / total


def expected_max_cost(
  probabilities: np.ndarray, cost: np.ndarray, batch: int
) -> float:
  """E[cost(max exit over `batch` rows)] for rows drawn independently from
  `probabilities`: the bucketed loop runs a layer while any row climbs,
  and at a memory-bound batch a layer costs about the same on any rows."""
  cdf = np.cumsum(probabilities)
  p_max = np.diff(np.concatenate([[0.0], np.clip(cdf, 0, 1) ** batch]))
  return float(np.dot(p_max, cost))


def predicted_speedup(
  costs: dict, measure: str, histogram: Sequence[float], batch: int, layers: int
) -> float:
  """Full-depth bound over the early exit's expected bound per position."""
  curve = exit_cost_curve(costs['exits'][measure], layers)
  probabilities = rescaled_histogram(histogram, layers)
  return costs['full']['roofline_seconds'] / expected_max_cost(
    probabilities, curve, batch
  )


def exact_round(
  costs: dict,
  measure: str,
  histogram: Sequence[float],
  batch: int,
  layers: int,
  tokens_per_pass: Optional[float],
) -> dict:
  """One exact-mode round (gamma drafted positions at the histogram's
  exits, one verify pass) against full depth for the same tokens: the
  predicted speed-up at the measured tokens per verify pass, and the tokens
  per pass at which it breaks even."""
  gamma = costs['verify']['gamma']
  curve = exit_cost_curve(costs['exits'][measure], layers)
  draft = expected_max_cost(rescaled_histogram(histogram, layers), curve, batch)
  round_seconds = gamma * draft + costs['verify']['roofline_seconds']
  full = costs['full']['roofline_seconds']
  return {
    'round_seconds': round_seconds,
    'full_seconds_per_token': full,
    'break_even_tokens_per_pass': round_seconds / full,
    'tokens_per_pass': tokens_per_pass,
    'speedup': None
    if tokens_per_pass is None
    else tokens_per_pass * full / round_seconds,
  }
