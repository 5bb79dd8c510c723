"""Python API for notebooks and services.

  model = calm_jax.load('runs/demo/model')
  results = model.generate(['translate English to French: the cat sees a dog .'],
                           threshold=0.9, confidence='softmax')
  results[0].text, results[0].exit_layers, results[0].confidences

Tokenizes with the SentencePiece model kept in the model dir (no TensorFlow).
"""
import dataclasses
import functools
import glob
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from jax.sharding import Mesh

from calm_jax import checkpoints
from calm_jax import decoding
from calm_jax import models
from calm_jax import partitioning

EOS_ID = 1
FULL_DEPTH = 1.5  # any threshold above 1 disables exits
CALIBRATION_SUBDIR = 'calibration'


@dataclasses.dataclass
class Generation:
  """One decoded input."""
  text: str
  exit_layers: list[int]    # 1-based decoder layer per output token
  confidences: list[float]  # confidence at each token's exit
  tokens: list[int]


def newest_calibration(model_dir: str, confidence: str) -> Optional[dict]:
  """The newest calibration record for `confidence` in the model dir."""
  records = []
  for path in glob.glob(os.path.join(model_dir, CALIBRATION_SUBDIR, '*.json')):
    with open(path) as f:
      record = json.load(f)
    if record.get('confidence') == confidence:
      records.append((record.get('created', 0), path, record))
  return max(records)[2] if records else None


def named_calibration(model_dir: str, name: str) -> dict:
  """The calibration record `name` of a model dir (a ValueError naming the
  available ones if there is no such record)."""
  root = os.path.join(model_dir, CALIBRATION_SUBDIR)
  path = os.path.join(root, name + '.json')
  if not os.path.isfile(path):
    names = sorted(os.path.basename(p)[:-len('.json')]
                   for p in glob.glob(os.path.join(root, '*.json')))
    raise ValueError(f'no calibration record {name!r} in {root}; there are: '
                     f'{", ".join(names) or "none"}')
  with open(path) as f:
    return json.load(f)


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
    self.config, vocab_path = checkpoints.read_model_config(model_dir)
    if dtype is not None:
      self.config = dataclasses.replace(self.config, dtype=dtype)
    self.model = models.CalmModel(self.config)
    sharded = mesh is not None and mesh.size > 1
    shardings = (partitioning.param_shardings(self.model.param_axes(), mesh)
                 if sharded else None)
    self.params, self.step = checkpoints.load_params(model_dir, self.config,
                                                     step, shardings)
    self.vocab = spm.SentencePieceProcessor(model_file=vocab_path)
    self.classifier = checkpoints.load_classifier(model_dir, self.config)
    if sharded and self.classifier is not None:
      self.classifier = partitioning.replicate(
          jax.device_get(self.classifier), mesh)

  def resolve_threshold(self, threshold: Optional[float], confidence: str,
                        tau: Optional[float] = None,
                        record_name: Optional[str] = None
                        ) -> tuple[float, Optional[float], str]:
    """(threshold, tau, where they came from): given, calibrated, or full.

    Without a threshold, the calibration record `record_name` (default: the
    newest one for the measure) gives both (its base lambda and the tau it
    was calibrated with); a record that certified no threshold, or none at
    all, means full depth.
    """
    if threshold is not None:
      return float(threshold), tau, 'given'
    if record_name:
      record = named_calibration(self.model_dir, record_name)
      if record.get('confidence') != confidence:
        raise ValueError(f'calibration record {record_name!r} is for '
                         f'{record.get("confidence")!r}, not {confidence!r}')
    else:
      record = newest_calibration(self.model_dir, confidence)
    if record is None:
      return FULL_DEPTH, tau, 'no calibration record: full depth'
    source = f'calibration record {record["name"]}: {record["message"]}'
    if record['threshold'] is None:
      return FULL_DEPTH, tau, source + '; full depth'
    return float(record['threshold']), record.get('tau'), source

  def classifier_for(self, confidence: str):
    """The classifier's parameters when the measure needs them."""
    if confidence != 'classifier':
      return None
    if self.classifier is None:
      raise checkpoints.CheckpointError(
          f'{self.model_dir} has no exit classifier: train one with '
          'gin/runs/train_classifier.gin')
    return self.classifier

  def exit_config(self, confidence: str, **options) -> decoding.ExitConfig:
    """This model's exit layers with a measure and `ExitConfig.create`'s
    options (min_exit, tau, propagation, sampling)."""
    return decoding.ExitConfig.create(
        self.config.num_decoder_layers, confidence=confidence,
        first_exit=self.config.first_exit,
        exit_interval=self.config.exit_interval, **options)

  @functools.lru_cache(maxsize=16)
  def _decoder(self, exit_config: decoding.ExitConfig, max_length: int):
    return jax.jit(lambda p, c, enc, t, rng: self.model.decode_early_exit(
        p, enc, max_length, exit_config=exit_config, threshold=t,
        classifier=c, rng=rng))

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    ids = [self.vocab.encode(t) + [EOS_ID] for t in texts]
    out = np.zeros((len(ids), _pad_to(max(map(len, ids)))), np.int32)
    for row, seq in enumerate(ids):
      out[row, :len(seq)] = seq
    return out

  def generate(self, texts: Sequence[str], *, threshold: Optional[float] = None,
               confidence: str = 'softmax', batch_size: int = 8,
               max_length: int = 32, tau: Optional[float] = None,
               min_exit: int = 1, sampling=decoding.Sampling(),
               seed: int = 0) -> list[Generation]:
    """Decodes each text with early exit; one `Generation` per input."""
    value, tau, _ = self.resolve_threshold(threshold, confidence, tau)
    cfg = self.exit_config(confidence, min_exit=min_exit, tau=tau,
                           sampling=sampling)
    decode = self._decoder(cfg.for_threshold(value), max_length)
    classifier = self.classifier_for(confidence)
    results = []
    for start in range(0, len(texts), batch_size):
      chunk = list(texts[start:start + batch_size])
      enc = self.encode(chunk + [''] * (batch_size - len(chunk)))
      out = jax.device_get(decode(self.params, classifier, jnp.asarray(enc),
                                  value, jax.random.PRNGKey(seed + start)))
      results += [self._result(out, row) for row in range(len(chunk))]
    return results

  def _result(self, out: decoding.DecodeOutput, row: int) -> Generation:
    tokens = [int(t) for t in out.tokens[row]]
    length = tokens.index(EOS_ID) + 1 if EOS_ID in tokens else len(tokens)
    text_ids = [t for t in tokens[:length] if t != EOS_ID]
    return Generation(
        text=self.vocab.decode(text_ids),
        exit_layers=[int(l) for l in out.exit_layers[row, :length]],
        confidences=[round(float(c), 4) for c in out.confidences[row,
                                                                 :length]],
        tokens=tokens[:length])

