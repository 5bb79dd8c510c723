"""Command lines as in t5x: absl flags plus gin.

  --gin_file=PATH         (repeatable) config files, stacked in order
  --gin.NAME=VALUE        (repeatable) a binding or macro, e.g.
                          --gin.MODEL_DIR="'runs/x'"  (same as
                          --gin_bindings="MODEL_DIR = 'runs/x'")
  --gin_search_paths=A,B  where `include` and --gin_file look for files
  --help                  the command's usage, without loading the job

A command is light (absl and gin only); the job module behind it is imported
after the flags parse, so `--help` and flag errors come at once. Every job's
configurables are registered before the config is parsed, so one experiment
file can hold a task's training, decoding and calibration settings, but a
binding given on the command line must be one the job reads: an unknown or
unused macro or binding is an error that names the closest valid ones.
User errors (`errors.UserError`) print one line and exit 2; any other
exception keeps its traceback (exit 1).
"""

import difflib
import importlib
import inspect
import os
import pathlib
import re
import sys
from typing import Any
from typing import Iterable
from typing import Optional
from typing import Sequence

# Before anything can import TensorFlow: its C++ start-up lines (CUDA probes
# on a machine without a GPU) are noise for every job here.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
import gin  # pylint: disable=g-import-not-at-top

from calm_jax import console  # pylint: disable=g-import-not-at-top
from calm_jax import errors  # pylint: disable=g-import-not-at-top

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent
# Every job is configured with gin; all are registered before a config is
# parsed, so that any config file parses in any job.
JOBS = (
  'train',
  'decode',
  'calibrate',
  'demo',
  'report',
  'validity',
  'bench',
  'convert',
  'real_model',
  'exact_mode',
  'plan',
)
HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull', '-help')


class UsageError(errors.UserError, ValueError):
  """A bad command line or config."""


def gin_search_paths() -> list[str]:
  """Where gin files are found besides the working directory: the folder
  that holds `gin/` (a source checkout, or the installed package, which
  ships the files as calm_jax/gin), and `gin/` itself."""
  for root in (PACKAGE_ROOT, PACKAGE_ROOT.parent):
    if (root / 'gin').is_dir():
      return [str(root), str(root / 'gin')]
  return []


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (t5x's spelling)."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.') :].partition('=')
      if not sep or not name or not value:
        raise UsageError(f'{arg!r}: expected --gin.NAME=VALUE')
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


def _flag_values() -> absl_flags.FlagValues:
  values = absl_flags.FlagValues()
  absl_flags.DEFINE_multi_string(
    'gin_file',
    [],
    'a gin config file (repeatable, stacked in order)',
    flag_values=values,
  )
  absl_flags.DEFINE_multi_string(
    'gin_bindings',
    [],
    "a binding 'NAME = VALUE' (repeatable); --gin.NAME=VALUE is the same",
    flag_values=values,
  )
  absl_flags.DEFINE_list(
    'gin_search_paths',
    [],
    'folders where include and --gin_file look',
    flag_values=values,
  )
  return values


def parse_flags(argv: Sequence[str]) -> absl_flags.FlagValues:
  """argv (program name excluded) -> parsed flags; UsageError if bad."""
  values = _flag_values()
  try:
    rest = values(['calm_jax', *rewrite_gin_args(argv)])
  except absl_flags.UnrecognizedFlagError as e:
    raise UsageError(
      f'unknown flag --{e.flagname}{_close(e.flagname, values)}; flags '
      'are --gin_file, --gin.NAME=VALUE, --gin_bindings, '
      '--gin_search_paths, --help'
    ) from e
  except absl_flags.Error as e:
    raise UsageError(errors.first_line(e)) from e
  if rest[1:]:
    raise UsageError(
      f'unexpected argument {rest[1]!r}; flags are '
      '--gin_file=..., --gin.NAME=VALUE, --gin_search_paths'
    )
  return values


def _resolve(path: str, search_paths: Sequence[str]) -> str:
  for root in ['', *search_paths]:
    candidate = os.path.join(root, path)
    if os.path.isfile(candidate):
      return candidate
  raise UsageError(
    f'gin file not found: {path} (searched: '
    f'{", ".join(["."] + list(search_paths))})'
  )


# --- gin errors made readable ----------------------------------------------


def _registered_selectors() -> list[str]:
  return sorted({c.selector for _, c in gin.config._REGISTRY.items()})  # pylint: disable=protected-access


def _parameters(selector: str) -> list[str]:
  match = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  if match is None:
    return []
  return list(inspect.signature(match.wrapped).parameters)


def _close(word: str, choices: Iterable[str], n: int = 3) -> str:
  found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
  return f' (did you mean {" or ".join(found)}?)' if found else ''


def _gin_error(error: Exception, bindings: Sequence[str] = ()) -> UsageError:
  """gin's multi-line error -> one line naming the file, line and fix."""
  lines = [line.strip() for line in str(error).splitlines()]
  head = errors.first_line(error)
  token = re.search(r"Failed to parse token '([^']*)'", str(error))
  if head.startswith('malformed node or string') and token:
    return _not_a_value(token.group(1), bindings)
  where = next((line for line in lines[1:] if line.startswith('In ')), '')
  if where.startswith('In bindings string') and lines[-1] != where:
    where = f'in the binding {lines[-1]!r}'
  if isinstance(error, SyntaxError) and getattr(error, 'filename', None):
    where = f'In {error.filename}, line {error.lineno}'
  unknown = re.match(r"No configurable matching '([^']+)'", head)
  if unknown:
    head += _close(unknown.group(1), _registered_selectors())
  unknown = re.match(
    r"Configurable '([^']+)' doesn't have a parameter "
    r"named '([^']+)'",
    head,
  )
  if unknown:
    head += _close(unknown.group(2), _parameters(unknown.group(1)))
  return UsageError(
    f'bad gin config: {head}' + (f' [{where}]' if where else '')
  )


def _not_a_value(token: str, bindings: Sequence[str]) -> UsageError:
  """A bare word where gin wants a Python literal (nan, inf, a call)."""
  binding = next(
    (b for b in bindings if re.search(rf'=.*\b{re.escape(token)}\b', b)),
    None,
  )
  name, _, value = (binding or '').partition('=')
  where = f'--gin.{name.strip()}={value.strip()}' if binding else token
  return UsageError(
    f'{where}: {token!r} is not a value: write a number (1e-3), a quoted '
    'string ("\'text\'"), True, False, None or a list of those (no setting '
    'takes NaN or infinity)'
  )


def parse_gin(
  files: Sequence[str],
  bindings: Sequence[str],
  search_paths: Sequence[str] = (),
) -> None:
  """Parses gin files and bindings into a fresh config."""
  paths = [*search_paths, *gin_search_paths()]
  gin.clear_config()
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [_resolve(f, paths) for f in files]
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except (ValueError, IOError, SyntaxError, KeyError) as e:
    raise _gin_error(e, bindings) from e
  except Exception as e:  # tokenize.TokenError: an unclosed bracket
    if type(e).__name__ != 'TokenError':
      raise
    raise UsageError(
      f'bad gin config: unbalanced brackets or quotes ({e})'
    ) from e
  try:
    gin.finalize()
  except ValueError as e:
    raise _unset_macro_error(e) from e


def _unset_macro_error(error: ValueError) -> Exception:
  """The one line for a macro a config needs and nobody set: one marked
  `%gin.REQUIRED`, or one a file refers to (`%MODEL_CONFIG`) and no file
  stacked binds (a run file given without its model file). Any other
  finalisation error is a bug and keeps its traceback."""
  text = str(error)
  required = re.match(r'(\w+)/macro.value set to `%gin.REQUIRED`', text)
  if required:
    name = required.group(1)
    return UsageError(f'{name} is required: set it with `--gin.{name}=VALUE`')
  unbound = re.match(r"No bindings specified for '(\w+)/gin.macro'", text)
  if unbound:
    name = unbound.group(1)
    model_file = (
      'stack a gin/models/*.gin file before the run file, or '
      if name == 'MODEL_CONFIG'
      else ''
    )
    return UsageError(
      f'%{name} is used but never set: {model_file}set it with '
      f'`--gin.{name}=VALUE`'
    )
  return error


# --- what a job reads -------------------------------------------------------


def _macro_references(value: Any) -> Iterable[str]:
  """Names of the macros (%NAME) inside a bound value."""
  if isinstance(value, gin.config.ConfigurableReference):
    selector = value.scoped_selector
    if selector.endswith('/gin.macro'):
      yield selector[: -len('/gin.macro')]
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      yield from _macro_references(item)
  elif isinstance(value, dict):
    for item in value.values():
      yield from _macro_references(item)


def macros_read_by(selectors: Sequence[str]) -> set[str]:
  """The macros that bindings of these configurables use, also through
  other macros."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  pending = [
    ref
    for (scope, selector), params in config.items()
    if selector in selectors
    for value in params.values()
    for ref in _macro_references(value)
  ]
  seen = set()
  while pending:
    name = pending.pop()
    if name in seen:
      continue
    seen.add(name)
    pending += list(
      _macro_references(config.get((name, 'gin.macro'), {}).get('value'))
    )
  return seen


def _binding_name(binding: str) -> str:
  return binding.split('=', 1)[0].strip()


def _canonical(selector: str) -> Optional[str]:
  match = gin.config._REGISTRY.get_match(selector.split('/')[-1])  # pylint: disable=protected-access
  return None if match is None else match.selector


def check_command_line(
  bindings: Sequence[str], reads: Sequence[str], job: str
) -> None:
  """Each command-line binding must reach the job: a macro that some
  binding of the job's configurables uses, or a parameter of one of them."""
  macros = macros_read_by(reads)
  for binding in bindings:
    name = _binding_name(binding)
    if '.' not in name and '/' not in name:
      if name not in macros:
        raise UsageError(
          f'--gin.{name} is not used by calm_jax.{job}'
          f'{_close(name, macros)}; its macros: '
          f'{", ".join(sorted(macros)) or "none"}'
        )
      continue
    selector = _canonical(name.rsplit('.', 1)[0])
    if selector not in reads:
      raise UsageError(
        f'--gin.{name}: calm_jax.{job} does not read {selector}; it '
        f'reads {", ".join(reads)}'
      )


def check_required(reads: Sequence[str]) -> None:
  """Every gin.REQUIRED parameter of the job's configurables is bound."""
  for selector in reads:
    match = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    if match is None:
      continue
    for name, param in inspect.signature(match.wrapped).parameters.items():
      if param.default is not gin.REQUIRED:
        continue
      try:
        gin.query_parameter(f'{selector}.{name}')
      except ValueError:
        macro = name.upper()
        raise UsageError(
          f'{selector} needs {name}: set it in a gin file or with '
          f'`--gin.{selector}.{name}=VALUE` (the run files use '
          f'`--gin.{macro}=VALUE`)'
        ) from None


# --- running a command ------------------------------------------------------


def load_jobs(job: str):
  """The job's module, after registering every job's configurables."""
  if job not in JOBS:
    raise UsageError(f'unknown job {job!r}; valid: {", ".join(JOBS)}')
  for name in JOBS:
    importlib.import_module(f'calm_jax.jobs.{name}')
  return importlib.import_module(f'calm_jax.jobs.{job}')


def parse(argv: Sequence[str]) -> None:
  """Parses a command line's gin files and bindings (all jobs registered),
  without running anything: what tests and notebooks use."""
  flags = parse_flags(argv)
  load_jobs('train')
  parse_gin(flags.gin_file, flags.gin_bindings, flags.gin_search_paths)


def run_command(
  job: str, doc: str, argv: Sequence[str], *, check_only: bool = False
) -> int:
  """Runs a job from its command line; returns the exit status. User
  errors print one line and give 2; other exceptions propagate. With
  `check_only`, the command line and every setting are checked and nothing
  runs (what the tests of the documented examples do)."""
  if any(arg in HELP_FLAGS for arg in argv):
    print(doc.strip() + '\n\nflags:\n' + _flag_help())
    return 0
  console.show_warnings()
  try:
    flags = parse_flags(argv)
    with console.native_stderr_hidden(console.START_UP_NOISE):
      module = load_jobs(job)
    environment = importlib.import_module('calm_jax.jobs.environment')
    # Jobs with one run file of their own (report, validity, bench,
    # convert) read it when no --gin_file is given.
    gin_files = flags.gin_file or getattr(module, 'DEFAULT_GIN_FILES', ())
    parse_gin(gin_files, flags.gin_bindings, flags.gin_search_paths)
    reads = (*module.READS, *environment.READS)
    check_command_line(flags.gin_bindings, reads, job)
    check_required(reads)
    if check_only:
      module.run(check_only=True)
      return 0
    environment.setup(getattr(module, 'STARTS_TPU_COMPILER', False))
    module.run()
  except errors.UserError as e:
    print(f'error: {errors.first_line(e)}', file=sys.stderr)
    return 2
  return 0


def _flag_help() -> str:
  lines = [
    f'  --{flag.name}: {flag.help}' for flag in _flag_values()._flags().values()
  ]  # pylint: disable=protected-access
  lines.append("  --gin.NAME=VALUE: the same as --gin_bindings='NAME = VALUE'")
  lines.append('  --help: this text')
  return '\n'.join(sorted(set(lines)))


def main(job: str, doc: str, argv: Optional[Sequence[str]] = None) -> None:
  """The `python -m calm_jax.<job>` entry: exits with run_command's status."""
  sys.exit(run_command(job, doc, sys.argv[1:] if argv is None else argv))
