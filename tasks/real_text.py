"""Prompts built from real human-written English that ships with Python: the
documentation strings of the standard library.

No network and no download: every text is a paragraph of a docstring of a
standard-library module, class or function, found with `inspect`. A
paragraph qualifies when it is prose (25 to 110 words, no doctest or code
lines, mostly letters). Each one becomes one prompt of one kind, chosen by
a hash of its text:

  summarize  "Summarize the following paragraph in one sentence."
  question   "What does <the documented object> do, according to the text?"
  rewrite    "Rewrite the following paragraph in simpler words."
  continue   the paragraph's first sentences, to be continued

The split (calibration or test) is fixed by another hash of the text, so a
paragraph is in one split only (a third hash orders each split, so that a
prefix of it is a sample of all of it), and the set is the same on every machine
with the same Python. Every prompt records where its text came from
(module, object, paragraph index) and the Python version. A text's
consistency needs no reference answer: the full model's output is the
reference.
"""

import dataclasses
import hashlib
import importlib
import inspect
import re
import sys
from typing import Iterator

# Modules with long prose docstrings (pure Python, present on every
# platform). Their order fixes the order of the set.
MODULES = (
  'argparse',
  'ast',
  'asyncio',
  'base64',
  'bisect',
  'calendar',
  'cmd',
  'codecs',
  'collections',
  'concurrent.futures',
  'configparser',
  'contextlib',
  'copy',
  'csv',
  'dataclasses',
  'datetime',
  'decimal',
  'difflib',
  'dis',
  'doctest',
  'email.message',
  'enum',
  'filecmp',
  'fnmatch',
  'fractions',
  'ftplib',
  'functools',
  'getopt',
  'gettext',
  'glob',
  'gzip',
  'hashlib',
  'heapq',
  'hmac',
  'html.parser',
  'http.client',
  'http.cookiejar',
  'http.server',
  'imaplib',
  'inspect',
  'io',
  'ipaddress',
  'itertools',
  'json',
  'locale',
  'logging',
  'logging.handlers',
  'mailbox',
  'mimetypes',
  'multiprocessing',
  'netrc',
  'numbers',
  'operator',
  'optparse',
  'os',
  'pathlib',
  'pdb',
  'pickle',
  'pkgutil',
  'platform',
  'plistlib',
  'poplib',
  'pprint',
  'profile',
  'pstats',
  'queue',
  'random',
  're',
  'reprlib',
  'sched',
  'secrets',
  'selectors',
  'shelve',
  'shlex',
  'shutil',
  'smtplib',
  'socket',
  'socketserver',
  'sqlite3',
  'ssl',
  'statistics',
  'string',
  'struct',
  'subprocess',
  'tarfile',
  'tempfile',
  'textwrap',
  'threading',
  'timeit',
  'tokenize',
  'trace',
  'traceback',
  'types',
  'typing',
  'unittest',
  'urllib.parse',
  'urllib.request',
  'uuid',
  'warnings',
  'wave',
  'weakref',
  'webbrowser',
  'xml.dom.minidom',
  'xml.etree.ElementTree',
  'zipfile',
  'zoneinfo',
)
KINDS = ('summarize', 'question', 'rewrite', 'continue')
SPLITS = ('calibration', 'test')


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt and where its text came from."""

  text: str  # what the model is asked (the user's turn of a chat)
  kind: str  # one of KINDS
  split: str  # one of SPLITS
  source: dict  # module, object, paragraph, python


def _hash(text: str, salt: str) -> int:
  return int(hashlib.sha256(f'{salt}:{text}'.encode()).hexdigest(), 16)


def is_prose(paragraph: str) -> bool:
  """25 to 110 words of running text: no doctest, code or table lines."""
  words = paragraph.split()
  if not 25 <= len(words) <= 110:
    return False
  lines = paragraph.splitlines()
  if any(
    line.lstrip().startswith(('>>>', '...', '$', '|', '*', '-', '+', ':', '#'))
    for line in lines
  ):
    return False
  letters = sum(c.isalpha() or c.isspace() for c in paragraph)
  return letters / len(paragraph) > 0.9 and paragraph.rstrip().endswith('.')


def _documented(module) -> Iterator[tuple[str, object]]:
  """(qualified name, object) of the module and its public members."""
  yield module.__name__, module
  for name, member in sorted(vars(module).items()):
    if name.startswith('_') or getattr(member, '__module__', None) != (
      module.__name__
    ):
      continue
    if inspect.isclass(member) or inspect.isfunction(member):
      yield f'{module.__name__}.{name}', member


def paragraphs() -> Iterator[tuple[str, int, str]]:
  """(object, paragraph index, text) of every prose paragraph, in order."""
  seen = set()
  for module_name in MODULES:
    try:
      module = importlib.import_module(module_name)
    except ImportError:  # a module this build of Python lacks
      continue
    for name, obj in _documented(module):
      doc = inspect.getdoc(obj) or ''
      for index, block in enumerate(re.split(r'\n\s*\n', doc)):
        text = ' '.join(block.split())
        if is_prose(block) and text not in seen:
          seen.add(text)
          yield name, index, text


def _first_sentences(text: str, words: int = 18) -> str:
  """The text's first sentences, at least `words` words if it has them."""
  sentences = re.split(r'(?<=[.!?])\s+', text)
  out = []
  for sentence in sentences[:-1]:
    out.append(sentence)
    if len(' '.join(out).split()) >= words:
      break
  return ' '.join(out or sentences[:1])


def prompt_text(kind: str, name: str, paragraph: str) -> str:
  short = name.rsplit('.', 1)[-1]
  if kind == 'summarize':
    return (
      'Summarize the following paragraph from the Python '
      f'documentation in one sentence.\n\n{paragraph}'
    )
  if kind == 'question':
    return (
      f'Read this paragraph from the documentation of `{short}`.\n\n'
      f'{paragraph}\n\nAccording to the paragraph, what does '
      f'`{short}` do? Answer in one sentence.'
    )
  if kind == 'rewrite':
    return f'Rewrite the following paragraph in simpler words.\n\n{paragraph}'
  return (
    'Continue this text from the Python documentation with one more '
    f'sentence.\n\n{_first_sentences(paragraph)}'
  )


def prompts() -> list[Prompt]:
  """Every prompt of the set, calibration and test, in a fixed order."""
  version = '.'.join(map(str, sys.version_info[:3]))
  out = []
  for name, index, paragraph in paragraphs():
    kind = KINDS[_hash(paragraph, 'kind') % len(KINDS)]
    split = SPLITS[_hash(paragraph, 'split') % len(SPLITS)]
    module = name if name in MODULES else name.rsplit('.', 1)[0]
    out.append(
      Prompt(
        text=prompt_text(kind, name, paragraph),
        kind=kind,
        split=split,
        source={
          'module': module,
          'object': name,
          'paragraph': index,
          'python': version,
        },
      )
    )
  return out


def split(name: str, limit: int | None = None) -> list[Prompt]:
  """The prompts of one split in an order fixed by a third hash of the
  text, the first `limit` of them: any prefix is a sample of the whole
  split (every module and kind), not its first modules alphabetically."""
  if name not in SPLITS:
    raise ValueError(f'unknown split {name!r}; valid: {", ".join(SPLITS)}')
  chosen = [p for p in prompts() if p.split == name]
  return sorted(chosen, key=lambda p: _hash(p.text, 'order'))[:limit]
