"""The evaluation engine: decode, cache, score and time, for every job.

Demo, report, validity, decode and calibrate are thin drivers of this one
implementation. It decodes through an `inference.decoder.Decoder` (which
owns the compiled programs; bench times through it too):

- `Evaluator.decode(examples, mode)` decodes an `ExampleSet` (a SeqIO split
  or the user's file) in an `inference.modes` mode: `FullDepth` (the static
  decoder, with the consistency oracle's exit layers on request),
  `EarlyExit` (CALM at a threshold) or `ForcedExits` (every token stops at
  given layers: truncated models and the propagation ablation). With a
  cache directory, the result
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

Every program is compiled before the batches it decodes are timed, so the
first batch's seconds never pass for decode speed. With a mesh of several devices
each 'data' shard runs its own loop; with several processes each decodes
its share of the examples and all get the outputs back in input order.
No gin, no TensorFlow.
"""

import dataclasses
import os
import statistics
import time
from typing import Optional
from typing import Sequence

import jax
import numpy as np

from calm_jax import console
from calm_jax.calibration import ltt
from calm_jax.data import examples as examples_lib
from calm_jax.evaluation import timing
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import files
from calm_jax.storage import provenance

CACHE_FORMAT = 2  # bump when the stored outputs change shape


# --- what comes out ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decoded:
  """One decode of an ExampleSet, in input order."""

  outputs: tuple[dict, ...]  # prediction, token_ids, exit_layers, confidences
  seconds: float  # decode time, compilation excluded

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

  def speculative_summary(self) -> Optional[dict]:
    """The exact mode's costs over these outputs (None for other modes):
    tokens emitted per verify pass, the share of drafts accepted, and the
    layers run per emitted token, drafts included."""
    counts = [o['speculative'] for o in self.outputs if 'speculative' in o]
    if not counts:
      return None
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    tokens = max(self.tokens, 1)
    return {
      'tokens_per_pass': tokens / max(total['passes'], 1),
      'acceptance_rate': total['accepted'] / max(total['drafted'], 1),
      'layers_per_token': (total['draft_layers'] + total['verify_layers'])
      / tokens,
      'near_ties': total['near_ties'],
      **total,
    }

  def exit_shares(self, num_layers: int) -> list[float]:
    """The fraction of output tokens that exit at each layer 1..num_layers."""
    counts = np.asarray(exit_histogram(self.exit_layers, num_layers))
    return (counts / max(counts.sum(), 1)).round(4).tolist()


def exit_histogram(
  exit_layers: Sequence[Sequence[int]], num_layers: int
) -> list[int]:
  """Tokens exiting at each layer 1..num_layers, over rows of exit layers."""
  flat = [l for row in exit_layers for l in row]
  return np.bincount(flat, minlength=num_layers + 1)[1:].tolist()


@dataclasses.dataclass(frozen=True)
class Score:
  metric: str  # the headline
  value: float
  scores: dict  # every metric of the task


@dataclasses.dataclass(frozen=True)
class Speed:
  """Full-depth seconds over early-exit seconds of the same inputs."""

  ratio: float  # ratio of the medians over passes
  low: float  # lowest per-pass ratio
  high: float  # highest per-pass ratio
  median_seconds: dict  # {'full': s, 'early': s}


def example_records(
  examples: examples_lib.ExampleSet, decoded: Decoded
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
      confidences=output['confidences'],
    )
    if isinstance(example.references, list):
      record['references'] = example.references
    out.append(record)
  return out


def _output(examples: examples_lib.ExampleSet, out, row: int) -> dict:
  ids = examples_lib.until_eos(out.tokens[row], examples.eos_id, keep_eos=True)
  record = {
    'prediction': examples.text(ids),
    'token_ids': ids,
    'exit_layers': [int(l) for l in out.exit_layers[row, : len(ids)]],
    'confidences': decoder_lib.token_confidences(
      out.confidences[row, : len(ids)]
    ),
  }
  if out.extras is not None:  # the exact mode's counts of this row
    record['speculative'] = {k: int(v[row]) for k, v in out.extras.items()}
  return record


# --- the engine -------------------------------------------------------------


class Evaluator:
  """Decodes, caches, scores and times with one model's `Decoder`."""

  def __init__(
    self,
    decoder: decoder_lib.Decoder,
    *,
    batch_size: int = 32,
    cache_dir: Optional[str] = None,
    progress: bool = True,
  ):
    """`batch_size` is global (split over processes and 'data' shards);
    `cache_dir` None decodes without a cache."""
    self.decoder, self.batch_size = decoder, batch_size
    self.cache_dir, self.progress = cache_dir, progress
    if decoder.mesh is not None:
      partitioning.check_batch_fits(batch_size, decoder.mesh)

  @classmethod
  def load(
    cls, model_dir: str, *, mesh=None, dtype: Optional[str] = None, **options
  ) -> 'Evaluator':
    """An evaluator of a model dir (see `inference.loaded.load`); options
    as in the constructor."""
    model = loaded_lib.load(model_dir, mesh=mesh, dtype=dtype)
    return cls(decoder_lib.Decoder(model), **options)

  @property
  def model(self) -> loaded_lib.LoadedModel:
    """The model dir decoded with."""
    return self.decoder.model

  # -- decoding --
  def fingerprint(
    self, examples: examples_lib.ExampleSet, mode: modes.Mode, seed: int = 0
  ) -> dict:
    """Everything that determines a decode's outputs."""
    return {
      'cache_format': CACHE_FORMAT,
      'model': self.model.fingerprint(mode.measure),
      'data': examples.fingerprint,
      'mode': mode.fingerprint(),
      'seed': seed if mode.sampled else None,
    }

  def decode(
    self, examples: examples_lib.ExampleSet, mode: modes.Mode, *, seed: int = 0
  ) -> Decoded:
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
      files.atomic_write_json(
        path,
        {
          'fingerprint': fingerprint,
          'outputs': list(decoded.outputs),
          'seconds': decoded.seconds,
        },
      )
    return decoded

  def _cache_path(self, examples, mode, fingerprint) -> Optional[str]:
    if self.cache_dir is None:
      return None
    name = os.path.basename(examples.name.rstrip('/')).replace('.', '_')
    split = examples.fingerprint.get('split')
    label = '_'.join(str(x) for x in (name, split, mode.label) if x)
    return files.join(
      self.cache_dir, f'{label}_{provenance.short_hash(fingerprint)}.json'
    )

  def _decode(self, examples, mode: modes.Mode, seed: int) -> Decoded:
    max_length = examples.lengths['targets']
    batches = self._process_batches(examples)
    # Every batch has the first one's shapes: one program, compiled first
    # (so that no batch's seconds hold a compile).
    self.decoder.prepare(mode, batches[0].encoder_tokens, max_length=max_length)
    decode = lambda index, batch: self.decoder.decode(
      mode,
      batch.encoder_tokens,
      max_length=max_length,
      seed=seed + index,
      indices=batch.indices,
    )
    outputs, seconds = [], 0.0
    for index, batch in enumerate(
      console.progress(
        batches, desc=examples.name, unit='batch', disable=not self.progress
      )
    ):
      start = time.perf_counter()
      out = decode(index, batch)
      seconds += time.perf_counter() - start
      outputs += [_output(examples, out, row) for row in range(batch.num_real)]
    return Decoded(tuple(multihost.gather_in_input_order(outputs)), seconds)

  def _process_batches(self, examples) -> list[examples_lib.Batch]:
    """This process's batches: every process holds batch_size / processes
    rows of each global batch, examples k * n + i for process i of n, and
    all get the same number of batches (each is one collective program)."""
    local = multihost.local_batch_size(self.batch_size)
    mine = process_share(
      len(examples), jax.process_index(), jax.process_count()
    )
    batches = list(examples_lib.batches(examples, local, mine))
    total = multihost.process_max(len(batches))
    empty = dataclasses.replace(
      batches[0],
      encoder_tokens=np.zeros_like(batches[0].encoder_tokens),
      target_tokens=np.zeros_like(batches[0].target_tokens),
      num_real=0,
      indices=(),
    )
    return batches + [empty] * (total - len(batches))

  # -- scoring --
  @staticmethod
  def score(
    examples: examples_lib.ExampleSet, predictions: Sequence[str]
  ) -> Score:
    """The task's metrics of predictions of these examples."""
    metrics = examples.require_metrics()
    scores = metrics.scores(examples.references, predictions)
    name = metrics.headline(scores)
    return Score(name, scores[name], scores)

  @staticmethod
  def losses(
    examples: examples_lib.ExampleSet,
    consistency: str,
    early: Decoded,
    full: Decoded,
  ) -> np.ndarray:
    """Per-example consistency losses [n] of an early-exit decode."""
    return ltt.consistency_losses(
      consistency,
      examples.require_metrics().per_example(),
      early.predictions,
      full.predictions,
      references=examples.references,
    )

  def layer_accuracy(self, examples: examples_lib.ExampleSet) -> np.ndarray:
    """Teacher-forced next-token accuracy of every decoder layer [L]."""
    correct = np.zeros(self.model.config.num_decoder_layers)
    count = 0
    for batch in examples_lib.batches(examples, self.batch_size):
      targets = batch.target_tokens
      logits = self.decoder.layer_logits(batch.encoder_tokens, targets)
      predicted = np.asarray(jax.numpy.argmax(logits, -1))  # [L, b, t]
      mask = targets > 0
      correct += ((predicted == targets[None]) & mask[None]).sum(axis=(1, 2))
      count += mask.sum()
    return correct / max(count, 1)

  # -- timing --
  def speedup(
    self,
    examples: examples_lib.ExampleSet,
    early: modes.Mode,
    *,
    batch_size: int,
    repeats: int,
    num_examples: Optional[int] = None,
    alternate: str = 'input',
    encoder: bool = True,
  ) -> Speed:
    """Full depth vs another mode (early exit, the exact mode) on the same
    inputs (encoder included unless `encoder=False`), both compiled first
    (see `speedups`)."""
    return self.speedups(
      examples,
      {'early': early},
      batch_size=batch_size,
      repeats=repeats,
      num_examples=num_examples,
      alternate=alternate,
      encoder=encoder,
    )['early']

  def speedups(
    self,
    examples: examples_lib.ExampleSet,
    named: dict[str, modes.Mode],
    *,
    batch_size: int,
    repeats: int,
    num_examples: Optional[int] = None,
    alternate: str = 'input',
    encoder: bool = True,
  ) -> dict[str, Speed]:
    """Full depth against each named mode on the same inputs, every
    program compiled first and all of them timed in turns.
    `alternate='input'` takes turns on every input batch, each waited for
    (as the paper times batch 1); 'pass' takes turns on whole passes over
    the inputs, dispatched back to back and waited for once (as a batch
    job runs). `encoder=False` times the decode loops alone: the inputs
    are encoded (or prefilled) once, before timing (one device)."""
    if alternate not in ('input', 'pass'):
      raise ValueError(f'alternate must be input or pass, got {alternate!r}')
    max_length = examples.lengths['targets']
    indices = list(range(len(examples)))[:num_examples]
    inputs = [
      b.encoder_tokens if encoder else self.decoder.encode(b.encoder_tokens)
      for b in examples_lib.batches(examples, batch_size, indices)
    ]
    inputs = jax.tree_util.tree_map(jax.numpy.asarray, inputs)
    runs = {
      name: self.decoder.runner(
        mode, inputs[0], max_length=max_length, encoded=not encoder
      )
      for name, mode in (('full', modes.FullDepth()), *named.items())
    }
    if alternate == 'pass':
      runs = {
        name: (lambda _, run=run: [run(e) for e in inputs])
        for name, run in runs.items()
      }
    times = timing.alternating_seconds(
      runs, inputs if alternate == 'input' else [None], repeats
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    out = {}
    for name in named:
      per_pass = [f / e for f, e in zip(times['full'], times[name])]
      out[name] = Speed(
        medians['full'] / medians[name],
        min(per_pass),
        max(per_pass),
        {'full': medians['full'], name: medians[name]},
      )
    return out


def process_share(num_examples: int, index: int, count: int) -> list[int]:
  """The examples process `index` of `count` decodes: k * count + index,
  so that `multihost.interleave` of every share is the input order."""
  return list(range(index, num_examples, count))


def _read_entry(path: str, fingerprint: dict) -> Optional[dict]:
  """The cache entry at `path` if it is whole and has this fingerprint."""
  if not files.exists(path):
    return None
  try:
    entry = files.read_json(
      path, what='decode cache entry', recovery='ignored; decoding again'
    )
  except files.FileError as e:
    console.warn(str(e))
    return None
  return (
    entry if provenance.same(entry.get('fingerprint'), fingerprint) else None
  )
