"""The one base class of the user's mistakes (no JAX, no TensorFlow).

Every error that bad input can cause (a flag, a setting, a file, a model
dir, a task) is a `UserError`: the commands print its first line and exit 2.
Any other exception is a bug and keeps its traceback (exit 1).

A setting or argument that fails its rule (`calm_jax.arguments`) is a
`SettingError`, wherever it was given (command line, gin file, Python API).
Errors about things rather than settings are defined next to the code that
raises them: UsageError (the command line's syntax), DataError, InputFileError,
CheckpointError, ProvenanceError, RecordError, FileError, ConversionError.
"""


class UserError(Exception):
  """Bad input: shown as one line `error: ...`, exit status 2."""


class SettingError(UserError, ValueError):
  """A setting that cannot work: of the wrong type, not finite, out of
  range, an unknown name, or a shape that does not fit the devices."""


def first_line(error: BaseException) -> str:
  """The first line of an error's message (its type name if empty)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
