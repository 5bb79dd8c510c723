"""Whole-or-nothing file writes (no JAX, no TensorFlow).

A file appears complete or not at all: the text goes to a temporary file of
a unique name in the same directory, is flushed to disk, and is renamed over
the target (an atomic step on POSIX file systems), so concurrent writers
never share a temporary file and readers never see a partial one. JSON holds
no NaN or infinity (not JSON): such floats are written as null.
"""
import json
import math
import os
import tempfile
from typing import Any, Callable, Iterable

from calm_jax import errors


class FileError(errors.UserError, ValueError):
  """A file that cannot be read as what it should be (names the file)."""


def read_json(path: str, what: str = 'file',
              recovery: str = 'delete it or write it again') -> Any:
  """The JSON in `path`; a truncated or corrupt file is a FileError that
  names the file, what it is, and how to recover."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FileError(f'{what} {path} is not valid JSON ({e}): {recovery}'
                    ) from e


def atomic_write(path: str, write: Callable[[str], None]) -> str:
  """Calls `write(temporary path)`, then renames the file onto `path`.

  The temporary file keeps the target's extension (writers such as
  matplotlib pick the format from it); it is removed if `write` fails.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{name}.',
                             suffix=os.path.splitext(name)[1])
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _fsync_directory(directory)
  return path


def atomic_write_text(path: str, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      f.write(text)
  atomic_write(path, write)


def _fsync_directory(directory: str) -> None:
  """Makes the rename itself durable (where the OS allows it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def finite_json(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
  return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json_text(obj) + '\n')


def atomic_write_jsonl(path: str, records: Iterable[Any]) -> None:
  atomic_write_text(path, ''.join(json_text(r, indent=None) + '\n'
                                  for r in records))
