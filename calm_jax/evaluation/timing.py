"""Wall-clock timing of compiled callables, alternating so that the drifts
of a shared machine hit every callable alike. No TensorFlow, no gin."""

import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax


def alternating_seconds(
  runs: Mapping[str, Callable[[Any], Any]], inputs: Sequence[Any], repeats: int
) -> dict[str, list[float]]:
  """Seconds of each callable per pass over `inputs`, `repeats` passes.

  The callables take turns on every input (run them once before, to
  compile). Returns name -> one time per pass.
  """
  times = {name: [] for name in runs}
  for _ in range(repeats):
    total = dict.fromkeys(runs, 0.0)
    for x in inputs:
      for name, fn in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        total[name] += time.perf_counter() - start
    for name, seconds in total.items():
      times[name].append(seconds)
  return times
