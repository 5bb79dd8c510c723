"""What a decode runs: the decode modes, each able to build its own program.

A mode is a small frozen value. It says what it is (`measure`, `label`,
`fingerprint`: what its outputs depend on) and builds the program that
decodes with it (`build`). `Decoder` compiles and caches programs by
`program_key` (what shapes the compiled code: a threshold is only an
argument), so engine, API and bench never switch on a mode's type.

Every program has one signature,

  program(params, classifier, context, threshold, rng, forced)
      -> loops.DecodeOutput

with `context` the model's encoded inputs (`model.encode_context`),
`threshold` a traced scalar and `forced` [b, t] forced exit layers (or a
[b, 1] placeholder for modes that force nothing).
"""

import dataclasses
from typing import Any
from typing import Callable
from typing import Hashable
from typing import Optional
from typing import Protocol
from typing import Sequence

import numpy as np

from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.storage import provenance

Program = Callable[..., loops.DecodeOutput]


class Mode(Protocol):
  """The interface every decode mode offers (see the module docstring)."""

  @property
  def measure(self) -> str:
    """The confidence measure it uses ('full' or 'forced' if none)."""

  @property
  def label(self) -> str:
    """A short name for file names and progress lines."""

  @property
  def uses_classifier(self) -> bool:
    """Whether the program reads the exit classifier's parameters."""

  @property
  def sampled(self) -> bool:
    """Whether outputs depend on the random seed."""

  @property
  def threshold(self) -> float:
    """The value passed as the program's traced threshold."""

  def fingerprint(self) -> dict:
    """Everything of the mode that determines its outputs."""

  def program_key(self) -> Hashable:
    """What shapes the compiled program (not the threshold)."""

  def describe(self) -> str:
    """What is compiled, for the compile notice."""

  def build(self, model: Any, max_length: int, eos_id: int) -> Program:
    """The decode program of this mode for `model` (a `CalmModel`)."""

  def forced_layers(
    self, indices: Sequence[int], shape: tuple[int, int]
  ) -> np.ndarray:
    """[b, t] forced exit layers of the examples at `indices`."""


def _no_forcing(indices: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
  del indices
  return np.zeros((shape[0], 1), np.int32)


@dataclasses.dataclass(frozen=True)
class FullDepth:
  """The static decoder: every token runs every layer, greedily. With
  `oracle`, each token's exit layer is the consistency oracle's (the first
  layer whose argmax equals the full model's); the tokens stay the full
  model's."""

  oracle: bool = False

  uses_classifier = False
  sampled = False
  threshold = 0.0

  @property
  def measure(self) -> str:
    """'full'; 'oracle' when it reads every layer's exit."""
    return 'oracle' if self.oracle else 'full'

  @property
  def label(self) -> str:
    return self.measure

  def fingerprint(self) -> dict:
    out = {'full_depth': True, 'greedy': True}
    return {**out, 'oracle': True} if self.oracle else out

  def program_key(self) -> Hashable:
    return ('full', self.oracle)

  def describe(self) -> str:
    return f'{self.label} decoder'

  def build(self, model, max_length: int, eos_id: int) -> Program:
    def program(params, classifier, context, threshold, rng, forced):
      del classifier, threshold, rng, forced
      return model.decode_static(
        params,
        None,
        max_length,
        eos_id=eos_id,
        oracle=self.oracle,
        context=context,
      )

    return program

  forced_layers = staticmethod(_no_forcing)


@dataclasses.dataclass(frozen=True)
class EarlyExit:
  """CALM at a threshold (above 1: exits disabled, at the loop's cost)."""

  exit_config: loops.ExitConfig
  threshold: float

  uses_classifier = property(lambda self: self.measure == 'classifier')

  @property
  def measure(self) -> str:
    return self.exit_config.confidence

  @property
  def label(self) -> str:
    return f'{self.measure}_{self.threshold:g}'

  @property
  def sampled(self) -> bool:
    return not self.exit_config.sampling.greedy

  def fingerprint(self) -> dict:
    return {
      'decode': self.exit_config.fingerprint(),
      'threshold': self.threshold,
    }

  def program_key(self) -> Hashable:
    return ('early', self.exit_config.for_threshold(self.threshold))

  def describe(self) -> str:
    return f'{self.measure} early-exit decoder'

  def build(self, model, max_length: int, eos_id: int) -> Program:
    config = self.exit_config.for_threshold(self.threshold)

    def program(params, classifier, context, threshold, rng, forced):
      del forced
      return model.decode_early_exit(
        params,
        None,
        max_length,
        exit_config=config,
        threshold=threshold,
        eos_id=eos_id,
        classifier=classifier,
        rng=rng,
        context=context,
      )

    return program

  forced_layers = staticmethod(_no_forcing)


@dataclasses.dataclass(frozen=True)
class ForcedExits:
  """Every token of example i stops at `exit_layers[i][t]` (a row shorter
  than the output: its last layer onwards), or every token at `layer`.
  Confidences are still computed, so their cost is the real one (the
  benchmark's fixed exit patterns, truncated models, the propagation
  ablation)."""

  exit_config: loops.ExitConfig  # propagation, exit layers and measure
  layer: Optional[int] = None
  exit_layers: Optional[tuple[tuple[int, ...], ...]] = None

  measure = 'forced'
  sampled = False
  threshold = 0.0

  @property
  def uses_classifier(self) -> bool:
    return self.exit_config.confidence == 'classifier'

  @property
  def label(self) -> str:
    return f'forced_{self.layer or "rows"}_{self.exit_config.propagation}'

  def fingerprint(self) -> dict:
    return {
      'forced': self.layer
      if self.layer is not None
      else provenance.short_hash(self.exit_layers),
      'propagation': self.exit_config.propagation,
      'exit_layers': list(self.exit_config.exit_layers),
    }

  def program_key(self) -> Hashable:
    return ('forced', self.exit_config)

  def describe(self) -> str:
    return 'forced-exit decoder'

  def build(self, model, max_length: int, eos_id: int) -> Program:
    def program(params, classifier, context, threshold, rng, forced):
      del threshold
      return model.decode_early_exit(
        params,
        None,
        max_length,
        exit_config=self.exit_config,
        threshold=0.0,
        eos_id=eos_id,
        classifier=classifier,
        rng=rng,
        forced_exit_layers=forced,
        context=context,
      )

    return program

  def forced_layers(
    self, indices: Sequence[int], shape: tuple[int, int]
  ) -> np.ndarray:
    """[b, t] forced layer per token of the examples at `indices`
    (positions past a given row's end, and padding rows: layer 1)."""
    if self.layer is not None:
      return np.full(shape, self.layer, np.int32)
    out = np.ones(shape, np.int32)
    for row, index in enumerate(indices):
      layers = list(self.exit_layers[index])[: shape[1]]
      out[row, : len(layers)] = layers
    return np.maximum(out, 1)


@dataclasses.dataclass(frozen=True)
class Speculative:
  """The exact mode: the full model's output (greedy tokens, or its
  sampling distribution), drafted by its own early exits and verified by
  the full model (`decoding.speculative`)."""

  draft: speculative.DraftConfig
  threshold: float  # the draft's confidence threshold

  measure = 'exact'

  @property
  def exit_config(self) -> loops.ExitConfig:
    """The draft's early-exit settings."""
    return self.draft.exits

  @property
  def uses_classifier(self) -> bool:
    return self.draft.exits.confidence == 'classifier'

  @property
  def sampled(self) -> bool:
    return not self.draft.exits.sampling.greedy

  @property
  def label(self) -> str:
    return f'exact_{self.draft.exits.confidence}_{self.threshold:g}'

  def fingerprint(self) -> dict:
    # The greedy output is the full model's whatever the draft: the draft's
    # settings are still kept, since they decide the costs recorded.
    return {'exact': self.draft.fingerprint(), 'threshold': self.threshold}

  def program_key(self) -> Hashable:
    return ('exact', self.draft)

  def describe(self) -> str:
    return f'exact-mode decoder ({self.draft.exits.confidence} draft)'

  def build(self, model, max_length: int, eos_id: int) -> Program:
    def program(params, classifier, context, threshold, rng, forced):
      del forced
      out = model.decode_speculative(
        params,
        None,
        max_length,
        draft=self.draft,
        threshold=threshold,
        eos_id=eos_id,
        classifier=classifier,
        rng=rng,
        context=context,
      )
      return speculative.as_decode_output(out, model.config.num_decoder_layers)

    return program

  forced_layers = staticmethod(_no_forcing)
