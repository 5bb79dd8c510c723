"""Decoding the user's own files: JSONL, TSV and text, in input order."""

import json

import pytest

from calm_jax.data import input_files

import entry_points  # tests/entry_points.py

_run = entry_points.run_module


class _Characters:
  """A vocabulary of one id per character (ids 3..), for exact lengths;
  inputs as T5 takes them (EOS 1 last)."""

  eos_id = 1

  def encode(self, text):
    return [3 + ord(c) % 500 for c in text]

  def input_ids(self, text, limit):
    ids = self.encode(text)
    return ids[: limit - 1] + [self.eos_id], len(ids) > limit - 1

  def decode(self, ids):
    return ''.join(chr(i - 3) for i in ids)

  def pieces(self, ids):
    return [chr(i - 3) for i in ids]


def test_formats_read_inputs_and_targets_in_order(tmp_path):
  jsonl = tmp_path / 'in.jsonl'
  jsonl.write_text('{"q": "first", "a": "1"}\n\n{"q": "second"}\n')
  rows = input_files.read_texts(
    input_files.InputFile(str(jsonl), input_field='q', target_field='a')
  )
  assert rows == [('first', '1'), ('second', None)]
  tsv = tmp_path / 'in.tsv'
  tsv.write_text('one\tuno\ntwo\n')
  assert input_files.read_texts(input_files.InputFile(str(tsv))) == [
    ('one', 'uno'),
    ('two', None),
  ]
  text = tmp_path / 'in.txt'
  text.write_text('a line\tstays whole\n\nanother\n')
  assert input_files.read_texts(input_files.InputFile(str(text))) == [
    ('a line\tstays whole', None),
    ('another', None),
  ]
  assert (
    input_files.InputFile(str(text), format='jsonl').resolved_format()
    == 'jsonl'
  )


@pytest.mark.parametrize(
  'content, message',
  [
    ('{"inputs": "a"}\nnot json\n', r'in.jsonl line 2 is not valid JSON'),
    ('{"text": "a"}\n', r"line 1 has no string field 'inputs'"),
    ('\n\n', 'holds no inputs'),
  ],
)
def test_bad_files_are_named_errors(tmp_path, content, message):
  path = tmp_path / 'in.jsonl'
  path.write_text(content)
  with pytest.raises(input_files.InputFileError, match=message):
    input_files.read_texts(input_files.InputFile(str(path)))
  with pytest.raises(input_files.InputFileError, match='cannot read'):
    input_files.read_texts(input_files.InputFile(str(tmp_path / 'none')))


def test_long_inputs_are_cut_with_one_warning_that_counts_them(
  tmp_path, caplog
):
  path = tmp_path / 'in.txt'
  path.write_text('short\n' + 'x' * 40 + '\nmid\n')
  examples = input_files.file_examples(
    input_files.InputFile(str(path)),
    _Characters(),
    {'inputs': 10, 'targets': 4},
  )
  assert [len(e.input_ids) for e in examples.examples] == [6, 10, 4]
  assert all(e.input_ids[-1] == 1 for e in examples.examples)  # EOS kept
  assert examples.metrics is None  # nothing to score against
  warnings = [
    r.getMessage() for r in caplog.records if r.levelname == 'WARNING'
  ]
  assert warnings == [
    f'1 of 3 inputs in {path} are longer than 10 tokens '
    'and were cut to that length'
  ]
  assert examples.fingerprint['sha256']
  path.write_text('short\n')
  changed = input_files.file_examples(
    input_files.InputFile(str(path)),
    _Characters(),
    {'inputs': 10, 'targets': 4},
  )
  assert changed.fingerprint['sha256'] != examples.fingerprint['sha256']


def test_decode_a_jsonl_file_of_three_inputs(tiny_model_dir, tmp_path):
  inputs = [
    'question: where does anna live ? context: anna lives in lyon .',
    'question: what ? context: ' + 'anna lives in lyon . ' * 20,
    'question: what does bo like ? context: bo likes rice .',
  ]
  path = tmp_path / 'questions.jsonl'
  path.write_text(
    ''.join(
      json.dumps({'text': t, 'id': i}) + '\n' for i, t in enumerate(inputs)
    )
  )
  out = tmp_path / 'out'
  result = _run(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{tiny_model_dir}'",
    f"--gin.INPUT_FILE='{path}'",
    '--gin.THRESHOLD=0.5',
    "--gin.calm_jax.DecodeInputs.input_field='text'",
    '--gin.calm_jax.RunSettings.batch_size=2',
    f"--gin.OUTPUT_DIR='{out}'",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  # The model was trained on synth_qa: its input length is 56 tokens.
  assert (
    f'warning: 1 of 3 inputs in {path} are longer than 56 tokens and '
    'were cut to that length'
  ) in result.stderr
  records = [
    json.loads(line)
    for line in (out / 'questions.jsonl').read_text().splitlines()
  ]
  assert [r['inputs'] for r in records] == inputs  # input order
  for record in records:
    assert 'targets' not in record
    assert len(record['tokens']) == len(record['exit_layers']) >= 1
    assert all(1 <= l <= 4 for l in record['exit_layers'])
  summary = json.loads((out / 'summary.json').read_text())
  [(name, task)] = summary['tasks'].items()
  assert name == str(path) and task['num_examples'] == 3
  assert 'metric' not in task  # no targets, no task: nothing to score
  run = json.loads((out / 'run.json').read_text())
  assert run['data'][str(path)]['sha256']
