"""Examples to decode, from any source, in one shape (no TensorFlow).

An `ExampleSet` is what the evaluation engine decodes: tokenized examples
with their text, the lengths to pad and decode to, the vocabulary that turns
ids back into text, the task metrics that score the outputs (None for an
unscored input file), and a fingerprint of the data for provenance. It
comes from a SeqIO task split (`data.pipeline.task_examples`) or from the
user's own file (`data.input_files.file_examples`).
"""

import dataclasses
from typing import Any
from typing import Iterator
from typing import Optional
from typing import Protocol
from typing import Sequence

import numpy as np

from calm_jax.data import task_info

EOS_ID = 1  # T5's: pad 0, EOS 1


class Vocabulary(Protocol):
  def decode(self, ids: Sequence[int]) -> str:
    """Ids (no EOS) -> text."""

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """The piece of each id."""


def until_eos(
  ids: Sequence[int], eos_id: int = EOS_ID, keep_eos: bool = False
) -> list[int]:
  """The ids before the first EOS (with it if `keep_eos`)."""
  ids = [int(i) for i in ids]
  if eos_id not in ids:
    return ids
  return ids[: ids.index(eos_id) + int(keep_eos)]


@dataclasses.dataclass(frozen=True)
class Example:
  inputs: str
  input_ids: tuple[int, ...]  # EOS included
  targets: Optional[str] = None
  target_ids: tuple[int, ...] = ()
  # What the metric scores against: the target text, or every reference
  # answer for tasks that keep them (SQuAD).
  references: Any = None


@dataclasses.dataclass(frozen=True)
class ExampleSet:
  """Examples and what is needed to decode and score them."""

  name: str  # the task, or the input file
  fingerprint: dict  # identifies the data (cache provenance)
  lengths: dict  # {'inputs': s, 'targets': t}
  examples: tuple[Example, ...]
  vocabulary: Vocabulary
  metrics: Optional[task_info.TaskMetrics] = None  # None: nothing to score
  eos_id: int = EOS_ID  # the id that ends an output

  def __len__(self) -> int:
    return len(self.examples)

  @property
  def references(self) -> list:
    return [
      e.references if e.references is not None else e.targets
      for e in self.examples
    ]

  def text(self, ids: Sequence[int]) -> str:
    """Decoded ids (up to EOS) as text."""
    return self.vocabulary.decode(until_eos(ids, self.eos_id))

  def require_metrics(self) -> task_info.TaskMetrics:
    if self.metrics is None:
      raise task_info.DataError(
        f'{self.name} has no task metric to score '
        'with (give a task, and targets)'
      )
    return self.metrics


def pad_rows(
  rows: Sequence[Sequence[int]], length: int, batch_size: int
) -> np.ndarray:
  """Right-pads token rows with 0 to [batch_size, length]."""
  out = np.zeros((batch_size, length), np.int32)
  for i, row in enumerate(rows):
    row = list(row)[:length]
    out[i, : len(row)] = row
  return out


@dataclasses.dataclass(frozen=True)
class Batch:
  """A fixed-shape batch: the last one is padded with empty rows."""

  encoder_tokens: np.ndarray  # [b, s]
  target_tokens: np.ndarray  # [b, t]
  num_real: int  # rows that hold examples
  indices: tuple[int, ...]  # positions of those examples in the set


def batches(
  examples: ExampleSet, batch_size: int, indices: Optional[Sequence[int]] = None
) -> Iterator[Batch]:
  """Batches of the examples at `indices` (default: all, in order); an
  empty selection still gives one (empty) batch, since with several
  processes every one of them must run each collective decode."""
  indices = list(range(len(examples))) if indices is None else list(indices)
  lengths = examples.lengths
  for start in range(0, max(len(indices), 1), batch_size):
    chunk = indices[start : start + batch_size]
    rows = [examples.examples[i] for i in chunk]
    yield Batch(
      encoder_tokens=pad_rows(
        [r.input_ids for r in rows], lengths['inputs'], batch_size
      ),
      target_tokens=pad_rows(
        [r.target_ids for r in rows], lengths['targets'], batch_size
      ),
      num_real=len(chunk),
      indices=tuple(chunk),
    )
