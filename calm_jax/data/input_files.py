"""The user's own inputs to decode: JSONL, TSV or one input per line.

  jsonl  one JSON object a line; the input under `input_field` ('inputs'),
         an optional target under `target_field` ('targets')
  tsv    input<TAB>target (the target column is optional; a line with
         more columns is refused with its number)
  text   one input per line (blank lines are skipped)

The format follows the file's extension (.jsonl / .json, .tsv, anything
else: text) unless given. Inputs are tokenized with the model's own
SentencePiece vocabulary (no TensorFlow); an input longer than the input
length is cut to it, EOS kept, with one warning that counts them.
"""

import dataclasses
import hashlib
import json
import logging
from typing import Optional

from calm_jax import arguments
from calm_jax import errors
from calm_jax.data import examples as examples_lib
from calm_jax.data import vocabularies

FORMATS = ('jsonl', 'tsv', 'text')
_log = logging.getLogger(__name__)


class InputFileError(errors.UserError, ValueError):
  """An input file that cannot be read as its format says (names it)."""


@dataclasses.dataclass(frozen=True)
class InputFile:
  """Where the inputs are and how to read them."""

  path: str
  format: Optional[str] = None  # None: from the extension
  input_field: str = 'inputs'  # jsonl only
  target_field: str = 'targets'  # jsonl only; absent in a line: none

  def resolved_format(self) -> str:
    if self.format is not None:
      if self.format not in FORMATS:
        raise InputFileError(
          f'unknown input format {self.format!r}; valid: {", ".join(FORMATS)}'
        )
      return self.format
    lower = self.path.lower()
    if lower.endswith(('.jsonl', '.json')):
      return 'jsonl'
    return 'tsv' if lower.endswith('.tsv') else 'text'


def _jsonl_row(
  spec: InputFile, number: int, line: str
) -> tuple[str, Optional[str]]:
  where = f'{spec.path} line {number}'
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise InputFileError(f'{where} is not valid JSON ({e.msg})') from e
  if not isinstance(row, dict) or not isinstance(
    row.get(spec.input_field), str
  ):
    raise InputFileError(
      f'{where} has no string field {spec.input_field!r} (set input_field)'
    )
  target = row.get(spec.target_field)
  target = target if isinstance(target, str) else None
  return _text(where, row[spec.input_field]), _text(where, target)


def _text(where: str, text: Optional[str]) -> Optional[str]:
  """`text`, or an InputFileError naming the line if it is not valid
  Unicode (a JSON escape of a lone surrogate, such as \\ud800)."""
  try:
    return None if text is None else arguments.unicode_text(where, text)
  except errors.SettingError as e:
    raise InputFileError(str(e)) from e


def _tsv_row(
  spec: InputFile, number: int, line: str
) -> tuple[str, Optional[str]]:
  columns = line.split('\t')
  if len(columns) > 2:
    raise InputFileError(
      f'{spec.path} line {number} has {len(columns)} tab-separated columns; '
      'a TSV line is input<TAB>target (for tabs inside a text, use JSONL)'
    )
  return columns[0], columns[1] if len(columns) > 1 else None


def read_texts(spec: InputFile) -> list[tuple[str, Optional[str]]]:
  """(input, target or None) per example, in file order."""
  fmt = spec.resolved_format()
  try:
    with open(spec.path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputFileError(
      f'cannot read input file {spec.path}: {errors.first_line(e)}'
    ) from e
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if fmt == 'jsonl':
      rows.append(_jsonl_row(spec, number, line))
    elif fmt == 'tsv':
      rows.append(_tsv_row(spec, number, line))
    else:
      rows.append((line, None))
  if not rows:
    raise InputFileError(f'input file {spec.path} holds no inputs')
  return rows


def _file_digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def file_examples(
  spec: InputFile,
  vocabulary: vocabularies.Vocabulary,
  lengths: dict,
  *,
  num_examples: Optional[int] = None,
  metrics=None,
) -> examples_lib.ExampleSet:
  """The file's examples, as the model takes its inputs
  (`vocabulary.input_ids`), cut to `lengths['inputs']`."""
  rows = read_texts(spec)[:num_examples]
  examples, too_long = [], 0
  for text, target in rows:
    ids, cut = vocabulary.input_ids(text, lengths['inputs'])
    too_long += cut
    target_ids = (
      vocabulary.encode(target)[: lengths['targets'] - 1] + [vocabulary.eos_id]
      if target is not None
      else []
    )
    examples.append(
      examples_lib.Example(
        inputs=text,
        input_ids=tuple(ids),
        targets=target,
        target_ids=tuple(target_ids),
      )
    )
  if too_long:
    _log.warning(
      '%d of %d inputs in %s are longer than %d tokens and were '
      'cut to that length',
      too_long,
      len(rows),
      spec.path,
      lengths['inputs'],
    )
  has_targets = all(e.targets is not None for e in examples)
  return examples_lib.ExampleSet(
    name=spec.path,
    fingerprint={
      'file': spec.path,
      'sha256': _file_digest(spec.path),
      'format': spec.resolved_format(),
      'fields': [spec.input_field, spec.target_field],
      'num_examples': num_examples,
      'feature_lengths': lengths,
    },
    lengths=dict(lengths),
    examples=tuple(examples),
    vocabulary=vocabulary,
    metrics=metrics if has_targets else None,
    eos_id=vocabulary.eos_id,
  )
