"""The bench job: early-exit decoding vs the static full-depth decoder.

For each model (the paper's small dims with random weights; the trained demo
model when runs/demo/model exists), activation dtype, batch size, confidence
measure and exit pattern, it decodes the same inputs with the static decoder and with the
early-exit decoder, alternating runs after compiling both, and reports
medians, the layer-ideal and FLOPs-ideal speed-ups and the efficiency
(measured / FLOPs-ideal). Patterns: `exit@k` forces every token to stop at
layer k (confidences are still computed, so their cost is real), `mixed`
draws each token's exit layer from the demo model's measured distribution,
`disabled` runs with exits off (threshold > 1): the loop's overhead.
Outputs have a fixed length (EOS is ignored) so both decoders do the same
number of positions. The timed call is the decode loop: the encoder and the
cross-attention K/V run once, outside it (they are the same work for both
decoders; the demo's speed-ups include them).
"""

import dataclasses
import os
import statistics
from typing import Optional
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import api
from calm_jax import arguments
from calm_jax import console
from calm_jax.analysis import flops
from calm_jax.analysis import report_markdown
from calm_jax.decoding import loops
from calm_jax.decoding import thresholds
from calm_jax.evaluation import engine
from calm_jax.evaluation import timing
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.jobs import preflight
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.storage import files
from calm_jax.tasks import synthetic

READS = ('calm_jax.bench',)
DEFAULT_GIN_FILES = ('gin/runs/bench.gin',)

NO_EOS = -1
MEASURES = ('softmax', 'state', 'classifier')
MODELS = ('paper_small', 'demo')
PAPER_SMALL = network.T5Config()  # 8+8 layers, d_model 512, vocab 32,128
# Used when no demo model exists to measure a distribution from.
FALLBACK_MIX = (0.45, 0.2, 0.1, 0.08, 0.06, 0.04, 0.03, 0.04)


@dataclasses.dataclass
class BenchModel:
  name: str
  decoder: decoder_lib.Decoder
  inputs: np.ndarray  # [max batch, s] encoder tokens
  output_length: int
  exit_distribution: tuple  # P(exit at layer k), k = 1..L
  distribution_source: str

  @property
  def config(self) -> network.T5Config:
    return self.decoder.model.config


def with_dtype(bench: BenchModel, dtype: str) -> BenchModel:
  """The same model and parameters (float32) with another activation dtype."""
  return dataclasses.replace(
    bench, decoder=decoder_lib.Decoder(bench.decoder.model.with_dtype(dtype))
  )


def random_classifier(cfg: network.T5Config) -> dict:
  key = jax.random.PRNGKey(1)
  return {
    'kernel': jax.random.normal(key, (cfg.emb_dim, 1)) * 0.01,
    'bias': jnp.zeros((1,)),
  }


def forced_pattern(
  pattern: str, bench: BenchModel, batch: int, seed: int = 0
) -> Optional[np.ndarray]:
  """[b, t] exit layer of every token for a forced pattern, None if not."""
  shape = (batch, bench.output_length)
  if pattern.startswith('exit@'):
    return np.full(shape, int(pattern[5:]), np.int32)
  if pattern == 'mixed':
    layers = np.arange(1, len(bench.exit_distribution) + 1)
    # The stored shares are rounded: renormalise (choice wants a sum of 1).
    shares = np.asarray(bench.exit_distribution, np.float64)
    return (
      np.random.RandomState(seed)
      .choice(layers, size=shape, p=shares / shares.sum())
      .astype(np.int32)
    )
  return None


def pattern_mode(
  pattern: str, bench: BenchModel, batch: int, exit_config: loops.ExitConfig
) -> modes.Mode:
  """The early-exit decode of a pattern: forced exits, or exits disabled."""
  forced = forced_pattern(pattern, bench, batch)
  if forced is None:  # 'disabled': the early-exit loop at full depth
    return modes.EarlyExit(exit_config, thresholds.EXITS_OFF)
  return modes.ForcedExits(
    exit_config, exit_layers=tuple(map(tuple, forced.tolist()))
  )


def encoded_context(bench: BenchModel, batch: int):
  """Cross K/V and mask of the first `batch` inputs, computed once outside
  the timing (the same work for both decoders)."""
  return jax.block_until_ready(bench.decoder.encode(bench.inputs[:batch]))


def loop_runner(
  bench: BenchModel, mode: modes.Mode, context, batch: int
) -> decoder_lib.Runner:
  """The decode loop of `mode` alone, compiled, over an encoded context;
  EOS is ignored so that every decode runs the same number of positions."""
  return bench.decoder.runner(
    mode,
    context,
    max_length=bench.output_length,
    encoded=True,
    eos_id=NO_EOS,
    indices=range(batch),
  )


def case_flops(
  bench: BenchModel,
  out: loops.DecodeOutput,
  measure: str,
  exit_config: loops.ExitConfig,
  batch: int,
) -> dict:
  cfg = bench.config
  sizes = dict(
    input_length=bench.inputs.shape[1],
    cache_length=bench.output_length,
    batch_size=batch,
  )
  layers = np.asarray(out.exit_layers).reshape(-1)
  static = flops.static_flops(cfg, num_tokens=layers.size, **sizes)
  early = flops.early_exit_flops(
    cfg, layers, measure=measure, allowed_exits=exit_config.exit_layers, **sizes
  )
  return {
    'avg_layers': float(layers.mean()),
    'flops_ideal_speedup': static / early,
  }


def run_case(
  bench: BenchModel,
  batch: int,
  measure: str,
  pattern: str,
  static: decoder_lib.Runner,
  repeats: int,
  bucket_sizes=None,
) -> dict:
  """Times one case against the (compiled) static decode of the same
  inputs, alternating."""
  cfg = bench.config
  exit_config = bench.decoder.model.exit_config(
    measure, bucket_sizes=bucket_sizes
  )
  context = encoded_context(bench, batch)
  early = loop_runner(
    bench, pattern_mode(pattern, bench, batch, exit_config), context, batch
  )
  out = jax.device_get(early(context))
  times = timing.alternating_seconds(
    {'static': lambda _: static(context), 'early': lambda _: early(context)},
    [None],
    repeats,
  )
  stats = case_flops(bench, out, measure, exit_config, batch)
  static_s, early_s = (statistics.median(times[k]) for k in ('static', 'early'))
  return {
    'model': bench.name,
    'dtype': cfg.dtype,
    'batch_size': batch,
    'pattern': pattern,
    'confidence': measure,
    'buckets': list(exit_config.buckets(batch)),
    'avg_layers': round(stats['avg_layers'], 3),
    'layer_ideal_speedup': round(
      cfg.num_decoder_layers / stats['avg_layers'], 3
    ),
    'flops_ideal_speedup': round(stats['flops_ideal_speedup'], 3),
    'measured_speedup': round(static_s / early_s, 3),
    'efficiency': round(static_s / early_s / stats['flops_ideal_speedup'], 3),
    'static_median_s': round(static_s, 5),
    'early_median_s': round(early_s, 5),
    'compile_s_static': round(static.compile_seconds, 2),
    'compile_s_early': round(early.compile_seconds, 2),
    'repeats': repeats,
  }


def paper_small_model(
  max_batch: int, length: int, distribution: tuple[tuple, str]
) -> BenchModel:
  """The paper's small dims with random weights (and a random classifier)."""
  model = models.CalmModel(PAPER_SMALL)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  inputs = (
    np.random.RandomState(0)
    .randint(3, PAPER_SMALL.vocab_size, size=(max_batch, length))
    .astype(np.int32)
  )
  loaded = loaded_lib.in_memory(
    model,
    params,
    classifier=random_classifier(PAPER_SMALL),
    name='paper_small_random',
  )
  return BenchModel(
    'paper_small_random',
    decoder_lib.Decoder(loaded),
    inputs,
    length,
    *distribution,
  )


def exit_distribution(
  lm: Optional[api.CalmLM], threshold: float = 0.9, examples: int = 48
) -> tuple[tuple, str]:
  """Exit-layer distribution of the demo model (softmax at `threshold`)."""
  if lm is None:
    return FALLBACK_MIX, 'fallback (no demo model)'
  texts = [
    synthetic.generate(task, 'validation', i)['inputs']
    for task in synthetic.GENERATORS
    for i in range(examples // 3)
  ]
  results = lm.generate(texts, threshold=threshold, batch_size=16)
  counts = np.asarray(
    engine.exit_histogram(
      [r.exit_layers for r in results], lm.config.num_decoder_layers
    )
  )
  return (
    tuple((counts / counts.sum()).round(4).tolist()),
    f'demo model, softmax threshold {threshold}, {counts.sum()} tokens',
  )


def demo_model(
  lm: api.CalmLM, max_batch: int, length: int, distribution: tuple[tuple, str]
) -> BenchModel:
  """The trained demo model on summarisation inputs."""
  texts = [
    synthetic.generate('summarize', 'validation', i)['inputs']
    for i in range(max_batch)
  ]
  return BenchModel('demo', lm.decoder, lm.encode(texts), length, *distribution)


def token_agreement(reference: list, other: list) -> dict:
  """How often two decodes of the same inputs emit the same greedy tokens.

  Positions are compared up to the reference's EOS (a shorter or longer
  other output counts its missing or extra positions as disagreements).
  """
  same = total = identical = 0
  for ref, out in zip(reference, other):
    length = max(len(ref.tokens), len(out.tokens))
    padded = lambda t: list(t) + [None] * (length - len(t))
    same += sum(a == b for a, b in zip(padded(ref.tokens), padded(out.tokens)))
    total += length
    identical += ref.tokens == out.tokens
  return {
    'token_agreement': round(same / max(total, 1), 4),
    'identical_outputs': round(identical / max(len(reference), 1), 4),
    'tokens': total,
    'examples': len(reference),
  }


def dtype_agreement(lm: api.CalmLM, examples: int = 100) -> dict:
  """bfloat16 vs float32 full-depth greedy decodes of a trained model (its
  parameters loaded once), per embedded task (validation inputs)."""
  lms = {
    dtype: api.CalmLM.wrap(lm.loaded.with_dtype(dtype))
    for dtype in arguments.DTYPES
  }
  result = {}
  for task in synthetic.GENERATORS:
    texts = [
      synthetic.generate(task, 'validation', i)['inputs']
      for i in range(examples)
    ]
    decodes = {
      dtype: lm.generate(texts, threshold=thresholds.EXITS_OFF, batch_size=16)
      for dtype, lm in lms.items()
    }
    result[task] = token_agreement(decodes['float32'], decodes['bfloat16'])
  return result


def bucket_variants(batch: int) -> dict[str, Optional[tuple]]:
  """Bucket sets compared on the mixed pattern at batch > 1."""
  return {
    'halvings': None,
    'b_b4_1': (batch, max(batch // 4, 1), 1),
    'min_over_batch': (batch,),
  }


def bench_model(
  bench: BenchModel,
  batches,
  measures,
  patterns,
  repeats,
  log,
  compare_buckets: bool = True,
) -> list[dict]:
  cases = []
  for batch in batches:
    static = loop_runner(
      bench, modes.FullDepth(), encoded_context(bench, batch), batch
    )
    for measure in measures:
      for pattern in patterns:
        variants = (
          bucket_variants(batch)
          if compare_buckets and batch > 1 and pattern == 'mixed'
          else {'halvings': None}
        )
        for name, sizes in variants.items():
          case = run_case(
            bench, batch, measure, pattern, static, repeats, bucket_sizes=sizes
          )
          case['bucket_set'] = name
          cases.append(case)
          log(case)
  add_conservative_speedups(cases)
  return cases


def add_conservative_speedups(cases: list[dict]) -> None:
  """Speed-up against the faster of two full-depth decoders.

  On XLA:CPU the early-exit loop with exits disabled can run faster than the
  plain static loop (the per-layer branches change how XLA schedules the
  step), which would flatter `measured_speedup`. This field divides by the
  faster full-depth time of the same model, batch and measure instead.
  """
  key_of = lambda c: (
    c['model'],
    c.get('dtype'),
    c['batch_size'],
    c['confidence'],
  )
  disabled = {
    key_of(c): c['early_median_s'] for c in cases if c['pattern'] == 'disabled'
  }
  for c in cases:
    key = key_of(c)
    full = min(c['static_median_s'], disabled.get(key, np.inf))
    c['speedup_vs_best_full_depth'] = round(full / c['early_median_s'], 3)


def format_row(case: dict) -> str:
  return (
    f'{case["model"]:>18} {case.get("dtype", "float32"):>8} '
    f'b={case["batch_size"]:<3}'
    f'{case["confidence"]:>10} {case["pattern"]:>8} '
    f'{case["bucket_set"]:>14} '
    f'layers={case["avg_layers"]:<5} ideal={case["flops_ideal_speedup"]:<6}'
    f'measured={case["measured_speedup"]:<6} '
    f'eff={case["efficiency"]}'
  )


def markdown_table(cases: list[dict]) -> str:
  """The table of a bench.json."""
  header = (
    'model',
    'dtype',
    'batch',
    'measure',
    'pattern',
    'buckets',
    'avg layers',
    'layer ideal',
    'FLOPs ideal',
    'measured',
    'efficiency',
    'vs best full depth',
  )
  return report_markdown.table(
    header,
    [
      (
        c['model'],
        c.get('dtype', 'float32'),
        c['batch_size'],
        c['confidence'],
        c['pattern'],
        c.get('bucket_set', ''),
        c['avg_layers'],
        f'x{c["layer_ideal_speedup"]}',
        f'x{c["flops_ideal_speedup"]}',
        f'x{c["measured_speedup"]}',
        c['efficiency'],
        f'x{c.get("speedup_vs_best_full_depth", "")}',
      )
      for c in cases
    ],
  )


def tables_markdown(results: dict, source: str) -> str:
  """The page of a bench.json: where it ran, the cases, the agreement."""
  lines = [
    f'# Benchmark: {os.path.basename(source)}',
    '',
    f'Generated from `{source}` by `python -m calm_jax.bench`; '
    f'devices: {", ".join(results.get("devices", []))}. '
    f'{results.get("note", "")}; timed: {results.get("timed", "")}.',
    '',
    markdown_table(results['cases']),
  ]
  if results.get('complete') is False:
    lines += [
      '',
      f'Partial: the run stopped after {len(results["cases"])} cases.',
    ]
  if 'dtype_agreement' in results:
    lines += [
      '',
      'bfloat16 vs float32 greedy tokens (demo model): '
      + ', '.join(
        f'{task} {100 * r["token_agreement"]:.1f}% of {r["tokens"]} tokens'
        for task, r in results['dtype_agreement'].items()
      ),
    ]
  return '\n'.join(lines) + '\n'


def write_tables(path: str) -> str:
  """Writes the markdown page of a bench.json next to it; returns it."""
  page = tables_markdown(files.read_json(path, what='benchmark results'), path)
  files.atomic_write_text(os.path.splitext(path)[0] + '.md', page)
  return page


@gin.configurable(module='calm_jax')
def bench(
  *,
  output: str = 'runs/bench/bench.json',
  table: Optional[str] = None,
  repeats: int = 5,
  batch_sizes: Sequence[int] = (1, 16),
  measures: Sequence[str] = MEASURES,
  patterns: Sequence[str] = (
    'exit@1',
    'exit@2',
    'exit@4',
    'exit@8',
    'mixed',
    'disabled',
  ),
  models: Sequence[str] = MODELS,
  dtypes: Sequence[str] = ('float32',),
  demo_model_dir: str = 'runs/demo/model',
  compare_buckets: bool = True,
  agreement: bool = False,
  length: int = 64,
  check_only: bool = False,
) -> Optional[dict]:
  """Runs every case and writes `output` (JSON) and its markdown page
  (.md); with `table` (a bench.json), writes and prints that page instead.
  `demo_model_dir`: the trained model of the 'demo' cases and of the mixed
  pattern's exit distribution (loaded once; skipped when absent).
  `compare_buckets` compares bucket sets on the mixed pattern; `agreement`
  also measures bfloat16 vs float32 greedy tokens of the demo model;
  `length` is the paper-size model's input and output length.
  `check_only`: check the settings, measure nothing."""
  for value in dtypes:
    arguments.check(dtype=value)
  for value in models:
    arguments.choice('model', value, MODELS)
  for value in measures:
    arguments.choice('measure', value, MEASURES)
  arguments.check(repeats=repeats, length=length)
  for value in batch_sizes:
    arguments.check(batch_size=value)
  if check_only:
    return None
  if table:
    console.result(write_tables(table))
    return None
  preflight.refuse_unmet('the bench', needs(models, measures, demo_model_dir))
  demo = (
    api.CalmLM(demo_model_dir)
    if files.exists(files.join(demo_model_dir, model_files.MODEL_JSON))
    else None
  )
  distribution = exit_distribution(demo)
  builders = {
    'paper_small': lambda: paper_small_model(
      max(batch_sizes), length, distribution
    ),
    'demo': lambda: (
      demo and demo_model(demo, max(batch_sizes), 16, distribution)
    ),
  }
  cases, results = [], {'mixed_pattern': {}}
  finished = []  # every case measured so far, written as it comes

  def log(case: dict) -> None:
    console.result(format_row(case))
    finished.append(case)
    _write(output, results, cases + finished, complete=False)

  for name in models:
    model = builders[name]()
    if model is None:
      console.info(
        f'skipping {name}: no trained model in {demo_model_dir} (make demo)'
      )
      continue
    results['mixed_pattern'][model.name] = {
      'mixed_distribution': model.exit_distribution,
      'source': model.distribution_source,
    }
    for dtype in dtypes:
      cases += bench_model(
        with_dtype(model, dtype),
        list(batch_sizes),
        list(measures),
        list(patterns),
        repeats,
        log,
        compare_buckets=compare_buckets,
      )
      finished.clear()
  if agreement and demo is not None:
    results['dtype_agreement'] = dtype_agreement(demo)
    console.info(
      f'bfloat16 vs float32 greedy tokens: {results["dtype_agreement"]}'
    )
  out = _write(output, results, cases, complete=True)
  console.info(f'wrote {output} and its markdown page')
  return out


def needs(
  models: Sequence[str], measures: Sequence[str], demo_model_dir: str
) -> list[preflight.Need]:
  """The demo cases' classifier measure needs the demo model's classifier
  (without a demo model its cases are skipped, in one line)."""
  demo = preflight.model_dir(demo_model_dir)
  if 'demo' in models and demo.met and 'classifier' in measures:
    return [preflight.classifier(demo_model_dir)]
  return []


def _write(output: str, results: dict, cases: list, complete: bool) -> dict:
  """bench.json and its page: after every case (complete False: a run that
  stops keeps what it measured), and at the end."""
  out = {
    **results,
    'cases': cases,
    'complete': complete,
    'devices': [str(d) for d in jax.devices()],
    'timed': 'the decode loop; encoder and cross K/V computed once outside',
    'note': 'ratios from one run on this machine; absolute times are noise',
  }
  files.atomic_write_json(output, out)
  write_tables(output)
  return out


def run(check_only: bool = False) -> None:
  bench(check_only=check_only)
