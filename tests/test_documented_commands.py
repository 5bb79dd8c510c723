"""Every command the docs show runs: its flags parse and every setting passes.

The examples come from each command's --help text (its module docstring),
the README and docs/*.md (code blocks and inline code), and the comments of
the gin files. Each one is run in
this process with `check_only`: the whole command-line path (flags, gin
files, bindings the job must read, required macros) and every setting's
rule run, and nothing is loaded, trained or written. Printed fix hints are
commands too: tests/test_faults.py and test_provenance.py run the ones the
code prints.
"""

import ast
import importlib.util
import pathlib
import re
import shlex

import pytest

from calm_jax import cli

import entry_points  # tests/entry_points.py

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = cli.JOBS
_PYTHON = re.compile(r'(^|/)python3?$')


def commands_in(text: str) -> list[tuple[str, list[str]]]:
  """(module, argv) of every `python -m calm_jax.<command> ...` in a shell
  snippet (continuation lines joined; optional [flags] kept; a command
  nested in a quoted argument, as in `ssh ... --command="..."`, found)."""
  text = re.sub(r'\\\n\s*', ' ', text)
  found = []
  for line in text.splitlines():
    if 'python' not in line or '-m calm_jax.' not in line:
      continue
    line = re.sub(r'\[(--[^\]]*)\]', r'\1', line)  # optional flags: shown
    tokens = shlex.split(line, comments=True)
    for index, token in enumerate(tokens):
      if ' -m calm_jax.' in token:  # a command inside a quoted argument
        found += commands_in(token)
      elif (
        _PYTHON.search(token)
        and tokens[index + 1 : index + 2] == ['-m']
        and index + 2 < len(tokens)
      ):
        args = []
        for arg in tokens[index + 3 :]:
          if arg in ('&&', ';', '|', '||'):
            break
          args.append(arg)
        found.append((tokens[index + 2], args))
  return found


def _markdown_snippets(text: str) -> list[str]:
  """Fenced code blocks, and inline code spans outside them."""
  blocks = re.findall(r'```[^\n]*\n(.*?)```', text, re.S)
  prose = re.sub(r'```.*?```', '', text, flags=re.S)
  return blocks + re.findall(r'`([^`\n]*python[^`\n]*)`', prose)


def documented_commands() -> list[tuple[str, str, list[str]]]:
  """(where, module, argv) of every command example."""
  out = []
  for command in COMMANDS:
    path = ROOT / 'calm_jax' / f'{command}.py'
    doc = ast.get_docstring(ast.parse(path.read_text())) or ''
    out += [(f'{command} --help', m, a) for m, a in commands_in(doc)]
  for path in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
    for snippet in _markdown_snippets(path.read_text()):
      out += [(path.name, m, a) for m, a in commands_in(snippet)]
  for path in sorted((ROOT / 'gin').rglob('*.gin')):
    comments = '\n'.join(
      re.sub(r'^#\s?', '', line)
      for line in path.read_text().splitlines()
      if line.startswith('#')
    )
    out += [(path.name, m, a) for m, a in commands_in(comments)]
  return out


EXAMPLES = documented_commands()


def test_the_examples_are_found():
  where = {w for w, _, _ in EXAMPLES}
  assert {f'{c} --help' for c in COMMANDS} <= where
  assert {'README.md', 'training.md', 'decoding.md'} <= where
  assert len(EXAMPLES) >= 25


def test_commands_nested_and_optional_flags_are_parsed():
  snippet = (
    'ssh host --command="cd x && .venv/bin/python -m calm_jax.train '
    '--gin.MODEL_DIR=\\"\'/m\'\\"" # note\n'
    'python -m calm_jax.bench [--gin.REPEATS=3]  # a comment'
  )
  assert commands_in(snippet) == [
    ('calm_jax.train', ["--gin.MODEL_DIR='/m'"]),
    ('calm_jax.bench', ['--gin.REPEATS=3']),
  ]


def test_other_documented_modules_exist():
  for where, module, _ in EXAMPLES:
    if module.rsplit('.', 1)[-1] not in COMMANDS:
      assert importlib.util.find_spec(module) is not None, (where, module)


COMMAND_EXAMPLES = [e for e in EXAMPLES if e[1].rsplit('.', 1)[-1] in COMMANDS]


@pytest.mark.parametrize(
  'where,module,args',
  COMMAND_EXAMPLES,
  ids=[f'{w}:{m}:{i}' for i, (w, m, _) in enumerate(COMMAND_EXAMPLES)],
)
def test_documented_command_parses_and_its_settings_pass(where, module, args):
  result = entry_points.run_module(module, *args, check_only=True)
  assert result.returncode == 0, (where, args, result.stderr[-1500:])
