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
import time
from typing import Callable, Optional, Sequence

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
from calm_jax.evaluation import engine
from calm_jax.evaluation import timing
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.model import model_files
from calm_jax.storage import files
from calm_jax.tasks import synthetic

READS = ('calm_jax.bench',)
DEFAULT_GIN_FILES = ('gin/runs/bench.gin',)

NO_EOS = -1
MEASURES = ('softmax', 'state', 'classifier')
PAPER_SMALL = network.T5Config()  # 8+8 layers, d_model 512, vocab 32,128
DEMO_DIR = 'runs/demo/model'
# Used when no demo model exists to measure a distribution from.
FALLBACK_MIX = (0.45, 0.2, 0.1, 0.08, 0.06, 0.04, 0.03, 0.04)


@dataclasses.dataclass
class BenchModel:
  name: str
  model: models.CalmModel
  params: object
  inputs: np.ndarray        # [max batch, s] encoder tokens
  output_length: int
  exit_distribution: tuple  # P(exit at layer k), k = 1..L
  distribution_source: str


def with_dtype(bench: BenchModel, dtype: str) -> BenchModel:
  """The same model and parameters (float32) with another activation dtype."""
  config = dataclasses.replace(bench.model.config, dtype=dtype)
  return dataclasses.replace(
      bench, model=dataclasses.replace(bench.model, config=config))


def time_alternating(static: Callable, early: Callable, repeats: int
                     ) -> tuple[list[float], list[float]]:
  """Alternates the two (already compiled) calls; returns their times."""
  times = timing.alternating_seconds(
      {'static': lambda _: static(), 'early': lambda _: early()}, [None],
      repeats)
  return times['static'], times['early']


def compile_seconds(fn: Callable) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def random_classifier(cfg: network.T5Config) -> dict:
  key = jax.random.PRNGKey(1)
  return {'kernel': jax.random.normal(key, (cfg.emb_dim, 1)) * 0.01,
          'bias': jnp.zeros((1,))}


def forced_pattern(pattern: str, bench: BenchModel, batch: int,
                   seed: int = 0) -> Optional[np.ndarray]:
  """[b, t] exit layer of every token for a forced pattern, None if not."""
  shape = (batch, bench.output_length)
  if pattern.startswith('exit@'):
    return np.full(shape, int(pattern[5:]), np.int32)
  if pattern == 'mixed':
    layers = np.arange(1, len(bench.exit_distribution) + 1)
    # The stored shares are rounded: renormalise (choice wants a sum of 1).
    shares = np.asarray(bench.exit_distribution, np.float64)
    return np.random.RandomState(seed).choice(
        layers, size=shape, p=shares / shares.sum()).astype(np.int32)
  return None


def encoded_context(bench: BenchModel, enc):
  """Cross K/V and mask of the inputs, computed once outside the timing."""
  return jax.block_until_ready(
      jax.jit(bench.model.encode_context)(bench.params, enc))


def static_decoder(bench: BenchModel):
  """Jitted full-depth decode loop over a precomputed context."""
  return jax.jit(lambda p, e, c: bench.model.decode_static(
      p, e, bench.output_length, eos_id=NO_EOS, context=c).tokens)


def case_flops(bench: BenchModel, out: loops.DecodeOutput, measure: str,
               exit_config: loops.ExitConfig, batch: int) -> dict:
  cfg = bench.model.config
  sizes = dict(input_length=bench.inputs.shape[1],
               cache_length=bench.output_length, batch_size=batch)
  layers = np.asarray(out.exit_layers).reshape(-1)
  static = flops.static_flops(cfg, num_tokens=layers.size, **sizes)
  early = flops.early_exit_flops(cfg, layers, measure=measure,
                                 allowed_exits=exit_config.exit_layers,
                                 **sizes)
  return {'avg_layers': float(layers.mean()),
          'flops_ideal_speedup': static / early}


def run_case(bench: BenchModel, batch: int, measure: str, pattern: str,
             static_fn, static_compile: float, repeats: int,
             bucket_sizes=None) -> dict:
  """Times one case against the (compiled) static decode of the same inputs."""
  cfg = bench.model.config
  exit_config = bench.model.exit_config(measure, bucket_sizes=bucket_sizes)
  enc = jnp.asarray(bench.inputs[:batch])
  context = encoded_context(bench, enc)
  forced = forced_pattern(pattern, bench, batch)
  classifier = random_classifier(cfg) if measure == 'classifier' else None
  threshold = 1.5 if pattern == 'disabled' else 0.0
  early = jax.jit(lambda p, e, c, f: bench.model.decode_early_exit(
      p, e, bench.output_length, exit_config=exit_config, threshold=threshold,
      eos_id=NO_EOS, classifier=classifier, forced_exit_layers=f, context=c))
  early_call = lambda: early(bench.params, enc, context, forced)
  compile_early, out = compile_seconds(early_call)
  static_times, early_times = time_alternating(
      lambda: static_fn(bench.params, enc, context), early_call, repeats)
  stats = case_flops(bench, out, measure, exit_config, batch)
  measured = statistics.median(static_times) / statistics.median(early_times)
  return {
      'model': bench.name, 'dtype': cfg.dtype, 'batch_size': batch,
      'pattern': pattern, 'confidence': measure,
      'buckets': list(exit_config.buckets(batch)),
      'avg_layers': round(stats['avg_layers'], 3),
      'layer_ideal_speedup': round(cfg.num_decoder_layers
                                   / stats['avg_layers'], 3),
      'flops_ideal_speedup': round(stats['flops_ideal_speedup'], 3),
      'measured_speedup': round(measured, 3),
      'efficiency': round(measured / stats['flops_ideal_speedup'], 3),
      'static_median_s': round(statistics.median(static_times), 5),
      'early_median_s': round(statistics.median(early_times), 5),
      'compile_s_static': round(static_compile, 2),
      'compile_s_early': round(compile_early, 2),
      'repeats': repeats,
  }


def paper_small_model(max_batch: int, length: int) -> BenchModel:
  model = models.CalmModel(PAPER_SMALL)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  inputs = np.random.RandomState(0).randint(
      3, PAPER_SMALL.vocab_size, size=(max_batch, length)).astype(np.int32)
  mix, source = demo_exit_distribution()
  return BenchModel('paper_small_random', model, params, inputs, length, mix,
                    source)


def demo_exit_distribution(threshold: float = 0.9, examples: int = 48
                           ) -> tuple[tuple, str]:
  """Exit-layer distribution of the demo model (softmax at `threshold`)."""
  if not os.path.exists(os.path.join(DEMO_DIR, model_files.MODEL_JSON)):
    return FALLBACK_MIX, 'fallback (no demo model)'
  lm = api.CalmLM(DEMO_DIR)
  texts = [synthetic.generate(task, 'validation', i)['inputs']
           for task in synthetic.GENERATORS for i in range(examples // 3)]
  results = lm.generate(texts, threshold=threshold, batch_size=16)
  counts = np.asarray(engine.exit_histogram(
      [r.exit_layers for r in results], lm.config.num_decoder_layers))
  return (tuple((counts / counts.sum()).round(4).tolist()),
          f'demo model, softmax threshold {threshold}, {counts.sum()} tokens')


def demo_model(max_batch: int, length: int) -> Optional[BenchModel]:
  if not os.path.exists(os.path.join(DEMO_DIR, model_files.MODEL_JSON)):
    return None
  lm = api.CalmLM(DEMO_DIR)
  texts = [synthetic.generate('summarize', 'validation', i)['inputs']
           for i in range(max_batch)]
  mix, source = demo_exit_distribution()
  return BenchModel('demo', lm.model, lm.params, lm.encode(texts), length,
                    mix, source)


def token_agreement(reference: list, other: list) -> dict:
  """How often two decodes of the same inputs emit the same greedy tokens.

  Positions are compared up to the reference's EOS (a shorter or longer
  other output counts its missing or extra positions as disagreements).
  """
  same = total = identical = 0
  for ref, out in zip(reference, other):
    length = max(len(ref.tokens), len(out.tokens))
    padded = lambda t: list(t) + [None] * (length - len(t))
    same += sum(a == b for a, b in zip(padded(ref.tokens),
                                       padded(out.tokens)))
    total += length
    identical += ref.tokens == out.tokens
  return {'token_agreement': round(same / max(total, 1), 4),
          'identical_outputs': round(identical / max(len(reference), 1), 4),
          'tokens': total, 'examples': len(reference)}


def dtype_agreement(model_dir: str = DEMO_DIR, examples: int = 100) -> dict:
  """bfloat16 vs float32 full-depth greedy decodes of a trained model, per
  embedded task (validation inputs)."""
  lms = {dtype: api.CalmLM(model_dir, dtype=dtype)
         for dtype in network.DTYPES}
  result = {}
  for task in synthetic.GENERATORS:
    texts = [synthetic.generate(task, 'validation', i)['inputs']
             for i in range(examples)]
    decodes = {dtype: lm.generate(texts, threshold=1.5, batch_size=16)
               for dtype, lm in lms.items()}
    result[task] = token_agreement(decodes['float32'], decodes['bfloat16'])
  return result


def bucket_variants(batch: int) -> dict[str, Optional[tuple]]:
  """Bucket sets compared on the mixed pattern at batch > 1."""
  return {'halvings': None, 'b_b4_1': (batch, max(batch // 4, 1), 1),
          'min_over_batch': (batch,)}


def bench_model(bench: BenchModel, batches, measures, patterns, repeats,
                log, compare_buckets: bool = True) -> list[dict]:
  cases = []
  for batch in batches:
    static = static_decoder(bench)
    enc = jnp.asarray(bench.inputs[:batch])
    context = encoded_context(bench, enc)
    compile_static, _ = compile_seconds(
        lambda: static(bench.params, enc, context))
    for measure in measures:
      for pattern in patterns:
        variants = (bucket_variants(batch) if compare_buckets and batch > 1
                    and pattern == 'mixed' else {'halvings': None})
        for name, sizes in variants.items():
          case = run_case(bench, batch, measure, pattern, static,
                          compile_static, repeats, bucket_sizes=sizes)
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
  key_of = lambda c: (c['model'], c.get('dtype'), c['batch_size'],
                      c['confidence'])
  disabled = {key_of(c): c['early_median_s'] for c in cases
              if c['pattern'] == 'disabled'}
  for c in cases:
    key = key_of(c)
    full = min(c['static_median_s'], disabled.get(key, np.inf))
    c['speedup_vs_best_full_depth'] = round(full / c['early_median_s'], 3)


def format_row(case: dict) -> str:
  return (f"{case['model']:>18} {case.get('dtype', 'float32'):>8} "
          f"b={case['batch_size']:<3}"
          f"{case['confidence']:>10} {case['pattern']:>8} "
          f"{case['bucket_set']:>14} "
          f"layers={case['avg_layers']:<5} ideal={case['flops_ideal_speedup']:<6}"
          f"measured={case['measured_speedup']:<6} "
          f"eff={case['efficiency']}")


def markdown_table(cases: list[dict]) -> str:
  """The table of a bench.json."""
  header = ('model', 'dtype', 'batch', 'measure', 'pattern', 'buckets',
            'avg layers', 'layer ideal', 'FLOPs ideal', 'measured',
            'efficiency', 'vs best full depth')
  return report_markdown.table(header, [
      (c['model'], c.get('dtype', 'float32'), c['batch_size'],
       c['confidence'], c['pattern'], c.get('bucket_set', ''),
       c['avg_layers'], f"x{c['layer_ideal_speedup']}",
       f"x{c['flops_ideal_speedup']}", f"x{c['measured_speedup']}",
       c['efficiency'], f"x{c.get('speedup_vs_best_full_depth', '')}")
      for c in cases])


def tables_markdown(results: dict, source: str) -> str:
  """The page of a bench.json: where it ran, the cases, the agreement."""
  lines = [f'# Benchmark: {os.path.basename(source)}', '',
           f'Generated from `{source}` by `python -m calm_jax.bench`; '
           f'devices: {", ".join(results.get("devices", []))}. '
           f'{results.get("note", "")}; timed: {results.get("timed", "")}.',
           '', markdown_table(results['cases'])]
  if 'dtype_agreement' in results:
    lines += ['', 'bfloat16 vs float32 greedy tokens (demo model): ' +
              ', '.join(f"{task} {100 * r['token_agreement']:.1f}% of "
                        f"{r['tokens']} tokens"
                        for task, r in results['dtype_agreement'].items())]
  return '\n'.join(lines) + '\n'


def write_tables(path: str) -> str:
  """Writes the markdown page of a bench.json next to it; returns it."""
  page = tables_markdown(files.read_json(path, what='benchmark results'),
                         path)
  files.atomic_write_text(os.path.splitext(path)[0] + '.md', page)
  return page


def _check_choices(name: str, values: Sequence[str], valid) -> list[str]:
  values = [values] if isinstance(values, str) else list(values)
  for value in values:
    if value not in valid:
      raise arguments.InputError(f'unknown {name} {value!r}; valid: '
                                 f'{", ".join(valid)}')
  return values


@gin.configurable(module='calm_jax')
def bench(*, output: str = 'runs/bench/bench.json',
          table: Optional[str] = None, repeats: int = 5,
          batch_sizes: Sequence[int] = (1, 16),
          measures: Sequence[str] = MEASURES,
          patterns: Sequence[str] = ('exit@1', 'exit@2', 'exit@4', 'exit@8',
                                     'mixed', 'disabled'),
          models: Sequence[str] = ('paper_small', 'demo'),
          dtypes: Sequence[str] = ('float32',),
          compare_buckets: bool = True, agreement: bool = False,
          length: int = 64) -> Optional[dict]:
  """Runs every case and writes `output` (JSON) and its markdown page (.md);
  with `table` (a bench.json), writes and prints that page instead. `compare_buckets` compares bucket
  sets on the mixed pattern; `agreement` also measures bfloat16 vs float32
  greedy tokens of the demo model; `length` is the paper-size model's
  input and output length."""
  if table:
    print(write_tables(table))
    return None
  dtypes = _check_choices('dtype', dtypes, network.DTYPES)
  builders = {'paper_small': lambda: paper_small_model(max(batch_sizes),
                                                       length),
              'demo': lambda: demo_model(max(batch_sizes), 16)}
  _check_choices('model', models, builders)
  arguments.integer('repeats', repeats, 1)
  cases, results = [], {'mixed_pattern': {}}
  for name in models:
    model = builders[name]()
    if model is None:
      console.info(f'skipping {name}: no trained model in {DEMO_DIR} '
                   '(make demo)')
      continue
    results['mixed_pattern'][model.name] = {
        'mixed_distribution': model.exit_distribution,
        'source': model.distribution_source}
    for dtype in dtypes:
      cases += bench_model(with_dtype(model, dtype), list(batch_sizes),
                           list(measures), list(patterns), repeats,
                           lambda c: print(format_row(c), flush=True),
                           compare_buckets=compare_buckets)
  if agreement and os.path.exists(os.path.join(DEMO_DIR,
                                               model_files.MODEL_JSON)):
    results['dtype_agreement'] = dtype_agreement()
    console.info(f'bfloat16 vs float32 greedy tokens: '
                 f'{results["dtype_agreement"]}')
  out = {**results, 'cases': cases, 'devices': [str(d) for d in jax.devices()],
         'timed': 'the decode loop; encoder and cross K/V computed once outside',
         'note': 'ratios from one run on this machine; absolute times are noise'}
  files.atomic_write_json(output, out)
  write_tables(output)
  console.info(f'wrote {output} and its markdown page')
  return out


def run() -> None:
  bench()
