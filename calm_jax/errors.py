"""The one base class of the user's mistakes (no JAX, no TensorFlow).

Every error that bad input can cause (a flag, a config value, a file, a model
dir, a task) is a `UserError`: the commands print its first line and exit 2.
Any other exception is a bug and keeps its traceback (exit 1). Each layer
defines its own subclasses next to the code that raises them (InputError,
DataError, CheckpointError, ProvenanceError, FileError, ...).
"""


class UserError(Exception):
  """Bad input: shown as one line `error: ...`, exit status 2."""


class ConfigError(UserError, ValueError):
  """A setting that cannot work: an unknown name, a value out of range, a
  shape that does not fit the devices."""


def first_line(error: BaseException) -> str:
  """The first line of an error's message (its type name if empty)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
