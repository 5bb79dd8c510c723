"""The evaluation engine: decode, cache, score and time, for every job.

Demo, report, validity, decode and calibrate are thin drivers of this one
implementation (bench shares its timing):

- `Evaluator.decode(examples, mode)` decodes an `ExampleSet` (a SeqIO split
  or the user's file) in a `Mode`: `FullDepth` (the static decoder, with the
  consistency oracle's exit layers on request), `EarlyExit` (CALM at a
  threshold) or `ForcedExits` (every token stops at given layers: truncated
  models and the propagation ablation). With a cache directory, the result
  is stored under the fingerprint of everything that determines it (the
  model's parameters, classifier, config and dtype, vocabulary, the data,
  the mode) and found again only under an identical fingerprint; a corrupt
  entry is reported and decoded again.
- `Evaluator.score` and `losses`: the task's metrics, headline and the
  per-example consistency losses that calibration tests.
- `Evaluator.speedup`: full depth against early exit on the same inputs,
  compiled first, alternating on every input, medians over passes.
- `Evaluator.layer_accuracy`: teacher-forced next-token accuracy of every
  exit layer.

Every compile is announced (what, which shape, how long), so the first
batch's seconds never pass for decode speed. With a mesh of several devices
each 'data' shard runs its own loop; with several processes each decodes
its share of the examples and all get the outputs back in input order.
No gin, no TensorFlow.
"""
import dataclasses
import functools
import os
import statistics
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from calm_jax import api
from calm_jax import console
from calm_jax.calibration import ltt
from calm_jax.data import examples as examples_lib
from calm_jax.decoding import loops
from calm_jax.evaluation import timing
from calm_jax.model import models
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import files
from calm_jax.storage import provenance

CACHE_FORMAT = 2  # bump when the stored outputs change shape


# --- what to decode with ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FullDepth:
  """The static decoder: every token runs every layer, greedily. With
  `oracle`, each token's exit layer is the consistency oracle's (the first
  layer whose argmax equals the full model's); the tokens stay the full
  model's."""
  oracle: bool = False

  @property
  def measure(self) -> str:
    return 'full'

  @property
  def label(self) -> str:
    return 'oracle' if self.oracle else 'full'

  def fingerprint(self) -> dict:
    out = {'full_depth': True, 'greedy': True}
    return {**out, 'oracle': True} if self.oracle else out


@dataclasses.dataclass(frozen=True)
class EarlyExit:
  """CALM at a threshold (above 1: exits disabled, but the loop's cost)."""
  exit_config: loops.ExitConfig
  threshold: float

  @property
  def measure(self) -> str:
    return self.exit_config.confidence

  @property
  def label(self) -> str:
    return f'{self.measure}_{self.threshold:g}'

  def fingerprint(self) -> dict:
    return {'decode': self.exit_config.fingerprint(),
            'threshold': self.threshold}


@dataclasses.dataclass(frozen=True)
class ForcedExits:
  """Every token of example i stops at `exit_layers[i][t]` (a row shorter
  than the output: its last layer onwards), or every token at `layer`."""
  exit_config: loops.ExitConfig  # propagation and exit layers
  layer: Optional[int] = None
  exit_layers: Optional[tuple[tuple[int, ...], ...]] = None

  @property
  def measure(self) -> str:
    return 'forced'

  @property
  def label(self) -> str:
    return f'forced_{self.layer or "rows"}_{self.exit_config.propagation}'

  def fingerprint(self) -> dict:
    return {'forced': self.layer if self.layer is not None else
            provenance.short_hash(self.exit_layers),
            'propagation': self.exit_config.propagation,
            'exit_layers': list(self.exit_config.exit_layers)}

  def rows(self, indices: Sequence[int], shape: tuple[int, int]
           ) -> np.ndarray:
    """[b, t] forced layer per token of the examples at `indices`
    (positions past a given row's end, and padding rows: layer 1)."""
    if self.layer is not None:
      return np.full(shape, self.layer, np.int32)
    out = np.ones(shape, np.int32)
    for row, index in enumerate(indices):
      layers = list(self.exit_layers[index])[:shape[1]]
      out[row, :len(layers)] = layers
    return np.maximum(out, 1)


Mode = Union[FullDepth, EarlyExit, ForcedExits]


# --- what comes out ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decoded:
  """One decode of an ExampleSet, in input order."""
  outputs: tuple[dict, ...]  # prediction, token_ids, exit_layers, confidences
  seconds: float             # decode time, compilation excluded

  @property
  def predictions(self) -> list[str]:
    return [o['prediction'] for o in self.outputs]

  @property
  def exit_layers(self) -> list[list[int]]:
    return [o['exit_layers'] for o in self.outputs]

  @property
  def tokens(self) -> int:
    return sum(len(o['exit_layers']) for o in self.outputs)

  @property
  def avg_layers(self) -> float:
    layers = [l for row in self.exit_layers for l in row]
    return float(np.mean(layers)) if layers else float('nan')

  def exit_shares(self, num_layers: int) -> list[float]:
    """The fraction of output tokens that exit at each layer 1..num_layers."""
    counts = np.asarray(exit_histogram(self.exit_layers, num_layers))
    return (counts / max(counts.sum(), 1)).round(4).tolist()


def exit_histogram(exit_layers: Sequence[Sequence[int]], num_layers: int
                   ) -> list[int]:
  """Tokens exiting at each layer 1..num_layers, over rows of exit layers."""
  flat = [l for row in exit_layers for l in row]
  return np.bincount(flat, minlength=num_layers + 1)[1:].tolist()


@dataclasses.dataclass(frozen=True)
class Score:
  metric: str       # the headline
  value: float
  scores: dict      # every metric of the task


@dataclasses.dataclass(frozen=True)
class Speed:
  """Full-depth seconds over early-exit seconds of the same inputs."""
  ratio: float           # ratio of the medians over passes
  low: float             # lowest per-pass ratio
  high: float            # highest per-pass ratio
  median_seconds: dict   # {'full': s, 'early': s}


def example_records(examples: examples_lib.ExampleSet, decoded: Decoded
                    ) -> list[dict]:
  """One JSON object per example, in input order: inputs, targets (when
  known), prediction, token pieces, exit layers, confidences, and every
  reference for tasks that keep several."""
  out = []
  for example, output in zip(examples.examples, decoded.outputs):
    record = {'inputs': example.inputs}
    if example.targets is not None:
      record['targets'] = example.targets
    record.update(
        prediction=output['prediction'],
        tokens=examples.vocabulary.pieces(output['token_ids']),
        exit_layers=output['exit_layers'],
        confidences=output['confidences'])
    if isinstance(example.references, list):
      record['references'] = example.references
    out.append(record)
  return out


def _output(examples: examples_lib.ExampleSet, out, row: int) -> dict:
  ids = examples_lib.until_eos(out.tokens[row], keep_eos=True)
  return {'prediction': examples.text(ids), 'token_ids': ids,
          'exit_layers': [int(l) for l in out.exit_layers[row, :len(ids)]],
          'confidences': api.token_confidences(
              out.confidences[row, :len(ids)])}


# --- the compiled decoders --------------------------------------------------

# Per 'data' shard: the decode's rows, and the summed evaluation count.
_SHARDED_OUTPUT = loops.DecodeOutput(
    tokens=P('data'), exit_layers=P('data'), confidences=P('data'),
    layer_evals=P())


def _decode_callable(model: models.CalmModel, mode: Mode, max_length: int
                     ) -> Callable:
  """(params, classifier, encoder tokens, threshold, rng, forced) -> output."""
  if isinstance(mode, FullDepth):
    return lambda p, c, enc, t, rng, forced: model.decode_static(
        p, enc, max_length, oracle=mode.oracle)
  if isinstance(mode, ForcedExits):
    return lambda p, c, enc, t, rng, forced: model.decode_early_exit(
        p, enc, max_length, exit_config=mode.exit_config, threshold=0.0,
        forced_exit_layers=forced)
  config = mode.exit_config.for_threshold(mode.threshold)
  return lambda p, c, enc, t, rng, forced: model.decode_early_exit(
      p, enc, max_length, exit_config=config, threshold=t, rng=rng,
      classifier=c)


def _program_key(mode: Mode):
  """What shapes the compiled program (a threshold is only an argument)."""
  if isinstance(mode, EarlyExit):
    return ('early', mode.exit_config.for_threshold(mode.threshold))
  if isinstance(mode, ForcedExits):
    return ('forced', mode.exit_config)
  return ('full', mode.oracle)


def _program_label(mode: Mode) -> str:
  if isinstance(mode, EarlyExit):
    return f'{mode.measure} early-exit'
  return 'forced-exit' if isinstance(mode, ForcedExits) else mode.label


@functools.lru_cache(maxsize=64)
def decode_fn(model: models.CalmModel, program: tuple, max_length: int,
              mesh: Optional[Mesh] = None) -> Callable:
  """One jitted decoder per (model, program, length, mesh).

  On a mesh of several devices every 'data' shard runs its own loop over
  its rows (params replicated over 'data', split over 'model' by the
  rules); greedy results equal the one-device decode, while sampling folds
  the shard index into the rng.
  """
  mode = {'early': lambda c: EarlyExit(c, 0.0),
          'forced': lambda c: ForcedExits(c, layer=1),
          'full': lambda oracle: FullDepth(oracle)}[program[0]](program[1])
  decode = _decode_callable(model, mode, max_length)
  if mesh is None or mesh.size == 1:
    return jax.jit(decode)

  def decode_shard(params, classifier, encoder_tokens, threshold, rng,
                   forced):
    rng = jax.random.fold_in(rng, jax.lax.axis_index('data'))
    out = decode(params, classifier, encoder_tokens, threshold, rng, forced)
    return out.replace(layer_evals=jax.lax.psum(out.layer_evals, 'data'))

  return partitioning.per_data_shard(
      decode_shard, mesh, in_specs=(P(), P(), P('data'), P(), P(),
                                    P('data')),
      out_specs=_SHARDED_OUTPUT)


class _Compiled:
  """Ahead-of-time compiles, announced with their shape and duration."""

  def __init__(self):
    self._programs = {}

  def __call__(self, fn: Callable, args: tuple, label: str) -> Callable:
    shapes = tuple(jax.tree_util.tree_map(
        lambda x: (getattr(x, 'shape', ()), str(getattr(x, 'dtype', ''))),
        args, is_leaf=lambda x: x is None))
    key = (fn, str(shapes))
    if key not in self._programs:
      with console.compiling(label):
        self._programs[key] = fn.lower(*args).compile()
    return self._programs[key]


# --- the engine -------------------------------------------------------------

class Evaluator:
  """Decodes, caches, scores and times with one loaded model dir."""

  def __init__(self, lm: api.CalmLM, *, batch_size: int = 32,
               cache_dir: Optional[str] = None, progress: bool = True):
    """`batch_size` is global (split over processes and 'data' shards);
    `cache_dir` None decodes without a cache."""
    self.lm, self.batch_size = lm, batch_size
    self.cache_dir, self.progress = cache_dir, progress
    self._compiled = _Compiled()
    mesh = lm.mesh
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    if self.mesh is not None:
      partitioning.check_batch_fits(batch_size, self.mesh)

  # -- decoding --
  def fingerprint(self, examples: examples_lib.ExampleSet, mode: Mode,
                  seed: int = 0) -> dict:
    """Everything that determines a decode's outputs."""
    sampled = (isinstance(mode, EarlyExit)
               and not mode.exit_config.sampling.greedy)
    return {'cache_format': CACHE_FORMAT,
            'model': self.lm.model_fingerprint(mode.measure),
            'data': examples.fingerprint, 'mode': mode.fingerprint(),
            'seed': seed if sampled else None}

  def decode(self, examples: examples_lib.ExampleSet, mode: Mode, *,
             seed: int = 0) -> Decoded:
    """The outputs of every example in input order (from the cache when
    an entry with this very fingerprint exists)."""
    fingerprint = self.fingerprint(examples, mode, seed)
    path = self._cache_path(examples, mode, fingerprint)
    if path is not None:
      # Every process must take the same branch: a decode is collective.
      entry = multihost.from_primary(lambda: _read_entry(path, fingerprint))
      if multihost.agree(entry is not None):
        return Decoded(tuple(entry['outputs']), entry['seconds'])
    decoded = self._decode(examples, mode, seed)
    if path is not None and multihost.is_primary():
      files.atomic_write_json(path, {'fingerprint': fingerprint,
                                     'outputs': list(decoded.outputs),
                                     'seconds': decoded.seconds})
    return decoded

  def _cache_path(self, examples, mode, fingerprint) -> Optional[str]:
    if self.cache_dir is None:
      return None
    name = os.path.basename(examples.name.rstrip('/')).replace('.', '_')
    split = examples.fingerprint.get('split')
    label = '_'.join(str(x) for x in (name, split, mode.label) if x)
    return files.join(self.cache_dir,
                      f'{label}_{provenance.short_hash(fingerprint)}.json')

  def _decode(self, examples, mode: Mode, seed: int) -> Decoded:
    lm, max_length = self.lm, examples.lengths['targets']
    fn = decode_fn(lm.model, _program_key(mode), max_length, self.mesh)
    classifier = (lm.classifier_for(mode.measure)
                  if isinstance(mode, EarlyExit) else None)
    threshold = self._put(np.float32(
        mode.threshold if isinstance(mode, EarlyExit) else 0.0))

    def args(index: int, batch: examples_lib.Batch) -> tuple:
      rows = batch.encoder_tokens.shape[0]
      forced = (mode.rows(batch.indices, (rows, max_length))
                if isinstance(mode, ForcedExits) else
                np.zeros((rows, 1), np.int32))
      return (lm.params, classifier, self._place(batch.encoder_tokens),
              threshold, self._put(jax.random.PRNGKey(seed + index)),
              self._place(forced))

    batches = self._process_batches(examples)
    # Every batch has the first one's shapes: one program, compiled first.
    compiled = self._compiled(
        fn, args(0, batches[0]), f'{_program_label(mode)} decoder (batch '
        f'{self.batch_size}, length {max_length})')
    outputs, seconds = [], 0.0
    for index, batch in enumerate(console.progress(
        batches, desc=examples.name, unit='batch',
        disable=not self.progress)):
      start = time.perf_counter()
      out = jax.tree_util.tree_map(self._fetch,
                                   compiled(*args(index, batch)))
      seconds += time.perf_counter() - start
      outputs += [_output(examples, out, row)
                  for row in range(batch.num_real)]
    return Decoded(tuple(multihost.gather_in_input_order(outputs)), seconds)

  def _process_batches(self, examples) -> list[examples_lib.Batch]:
    """This process's batches: every process holds batch_size / processes
    rows of each global batch, examples k * n + i for process i of n, and
    all get the same number of batches (each is one collective program)."""
    local = multihost.local_batch_size(self.batch_size)
    mine = process_share(len(examples), jax.process_index(),
                         jax.process_count())
    batches = list(examples_lib.batches(examples, local, mine))
    total = multihost.process_max(len(batches))
    empty = dataclasses.replace(
        batches[0], encoder_tokens=np.zeros_like(batches[0].encoder_tokens),
        target_tokens=np.zeros_like(batches[0].target_tokens), num_real=0,
        indices=())
    return batches + [empty] * (total - len(batches))

  def _place(self, x):
    return (partitioning.global_batch(x, self.mesh) if self.mesh is not None
            else jnp.asarray(x))

  def _put(self, x):
    return partitioning.replicate(x, self.mesh) if self.mesh else x

  def _fetch(self, x):
    return multihost.host_rows(x) if self.mesh else np.asarray(x)

  # -- scoring --
  @staticmethod
  def score(examples: examples_lib.ExampleSet,
            predictions: Sequence[str]) -> Score:
    """The task's metrics of predictions of these examples."""
    metrics = examples.require_metrics()
    scores = metrics.scores(examples.references, predictions)
    name = metrics.headline(scores)
    return Score(name, scores[name], scores)

  @staticmethod
  def losses(examples: examples_lib.ExampleSet, consistency: str,
             early: Decoded, full: Decoded) -> np.ndarray:
    """Per-example consistency losses [n] of an early-exit decode."""
    return ltt.consistency_losses(
        consistency, examples.require_metrics().per_example(),
        early.predictions, full.predictions, references=examples.references)

  def layer_accuracy(self, examples: examples_lib.ExampleSet) -> np.ndarray:
    """Teacher-forced next-token accuracy of every decoder layer [L]."""
    model = self.lm.model
    logits_fn = jax.jit(model.all_layer_logits)
    correct = np.zeros(model.config.num_decoder_layers)
    count = 0
    for batch in examples_lib.batches(examples, self.batch_size):
      targets = batch.target_tokens
      inputs = np.concatenate([np.zeros_like(targets[:, :1]),
                               targets[:, :-1]], 1)  # shifted right
      args = (self.lm.params, batch.encoder_tokens, inputs)
      compiled = self._compiled(logits_fn, args,
                                f'all-layer logits (batch {len(targets)})')
      predicted = np.asarray(jnp.argmax(compiled(*args), -1))  # [L, b, t]
      mask = targets > 0
      correct += ((predicted == targets[None]) & mask[None]).sum(axis=(1, 2))
      count += mask.sum()
    return correct / max(count, 1)

  # -- timing --
  def speedup(self, examples: examples_lib.ExampleSet, early: EarlyExit, *,
              batch_size: int, repeats: int,
              num_examples: Optional[int] = None,
              alternate: str = 'input') -> Speed:
    """Full depth vs early exit on the same inputs (encoder included),
    both compiled first. `alternate='input'` takes turns on every input
    batch, each waited for (as the paper times batch 1); 'pass' takes turns
    on whole passes over the inputs, dispatched back to back and waited for
    once (as a batch job runs)."""
    lm, max_length = self.lm, examples.lengths['targets']
    indices = list(range(len(examples)))[:num_examples]
    inputs = [jnp.asarray(b.encoder_tokens) for b in
              examples_lib.batches(examples, batch_size, indices)]
    key, threshold = jax.random.PRNGKey(0), np.float32(early.threshold)
    classifier = lm.classifier_for(early.measure)
    forced = jnp.zeros((batch_size, 1), jnp.int32)
    runs = {}
    for name, mode in (('full', FullDepth()), ('early', early)):
      fn = decode_fn(lm.model, _program_key(mode), max_length)
      args = (lm.params, classifier, inputs[0], threshold, key, forced)
      compiled = self._compiled(fn, args, f'{_program_label(mode)} decoder '
                                f'(batch {batch_size}, length {max_length})')
      runs[name] = (lambda e, c=compiled: c(lm.params, classifier, e,
                                            threshold, key, forced))
    if alternate == 'pass':
      runs = {name: (lambda _, run=run: [run(e) for e in inputs])
              for name, run in runs.items()}
    elif alternate != 'input':
      raise ValueError(f'alternate must be input or pass, got {alternate!r}')
    times = timing.alternating_seconds(
        runs, inputs if alternate == 'input' else [None], repeats)
    per_pass = [f / e for f, e in zip(times['full'], times['early'])]
    medians = {k: statistics.median(v) for k, v in times.items()}
    return Speed(medians['full'] / medians['early'], min(per_pass),
                 max(per_pass), medians)


def process_share(num_examples: int, index: int, count: int) -> list[int]:
  """The examples process `index` of `count` decodes: k * count + index,
  so that `multihost.interleave` of every share is the input order."""
  return list(range(index, num_examples, count))


def _read_entry(path: str, fingerprint: dict) -> Optional[dict]:
  """The cache entry at `path` if it is whole and has this fingerprint."""
  if not files.exists(path):
    return None
  try:
    entry = files.read_json(path, what='decode cache entry',
                            recovery='ignored; decoding again')
  except files.FileError as e:
    console.warn(str(e))
    return None
  return entry if entry.get('fingerprint') == fingerprint else None
