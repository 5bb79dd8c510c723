"""Python API for notebooks and services.

  model = calm_jax.load('runs/demo/model')
  results = model.generate(['translate English to French: The cat sees a dog.'],
                           threshold=0.9, confidence='softmax')
  results[0].text, results[0].exit_layers, results[0].confidences

Tokenizes with the SentencePiece model kept in the model dir (no TensorFlow).
"""
import dataclasses
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from calm_jax import arguments
from calm_jax.calibration import records
from calm_jax.data import examples
from calm_jax.data import input_files
from calm_jax.decoding import loops
from calm_jax.model import models
from calm_jax.parallel import partitioning
from calm_jax.model import model_files
from calm_jax.storage import checkpoints
from calm_jax.storage import files
from calm_jax.storage import provenance

FULL_DEPTH = 1.5  # any threshold above 1 disables exits
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
  """One decoded input, and the threshold that decoded it."""
  text: str
  exit_layers: list[int]    # 1-based decoder layer per output token
  # Confidence at each token's exit; None for a token that ran through the
  # top layer (no exit test is made there), as in the static decoder.
  confidences: list[Optional[float]]
  tokens: list[int]
  threshold: float          # above 1: exits disabled (full depth)
  threshold_source: str     # 'given', a record file, or 'full depth: ...'


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """The threshold a decode uses and where it came from."""
  value: float
  tau: Optional[float]
  source: str
  record: Optional[dict] = None  # the calibration record, if one was used


def _pad_to(length: int, multiple: int = 16) -> int:
  """Rounds input lengths up so that few shapes get compiled."""
  return max(multiple, -(-length // multiple) * multiple)


class CalmLM:
  """A trained CALM model dir, ready to generate with early exit."""

  def __init__(self, model_dir: str, step: Optional[int] = None,
               mesh: Optional[Mesh] = None, dtype: Optional[str] = None):
    """Loads the model dir; with a mesh of several devices, straight into
    its shards (the decode and calibrate jobs' batch decodes then run over
    it; `generate` wants the default, mesh None). `dtype` ('float32' or
    'bfloat16') replaces the activation dtype the model was trained with;
    parameters stay float32."""
    self.model_dir, self.mesh = model_dir, mesh
    self.config, self.vocab_path = model_files.read_model_config(model_dir)
    if dtype is not None:
      self.config = dataclasses.replace(self.config, dtype=dtype)
    self.model = models.CalmModel(self.config)
    sharded = mesh is not None and mesh.size > 1
    shardings = (partitioning.param_shardings(self.model.param_axes(), mesh)
                 if sharded else None)
    self.params, self.step = model_files.load_params(model_dir, self.config,
                                                     step, shardings)
    self.vocab = input_files.SentencePieceVocabulary(
        files.local_copy(self.vocab_path))
    self.feature_lengths = model_files.read_feature_lengths(model_dir)
    self.classifier = model_files.load_classifier(model_dir, self.config)
    if sharded and self.classifier is not None:
      self.classifier = partitioning.replicate(
          jax.device_get(self.classifier), mesh)

  @functools.cached_property
  def _digests(self) -> dict[str, Optional[str]]:
    return {'params': provenance.digest_tree(self.params),
            'vocabulary': provenance.digest_file(self.vocab_path),
            'classifier': (None if self.classifier is None else
                           provenance.digest_tree(self.classifier))}

  def model_fingerprint(self, confidence: str) -> dict:
    """What of the model dir determines a decode with this measure: the
    config (dtype included), step and content hash of the parameters, the
    vocabulary, and the exit classifier's hash when the measure uses it."""
    digests = self._digests
    fingerprint = {'config': dataclasses.asdict(self.config),
                   'step': self.step, 'params': digests['params'],
                   'vocabulary': digests['vocabulary']}
    if confidence == 'classifier':
      fingerprint['classifier'] = digests['classifier']
    return fingerprint

  def resolve_threshold(self, threshold: Optional[float], confidence: str,
                        tau: Optional[float] = None,
                        record_name: Optional[str] = None,
                        task: Optional[str] = None) -> ThresholdChoice:
    """The threshold to decode with: given, calibrated, or full depth.

    Without a threshold, the calibration record `record_name` (a whole
    name, or its readable part before the settings hash), else the newest
    record of the measure for `task` (task None: the only task with
    records) gives the base lambda and the tau it was calibrated with. A
    record is used only if its model fingerprint equals this model dir's;
    otherwise this raises a ProvenanceError saying what changed. A record
    that certified no threshold, or none at all, means full depth.
    """
    if threshold is not None:
      return ThresholdChoice(float(threshold), tau, 'given')
    if record_name:
      candidates = records.named(self.model_dir, record_name)
      for _, record in candidates:
        if record.get('confidence') != confidence:
          raise provenance.ProvenanceError(
              f'calibration record {record_name!r} is for '
              f'{record.get("confidence")!r}, not {confidence!r}')
    else:
      candidates = records.for_measure(self.model_dir, confidence, task)
    if not candidates:
      return ThresholdChoice(FULL_DEPTH, tau, 'full depth: no calibration '
                             f'record for {confidence!r}'
                             + (f' on {task!r}' if task else ''))
    path, record = self._matching_record(candidates, confidence)
    source = f'{path} ({record["message"]})'
    if tau is None:
      tau = record.get('tau')
    if record['threshold'] is None:
      return ThresholdChoice(FULL_DEPTH, tau, source + '; full depth',
                             record)
    return ThresholdChoice(float(record['threshold']), tau, source, record)

  def _matching_record(self, candidates: list[tuple[str, dict]],
                       confidence: str) -> tuple[str, dict]:
    """The newest record certified on this very model, else an error."""
    current = self.model_fingerprint(confidence)
    newest = sorted(candidates, key=lambda pr: pr[1].get('created', 0),
                    reverse=True)
    for path, record in newest:
      if record.get('fingerprint', {}).get('model') == current:
        return path, record
    path, record = newest[0]
    stored = record.get('fingerprint', {}).get('model')
    what = (provenance.describe_changes(stored, current) if stored else
            'the record carries no model fingerprint')
    raise provenance.ProvenanceError(
        f'calibration record {path} was certified on another model '
        f'({what}); re-calibrate: python -m calm_jax.calibrate '
        f"--gin_file=gin/runs/calibrate.gin --gin.CHECKPOINT_PATH="
        f"\"'{self.model_dir}'\" --gin.MIXTURE_OR_TASK_NAME="
        f"\"'{record.get('task')}'\" ..., or pass a threshold")

  @staticmethod
  def check_settings(choice: ThresholdChoice,
                     exit_config: loops.ExitConfig) -> None:
    """Refuses to decode a record's threshold with other decode settings
    (measure, exit layers, tau, propagation, sampling) than it was
    certified with: its guarantee would not apply."""
    if choice.record is None:
      return
    stored = choice.record.get('fingerprint', {}).get('decode')
    current = exit_config.fingerprint()
    if stored != current:
      raise provenance.ProvenanceError(
          f'the calibration record was certified with other decode settings '
          f'({provenance.describe_changes(stored or {}, current)}); decode '
          'with its settings, re-calibrate with these, or pass a threshold')

  def classifier_for(self, confidence: str):
    """The classifier's parameters when the measure needs them."""
    if confidence != 'classifier':
      return None
    if self.classifier is None:
      raise checkpoints.CheckpointError(
          f'{self.model_dir} has no exit classifier: train one with '
          'gin/runs/train_classifier.gin')
    return self.classifier

  def exit_config(self, confidence: str, **options) -> loops.ExitConfig:
    """This model's exit layers with a measure and `ExitConfig.create`'s
    options (min_exit, tau, propagation, sampling). A min_exit above the
    top layer is an InputError (it would silently decode at full depth)."""
    arguments.integer('min_exit', options.get('min_exit', 1), 1,
                      self.config.num_decoder_layers)
    return self.model.exit_config(confidence, **options)

  @functools.lru_cache(maxsize=16)
  def _decoder(self, exit_config: loops.ExitConfig, max_length: int):
    return jax.jit(lambda p, c, enc, t, rng: self.model.decode_early_exit(
        p, enc, max_length, exit_config=exit_config, threshold=t,
        classifier=c, rng=rng))

  def encode(self, texts: Sequence[str], max_input_length: int = 512,
             truncate: bool = True) -> np.ndarray:
    """Token ids [len(texts), padded length] with EOS. Inputs longer than
    `max_input_length` tokens are cut to it with a warning that counts them
    (or, with truncate=False, refused)."""
    ids = [self.vocab.encode(t) for t in texts]
    limit = max_input_length - 1  # room for EOS
    too_long = sum(len(seq) > limit for seq in ids)
    if too_long and not truncate:
      raise arguments.InputError(
          f'{too_long} of {len(ids)} inputs are longer than max_input_length'
          f'={max_input_length} tokens (truncate=False)')
    if too_long:
      _log.warning('%d of %d inputs were longer than max_input_length=%d '
                      'tokens and were truncated', too_long, len(ids),
                      max_input_length)
    ids = [seq[:limit] + [examples.EOS_ID] for seq in ids]
    out = np.zeros((len(ids), _pad_to(max(map(len, ids)))), np.int32)
    for row, seq in enumerate(ids):
      out[row, :len(seq)] = seq
    return out

  def generate(self, texts: Sequence[str], *, threshold: Optional[float] = None,
               confidence: str = 'softmax', task: Optional[str] = None,
               batch_size: int = 8, max_length: Optional[int] = None,
               max_input_length: int = 512, truncate: bool = True,
               tau: Optional[float] = None, min_exit: int = 1,
               propagation: str = 'hidden', temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0,
               seed: int = 0) -> list[Generation]:
    """Decodes each text with early exit; one `Generation` per input.

    Without a threshold, the calibration record of the measure for `task`
    sets it (see `resolve_threshold`). `max_length` defaults to the target
    length the record was certified with, else 32. At most `batch_size`
    rows are decoded at once, and a call with fewer texts pads only to the
    next power of two.
    """
    texts = arguments.texts(texts)
    arguments.decoding(
        num_layers=self.config.num_decoder_layers, threshold=threshold,
        batch_size=batch_size, min_exit=min_exit, tau=tau,
        temperature=temperature, top_k=top_k, top_p=top_p,
        max_length=max_length)
    arguments.integer('max_input_length', max_input_length, 2)
    choice = self.resolve_threshold(threshold, confidence, tau, task=task)
    cfg = self.exit_config(
        confidence, min_exit=min_exit, tau=choice.tau, propagation=propagation,
        sampling=loops.Sampling(float(temperature), top_k, float(top_p)))
    self.check_settings(choice, cfg)
    max_length = (max_length or records.certified_target_length(choice.record)
                  or self.feature_lengths['targets'])
    decode = self._decoder(cfg.for_threshold(choice.value), max_length)
    classifier = self.classifier_for(confidence)
    encoded = self.encode(texts, max_input_length, truncate)
    rows = _rows_per_call(len(texts), batch_size)
    results = []
    for start in range(0, len(texts), rows):
      chunk = encoded[start:start + rows]
      enc = np.zeros((rows, encoded.shape[1]), np.int32)
      enc[:len(chunk)] = chunk
      out = jax.device_get(decode(self.params, classifier, jnp.asarray(enc),
                                  choice.value,
                                  jax.random.PRNGKey(seed + start)))
      results += [self._result(out, row, choice) for row in range(len(chunk))]
    return results

  def _result(self, out: loops.DecodeOutput, row: int,
              choice: ThresholdChoice) -> Generation:
    tokens = examples.until_eos(out.tokens[row], keep_eos=True)
    length = len(tokens)
    return Generation(
        text=self.vocab.decode(examples.until_eos(tokens)),
        exit_layers=[int(l) for l in out.exit_layers[row, :length]],
        confidences=token_confidences(out.confidences[row, :length]),
        tokens=tokens, threshold=choice.value,
        threshold_source=choice.source)


def token_confidences(values) -> list[Optional[float]]:
  """Per-token confidences for JSON: 4 decimals, None where no exit test
  decided the token (it ran through the top layer)."""
  return [None if np.isnan(c) else round(float(c), 4) for c in values]


def _rows_per_call(num_texts: int, batch_size: int) -> int:
  """Rows of each decode call: the batch size, or for fewer texts the next
  power of two (few compiled shapes, and one text never pads to 4,096)."""
  return min(batch_size, 1 << max(num_texts - 1, 0).bit_length())
