"""One writer per model dir: a lock that names its holder.

Training writes a model dir's checkpoints, manifests and model files; two
trainings of one dir at once delete each other's unfinished checkpoints.
`ModelDirLock` makes the second one stop at once with one line naming the
holder (process id, host, since when). Readers (decode, calibrate, bench,
the API) never take it.

The lock is an exclusive `flock` on MODEL_DIR/.lock, whose content names
the holder (pid, host, purpose, since when). The kernel drops the lock when
its process ends, however it ends (kill -9 included), so a lock is never
stale: a file left behind by a dead process is simply taken over, and its
former holder is named in a note. Release removes the file (and the model
dir, if the lock made it and was all it held); a waiter that locked the removed file
sees that it is no longer the one at the path and tries again. On an object
store (gs://) there is no lock to take: none is taken.
"""

import fcntl
import json
import os
import socket
import time
from typing import Optional

from calm_jax import console
from calm_jax import errors
from calm_jax.storage import files

LOCK_FILE = '.lock'


class LockedError(errors.UserError, RuntimeError):
  """Another process holds the model dir."""


def describe(holder: dict) -> str:
  """'pid 12 on host h (since 2026-12-03 07:00:00)'."""
  when = holder.get('since')
  since = (
    time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))
    if isinstance(when, (int, float))
    else 'an unknown time'
  )
  return f'pid {holder.get("pid")} on host {holder.get("host")} (since {since})'


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    holder = json.loads(os.read(fd, 4096).decode() or '{}')
  except (ValueError, UnicodeDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


class ModelDirLock:
  """`with ModelDirLock(model_dir, 'training'):` holds the dir's lock."""

  def __init__(self, model_dir: str, purpose: str = 'training'):
    self.model_dir = model_dir
    self.purpose = purpose
    self.path = files.join(model_dir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._made_dir = False

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    """Takes the lock, or raises LockedError naming its holder."""
    if not files.is_local(self.model_dir) or self.held:
      return
    self._made_dir = not os.path.isdir(self.model_dir)
    os.makedirs(self.model_dir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LockedError(
          f'{self.model_dir} is in use: {holder.get("purpose", "a job")} '
          f'by {describe(holder)}; wait for it to finish, or stop it'
        ) from None
      if _same_file(fd, self.path):
        break
      os.close(fd)  # released and removed meanwhile: lock the new one
    previous = _read_holder(fd)
    if previous.get('pid') not in (None, os.getpid()):
      console.info(
        f'note: {self.path} was left by {describe(previous)}, which no '
        'longer runs'
      )
    record = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'purpose': self.purpose,
      'since': time.time(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    """Removes the lock file (while still holding it), then drops it."""
    if self._fd is None:
      return
    os.unlink(self.path)
    if self._made_dir:
      try:
        os.rmdir(self.model_dir)  # the lock was all the run wrote there
      except OSError:
        pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> 'ModelDirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
