"""Every file of a model dir, read and written one way (no JAX, no TF).

Paths go through `etils.epath`, as orbax's do, so a model dir may be local
or remote (`gs://...`) for every file, not only for checkpoints.

- Writes are whole or nothing. Locally the bytes go to a temporary file of
  a unique name in the target's directory, are flushed to disk and renamed
  over the target (atomic on POSIX), so concurrent writers never share a
  temporary file and readers never see a partial one. On an object store
  (no rename) the object is uploaded whole from a local temporary file: a
  reader sees the old object or the new one.
- Reads name the file, what it should be and how to recover: a truncated
  or corrupt file is a `FileError` (one line at the command line), never a
  bare parser message.
- JSON holds no NaN or infinity (not JSON): such floats are written as null.
"""

import json
import math
import os
import shutil
import socket
import tempfile
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Union

from etils import epath

from calm_jax import console
from calm_jax import errors

PathLike = Union[str, os.PathLike, epath.Path]


class FileError(errors.UserError, ValueError):
  """A file or directory that cannot be used as what it should be."""


def as_path(path: PathLike) -> epath.Path:
  return path if isinstance(path, epath.Path) else epath.Path(path)


def is_local(path: PathLike) -> bool:
  return '://' not in os.fspath(path)


def join(path: PathLike, *names: str) -> str:
  """`path/name/...` as a string (local or remote)."""
  return os.fspath(as_path(path).joinpath(*names))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """Names in a directory (none if it does not exist)."""
  path = as_path(path)
  return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def glob(directory: PathLike, pattern: str) -> list[str]:
  directory = as_path(directory)
  if not directory.is_dir():
    return []
  return sorted(os.fspath(p) for p in directory.glob(pattern))


def makedirs(path: PathLike) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(
  path: PathLike, what: str = 'file', recovery: str = 'write it again'
) -> str:
  try:
    return as_path(path).read_text()
  except FileNotFoundError as e:
    raise FileError(
      f'{what} {os.fspath(path)} does not exist: {recovery}'
    ) from e
  except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
    raise FileError(
      f'{what} {os.fspath(path)} cannot be read '
      f'({errors.first_line(e)}): {recovery}'
    ) from e


def read_json(
  path: PathLike,
  what: str = 'file',
  recovery: str = 'delete it or write it again',
) -> Any:
  """The JSON in `path`; a truncated or corrupt file is a FileError that
  names the file, what it is, and how to recover."""
  text = read_text(path, what, recovery)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise FileError(
      f'{what} {os.fspath(path)} is not valid JSON ({e}): {recovery}'
    ) from e


def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
  """Calls `write(local temporary path)`, then puts the file at `path`.

  The temporary file keeps the target's extension (writers such as
  matplotlib pick the format from it); it is removed if `write` fails.
  """
  path = os.fspath(path)
  if not is_local(path):
    return _upload(path, write)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix=f'.{name}.', suffix=os.path.splitext(name)[1]
  )
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


def _upload(path: str, write: Callable[[str], None]) -> str:
  """A whole object: written locally first, then copied up in one piece."""
  with tempfile.TemporaryDirectory() as tmp_dir:
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    write(tmp)
    makedirs(as_path(path).parent)
    as_path(tmp).copy(as_path(path), overwrite=True)
  return path


def atomic_write_text(path: PathLike, text: str) -> str:
  def write(tmp: str) -> None:
    with open(tmp, 'w') as f:
      f.write(text)

  return atomic_write(path, write)


def copy_file(source: PathLike, target: PathLike) -> str:
  """Copies a file, whole or not at all at the target."""
  data = as_path(source).read_bytes()

  def write(tmp: str) -> None:
    with open(tmp, 'wb') as f:
      f.write(data)

  return atomic_write(target, write)


def move(source: PathLike, target: PathLike) -> str:
  """Moves a file or directory (nothing is deleted)."""
  makedirs(as_path(target).parent)
  if is_local(source) and is_local(target):
    os.replace(os.fspath(source), os.fspath(target))
  else:
    as_path(source).rename(as_path(target))
  return os.fspath(target)


def new_directory(
  path: PathLike, fill: Callable[[str], None], what: str = 'directory'
) -> str:
  """Creates the directory `path` whole: `fill(staging dir)` writes its
  files, then the staging dir becomes `path`.

  Locally the staging dir is a hidden sibling of `path`, renamed into place
  at the end (atomic on POSIX); if `fill` fails it is removed and `path`
  never appears. On an object store (no rename) the staged files are
  uploaded after `fill` succeeds. An existing `path` is a FileError.
  """
  target = os.fspath(path)
  if exists(target):
    raise FileError(f'{what} {target} exists; choose a new directory')
  local = is_local(target)
  parent = (
    os.path.dirname(os.path.abspath(target)) if local else tempfile.gettempdir()
  )
  os.makedirs(parent, exist_ok=True)
  prefix = _staging_prefix(os.path.basename(target))
  _remove_abandoned_staging(parent, prefix)
  staging = tempfile.mkdtemp(dir=parent, prefix=f'{prefix}{os.getpid()}-')
  try:
    fill(staging)
    if local:
      _fsync_directory(staging)
      os.rename(staging, target)  # fails, rather than merges, if it appeared
      _fsync_directory(parent)
    else:
      _upload_tree(staging, target)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return target


def _staging_prefix(name: str) -> str:
  """Staging dirs are `.NAME.staging-HOST-PID-XXXX`: the process that made
  one is known, so a later writer can tell an abandoned one (its process
  killed) from one being filled now."""
  return f'.{name}.staging-{socket.gethostname()}-'


def _remove_abandoned_staging(parent: str, prefix: str) -> None:
  """Removes this host's staging dirs for the same target whose process
  is gone (a writer killed before it finished), saying so in one line."""
  for name in sorted(os.listdir(parent)):
    pid = name[len(prefix) :].split('-')[0]
    if not (name.startswith(prefix) and pid.isdigit()) or _alive(int(pid)):
      continue
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    console.warn(
      f'removed {os.path.join(parent, name)}: the staging dir of a write '
      f'that did not finish (process {pid} is gone)'
    )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return True


def _upload_tree(local_dir: str, target: str) -> None:
  for root, _, names in os.walk(local_dir):
    for name in names:
      source = os.path.join(root, name)
      destination = as_path(target) / os.path.relpath(source, local_dir)
      makedirs(destination.parent)
      as_path(source).copy(destination)


def local_copy(path: PathLike) -> str:
  """A local file with the contents of `path`, for libraries that read only
  local files (SentencePiece): `path` itself when it is local."""
  if is_local(path):
    return os.fspath(path)
  local = os.path.join(tempfile.mkdtemp(), as_path(path).name)
  as_path(path).copy(epath.Path(local))
  return local


def check_writable_dir(path: PathLike, what: str) -> None:
  """A directory that is, or can become, writable: a file at `path` or
  above it, or a read-only directory, is a FileError (local paths; a remote
  store answers on first write)."""
  if not is_local(path):
    return
  path = os.path.abspath(os.fspath(path))
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise FileError(f'{what} {path} cannot be a directory: {probe} is a file')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise FileError(f'{what} {path} is not writable ({probe} is read-only)')


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


def atomic_write_json(path: PathLike, obj: Any) -> str:
  return atomic_write_text(path, json_text(obj) + '\n')


def atomic_write_jsonl(path: PathLike, records: Iterable[Any]) -> str:
  return atomic_write_text(
    path, ''.join(json_text(r, indent=None) + '\n' for r in records)
  )
