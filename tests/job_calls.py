"""The decode and calibrate jobs called with flat keyword arguments.

Tests name one setting at a time; the jobs take settings groups. These
helpers sort each keyword into its group (an unknown one is a TypeError).
"""

import dataclasses

from calm_jax.jobs import calibrate as calibrate_job
from calm_jax.jobs import decode as decode_job
from calm_jax.jobs import settings

_GROUPS = {
  'inputs': settings.DecodeInputs,
  'exits': settings.ExitSettings,
  'sampling': settings.SamplingSettings,
  'output': settings.OutputSettings,
  'runtime': settings.RunSettings,
}


def _grouped(kwargs: dict, groups: tuple[str, ...]) -> dict:
  rest = dict(kwargs)
  out = {}
  for name in groups:
    fields = {f.name for f in dataclasses.fields(_GROUPS[name])}
    out[name] = _GROUPS[name](
      **{k: rest.pop(k) for k in list(rest) if k in fields}
    )
  return {**out, **rest}


_DECODE = ('inputs', 'exits', 'sampling', 'output', 'runtime')


def decode(**kwargs):
  return decode_job.decode(**_grouped(kwargs, _DECODE))


def calibrate(**kwargs):
  return calibrate_job.calibrate(**_grouped(kwargs, ('exits', 'runtime')))
