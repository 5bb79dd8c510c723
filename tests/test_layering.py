"""The layering table of docs/architecture.md, enforced import by import."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE_MARK = '<!-- layers: top to bottom -->'


def layer_table(doc: str) -> list[list[str]]:
  """The table's rows, top layer first: the module names of each row."""
  lines = doc[doc.index(TABLE_MARK) :].splitlines()[1:]
  rows = []
  for line in lines:
    if not line.startswith('|'):
      if rows:
        break
      continue
    cells = [c.strip() for c in line.strip('|').split('|')]
    if len(cells) < 2 or set(cells[1]) <= {'-'} or cells[1] == 'modules':
      continue
    rows.append(re.findall(r'`([\w.]+)`', cells[1]))
  return rows


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for the package and the tasks it
  installs as calm_jax.tasks."""
  out = {}
  for base, prefix in (
    (root / 'calm_jax', 'calm_jax'),
    (root / 'tasks', 'calm_jax.tasks'),
  ):
    for path in base.rglob('*.py'):
      parts = list(path.relative_to(base).with_suffix('').parts)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join([prefix, *parts])] = path
  return out


def rank_of(module: str, rows: list[list[str]]) -> int | None:
  """The row of the longest table entry that is `module` or a package
  holding it (0 = bottom); None if no row names it."""
  best, rank = -1, None
  for index, names in enumerate(reversed(rows)):
    for name in names:
      covers = module == name or (
        module.startswith(name + '.') and name != 'calm_jax'
      )
      if covers and len(name) > best:
        best, rank = len(name), index
  return rank


def imports(path: pathlib.Path, modules: dict) -> list[tuple[int, str]]:
  """(line, module) of every calm_jax module a file imports, at any
  depth of the file (functions included)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        name = f'{node.module}.{alias.name}'
        found.append((node.lineno, name if name in modules else node.module))
  return [
    (line, name)
    for line, name in found
    if name == 'calm_jax' or name.startswith('calm_jax.')
  ]


def violations(root: pathlib.Path, rows: list[list[str]]) -> list[str]:
  modules = module_files(root)
  out = []
  for module, path in sorted(modules.items()):
    own = rank_of(module, rows)
    if own is None:
      out.append(f'{module}: in no row of the layer table')
      continue
    for line, imported in imports(path, modules):
      theirs = rank_of(imported, rows)
      if theirs is not None and theirs > own:
        out.append(
          f'{path.relative_to(root)}:{line}: {module} imports '
          f'{imported}, a layer above it'
        )
  return out


@pytest.fixture(scope='module')
def rows():
  return layer_table((ROOT / 'docs' / 'architecture.md').read_text())


def test_every_import_goes_down_the_layer_table(rows):
  assert len(rows) >= 8
  assert violations(ROOT, rows) == []


def test_the_check_catches_an_upward_import(rows, tmp_path):
  for name in ('calm_jax/evaluation', 'calm_jax/calibration', 'tasks'):
    (tmp_path / name).mkdir(parents=True)
  (tmp_path / 'calm_jax' / 'api.py').write_text('')
  (tmp_path / 'calm_jax' / 'evaluation' / 'engine.py').write_text(
    'def f():\n  from calm_jax import api\n'
  )
  (tmp_path / 'calm_jax' / 'calibration' / 'ltt.py').write_text(
    'from calm_jax.evaluation import engine\n'
  )
  (tmp_path / 'calm_jax' / 'stray.py').write_text('')
  found = violations(tmp_path, rows)
  assert any(
    'engine.py:2: calm_jax.evaluation.engine imports calm_jax.api' in v
    for v in found
  )
  assert any(
    'calm_jax.calibration.ltt imports calm_jax.evaluation.engine' in v
    for v in found
  )
  assert 'calm_jax.stray: in no row of the layer table' in found
