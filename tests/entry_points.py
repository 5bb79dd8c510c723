"""Runs a command as a user does, in this process or in a new one.

`run_module('calm_jax.decode', *flags)` runs the command's whole path (flag
parsing, gin, the job, the one-line error and exit status) in the test
process: TensorFlow and the jit caches are already loaded, which saves the
20-30 s of start-up a subprocess pays. `run_subprocess` is the real
`python -m` for what only a new process shows (start-up time, the C++ log
lines, a traceback's exit status).
"""

import contextlib
import importlib
import io
import os
import pathlib
import subprocess
import sys
import traceback

import gin

from calm_jax import cli
from calm_jax.tasks import data_settings

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_module(
  module: str, *args: str, check_only: bool = False
) -> subprocess.CompletedProcess:
  """In-process `python -m MODULE ARGS` from the repository root (with
  `check_only`: the command line and settings checked, nothing run)."""
  command = importlib.import_module(module)
  job = module.rsplit('.', 1)[-1]
  out, err = io.StringIO(), io.StringIO()
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        code = cli.run_command(
          job, command.__doc__, list(args), check_only=check_only
        )
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
      except Exception:  # pylint: disable=broad-except
        traceback.print_exc()  # a bug: the traceback, exit status 1
        code = 1
  finally:
    os.chdir(cwd)
    gin.clear_config()  # nothing of this run reaches the next call
    data_settings.set_overrides()
  return subprocess.CompletedProcess(
    [module, *args], code, out.getvalue(), err.getvalue()
  )


def run_subprocess(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` in a new process, from the repository root."""
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
