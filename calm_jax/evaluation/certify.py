"""Learn then Test over the engine's decodes: the one calibration driver.

A `Calibration` pools the calibration examples of one or more tasks, decodes
them at full depth and with early exit at the thresholds the fixed-sequence
test reaches (through the engine's provenance-keyed cache, so another delta
or epsilon reuses them), and turns per-example consistency losses into the
certified threshold and its record. The calibrate job, the demo, the
reproduction report and the validity protocol all use it. No gin, no
TensorFlow.
"""

import dataclasses
from typing import Optional
from typing import Sequence

import numpy as np

from calm_jax.calibration import ltt
from calm_jax.calibration import records
from calm_jax.data import examples as examples_lib
from calm_jax.decoding import loops
from calm_jax.evaluation import engine
from calm_jax.inference import modes
from calm_jax.storage import provenance


@dataclasses.dataclass(eq=False)
class Calibration:
  """LTT for one exit configuration over pooled calibration examples.

  Each decode is made once per Calibration (kept in memory by its mode,
  besides the evaluator's disk cache, which may be off): the full-depth
  reference is decoded once, not once per threshold tested.
  """

  evaluator: engine.Evaluator
  example_sets: tuple[examples_lib.ExampleSet, ...]
  exit_config: loops.ExitConfig
  _decoded: dict = dataclasses.field(default_factory=dict, repr=False)

  def _decode(
    self, examples: examples_lib.ExampleSet, mode: modes.Mode
  ) -> engine.Decoded:
    key = (
      examples.name,
      provenance.short_hash(examples.fingerprint),
      provenance.short_hash(mode.fingerprint()),
    )
    if key not in self._decoded:
      self._decoded[key] = self.evaluator.decode(examples, mode)
    return self._decoded[key]

  def full(self, examples: examples_lib.ExampleSet) -> engine.Decoded:
    return self._decode(examples, modes.FullDepth())

  def early(
    self, examples: examples_lib.ExampleSet, threshold: float
  ) -> engine.Decoded:
    return self._decode(examples, modes.EarlyExit(self.exit_config, threshold))

  def losses(
    self, consistency: str, threshold: float
  ) -> tuple[np.ndarray, float]:
    """Per-example losses over all tasks [n], and the average layers."""
    losses, layers = [], []
    for examples in self.example_sets:
      early = self.early(examples, threshold)
      losses.append(
        self.evaluator.losses(examples, consistency, early, self.full(examples))
      )
      layers += [l for row in early.exit_layers for l in row]
    return np.concatenate(losses), float(np.mean(layers))

  def loss_table(
    self, consistency: str, grid: Sequence[float]
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Losses [thresholds, n], and per example the summed exit layers and
    the token count [thresholds, n] (for layers per token on any subset)."""
    losses, layer_sums, tokens = [], [], []
    for threshold in grid:
      losses.append(self.losses(consistency, threshold)[0])
      rows = [
        row
        for examples in self.example_sets
        for row in self.early(examples, threshold).exit_layers
      ]
      layer_sums.append([sum(r) for r in rows])
      tokens.append([len(r) for r in rows])
    return (
      np.array(losses),
      np.array(layer_sums, np.float64),
      np.array(tokens, np.float64),
    )

  def certify(
    self,
    consistency: str,
    delta: float,
    epsilon: float,
    grid_step: float = 0.05,
  ) -> ltt.CalibrationResult:
    """The fastest threshold of the descending grid that LTT certifies."""
    return ltt.fixed_sequence_test(
      ltt.descending_grid(1.0, 0.0, grid_step),
      lambda t: self.losses(consistency, t),
      delta=delta,
      epsilon=epsilon,
    )

  def speedups(self, grid: Sequence[float]) -> dict:
    """Full-depth over early-exit decode seconds per threshold, as measured
    while decoding (sequential, not alternating: a rough figure)."""
    seconds = lambda decode: sum(decode(e).seconds for e in self.example_sets)
    full = seconds(self.full)
    return {
      t: full / max(seconds(lambda e, t=t: self.early(e, t)), 1e-9)
      for t in grid
    }

  def record(
    self,
    result: ltt.CalibrationResult,
    *,
    task: str,
    consistency: str,
    delta: float,
    epsilon: float,
    grid_step: float,
    extra: Optional[dict] = None,
  ) -> records.CalibrationRecord:
    """The record of a certificate, with the fingerprint it depends on."""
    model = self.evaluator.model
    fingerprint = records.fingerprint(
      model=model.fingerprint(self.exit_config.confidence),
      data={e.name: e.fingerprint for e in self.example_sets},
      decode=self.exit_config.fingerprint(),
      consistency=consistency,
      delta=delta,
      epsilon=epsilon,
      grid_step=grid_step,
    )
    return records.new_record(
      result,
      task=task,
      record_fingerprint=fingerprint,
      tau=self.exit_config.tau,
      checkpoint_step=model.step,
      dtype=model.config.dtype,
      extra=extra,
    )
