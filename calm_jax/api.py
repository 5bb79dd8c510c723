"""Python API for notebooks and services.

  model = calm_jax.load('runs/demo/model')
  results = model.generate(['translate English to French: The cat sees a dog.'],
                           threshold=0.9, confidence='softmax')
  results[0].text, results[0].exit_layers, results[0].confidences

Tokenizes with the SentencePiece model kept in the model dir (no TensorFlow).
"""

import dataclasses
import logging
from typing import Optional
from typing import Sequence

from jax.sharding import Mesh
import numpy as np

from calm_jax import arguments
from calm_jax import errors
from calm_jax.calibration import records
from calm_jax.data import examples
from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
  """One decoded input, and the threshold that decoded it."""

  text: str
  exit_layers: list[int]  # 1-based decoder layer per output token
  # Confidence at each token's exit; None for a token that ran through the
  # top layer (no exit test is made there), as in the static decoder.
  confidences: list[Optional[float]]
  tokens: list[int]
  threshold: float  # above 1: exits disabled (full depth)
  threshold_source: str  # 'given', a record file, or 'full depth: ...'
  # The exact mode's counts for this input: verify passes, drafted and
  # accepted tokens, layers run by drafts and by verify passes, near ties.
  speculative: Optional[dict] = None


def _pad_to(length: int, multiple: int = 16) -> int:
  """Rounds input lengths up so that few shapes get compiled."""
  return max(multiple, -(-length // multiple) * multiple)


class CalmLM:
  """A trained CALM model dir, ready to generate with early exit: a
  tokenizer and the threshold policy over an `inference` Decoder."""

  def __init__(
    self,
    model_dir: str,
    step: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    dtype: Optional[str] = None,
  ):
    """Loads the model dir (see `inference.loaded.load`). `dtype`
    ('float32' or 'bfloat16') replaces the activation dtype the model was
    trained with; parameters stay float32."""
    self.loaded = loaded_lib.load(model_dir, step=step, mesh=mesh, dtype=dtype)
    self.decoder = decoder_lib.Decoder(self.loaded)

  @classmethod
  def wrap(cls, loaded: loaded_lib.LoadedModel) -> 'CalmLM':
    """A CalmLM over a model already loaded (no second copy of its
    parameters)."""
    lm = cls.__new__(cls)
    lm.loaded, lm.decoder = loaded, decoder_lib.Decoder(loaded)
    return lm

  @property
  def config(self):
    return self.loaded.config

  def resolve_threshold(
    self,
    threshold: Optional[float],
    confidence: str,
    tau: Optional[float] = None,
    record_name: Optional[str] = None,
    task: Optional[str] = None,
  ) -> records.ThresholdChoice:
    """The threshold to decode with: given, calibrated on this very model
    (`records.choose_threshold`), or full depth."""
    return records.choose_threshold(
      self.loaded.model_dir,
      self.loaded.fingerprint,
      threshold,
      confidence,
      tau,
      record_name,
      task,
    )

  def exit_config(self, confidence: str, **options) -> loops.ExitConfig:
    return self.loaded.exit_config(confidence, **options)

  def encode(
    self,
    texts: Sequence[str],
    max_input_length: int = 512,
    truncate: bool = True,
  ) -> np.ndarray:
    """Token ids [len(texts), padded length] as the model takes its inputs
    (T5: the text and EOS; an instruct model: the chat prompt). Inputs
    longer than `max_input_length` tokens are cut to it with a warning that
    counts them (or, with truncate=False, refused)."""
    encoded = [self.loaded.vocab.input_ids(t, max_input_length) for t in texts]
    ids = [seq for seq, _ in encoded]
    too_long = sum(cut for _, cut in encoded)
    if too_long and not truncate:
      raise errors.SettingError(
        f'{too_long} of {len(ids)} inputs are longer than max_input_length'
        f'={max_input_length} tokens (truncate=False)'
      )
    if too_long:
      _log.warning(
        '%d of %d inputs were longer than max_input_length=%d '
        'tokens and were truncated',
        too_long,
        len(ids),
        max_input_length,
      )
    out = np.zeros((len(ids), _pad_to(max(map(len, ids)))), np.int32)
    for row, seq in enumerate(ids):
      out[row, : len(seq)] = seq
    return out

  def generate(
    self,
    texts: Sequence[str],
    *,
    threshold: Optional[float] = None,
    confidence: str = 'softmax',
    task: Optional[str] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    max_input_length: int = 512,
    truncate: bool = True,
    tau: Optional[float] = None,
    min_exit: int = 1,
    propagation: str = 'hidden',
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    mode: str = 'early_exit',
    gamma: int = 4,
    draft_layer: Optional[int] = None,
    draft_min_confidence: float = 0.0,
  ) -> list[Generation]:
    """Decodes each text with early exit; one `Generation` per input (an
    empty list gives an empty list).

    Without a threshold, the calibration record of the measure for `task`
    sets it (see `resolve_threshold`). `mode='exact'` returns exactly the
    full model's output (its greedy tokens, or its sampling distribution):
    the early exits at the threshold (or every token at `draft_layer`)
    draft up to `gamma` tokens that one full-depth pass verifies (a row
    stops drafting early once its draft's confidence is below
    `draft_min_confidence`); each Generation's `speculative` counts what
    that cost. Without a threshold or a record, the exact mode drafts at
    `EXACT_DRAFT_THRESHOLD`. `max_length` defaults to the target length the
    record was certified with, else the target length the model was
    trained with (model.json). At most `batch_size` rows are
    decoded at once, and a call with fewer texts pads only to the next
    power of two.
    """
    texts = arguments.texts(texts)
    arguments.check(
      threshold=threshold,
      confidence=confidence,
      batch_size=batch_size,
      max_length=max_length,
      max_input_length=max_input_length,
      tau=tau,
      min_exit=min_exit,
      propagation=propagation,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      mode=mode,
      gamma=gamma,
      draft_layer=draft_layer,
      draft_min_confidence=draft_min_confidence,
      num_layers=self.config.num_decoder_layers,
    )
    choice = self.resolve_threshold(threshold, confidence, tau, task=task)
    exits = self.exit_config(
      confidence,
      min_exit=min_exit,
      tau=choice.tau,
      propagation=propagation,
      sampling=loops.Sampling(float(temperature), top_k, float(top_p)),
    )
    if mode == 'exact':
      choice = records.exact_mode_draft(choice)
      decode_mode = modes.Speculative(
        speculative.DraftConfig(
          exits,
          gamma=gamma,
          forced_layer=draft_layer,
          min_confidence=float(draft_min_confidence),
        ),
        choice.value,
      )
    else:
      records.check_decode_settings(choice, exits.fingerprint())
      decode_mode = modes.EarlyExit(exits, choice.value)
    self.loaded.classifier_for(confidence)
    if not texts:
      return []
    max_length = (
      max_length
      or records.certified_target_length(choice.record)
      or self.loaded.feature_lengths['targets']
    )
    encoded = self.encode(texts, max_input_length, truncate)
    rows = _rows_per_call(len(texts), batch_size)
    results = []
    for start in range(0, len(texts), rows):
      chunk = encoded[start : start + rows]
      inputs = np.zeros((rows, encoded.shape[1]), np.int32)
      inputs[: len(chunk)] = chunk
      out = self.decoder.decode(
        decode_mode, inputs, max_length=max_length, seed=seed + start
      )
      results += [self._result(out, row, choice) for row in range(len(chunk))]
    return results

  def _result(
    self, out: loops.DecodeOutput, row: int, choice: records.ThresholdChoice
  ) -> Generation:
    eos = self.loaded.vocab.eos_id
    tokens = examples.until_eos(out.tokens[row], eos, keep_eos=True)
    length = len(tokens)
    return Generation(
      text=self.loaded.vocab.decode(examples.until_eos(tokens, eos)),
      exit_layers=[int(l) for l in out.exit_layers[row, :length]],
      confidences=decoder_lib.token_confidences(out.confidences[row, :length]),
      tokens=tokens,
      threshold=choice.value,
      threshold_source=choice.source,
      speculative=(
        None
        if out.extras is None
        else {k: int(v[row]) for k, v in out.extras.items()}
      ),
    )


def _rows_per_call(num_texts: int, batch_size: int) -> int:
  """Rows of each decode call: the batch size, or for fewer texts the next
  power of two (few compiled shapes, and one text never pads to 4,096)."""
  return min(batch_size, 1 << max(num_texts - 1, 0).bit_length())
