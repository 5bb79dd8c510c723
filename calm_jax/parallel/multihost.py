"""Several processes (hosts) as one JAX system: start-up, and gathering.

Each process reads its own shard of the data (examples k*n + i go to
process i of n: `data.process_shard`), runs the same programs on the global
mesh, and contributes its rows; per-example outputs come back to every
process in input order through `gather_in_input_order`. Only the primary
process (index 0) writes files.

With one process every function here is the identity, and costs nothing.
No TensorFlow, no gin.
"""

import json
import os
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from calm_jax import errors

# Environment variables read when gin leaves the setting unset.
COORDINATOR_ENV = 'CALM_COORDINATOR_ADDRESS'  # host:port of process 0
BIND_ENV = 'CALM_COORDINATOR_BIND_ADDRESS'  # what process 0 listens on
NUM_PROCESSES_ENV = 'CALM_NUM_PROCESSES'
PROCESS_ID_ENV = 'CALM_PROCESS_ID'


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  coordinator_bind_address: Optional[str] = None,
  auto: bool = False,
) -> bool:
  """Joins a multi-process JAX system; True if it did.

  Arguments left None come from the CALM_* environment variables. With no
  coordinator address and `auto` False this is a single-process run and
  nothing happens. `auto` lets JAX find the cluster itself (TPU pod slices,
  SLURM, Open MPI).
  """
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
  if not coordinator_address and not auto:
    return False
  kwargs = {}
  if coordinator_address:
    num_processes = (
      num_processes
      if num_processes is not None
      else _env_int(NUM_PROCESSES_ENV)
    )
    process_id = (
      process_id if process_id is not None else _env_int(PROCESS_ID_ENV)
    )
    if num_processes is None or process_id is None:
      raise errors.SettingError(
        f'a coordinator address needs the process count and this '
        f'process id: set {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} (or '
        'calm_jax.distributed.num_processes / process_id)'
      )
    if not 0 <= process_id < num_processes:
      raise errors.SettingError(
        f'process id {process_id} is not in [0, {num_processes})'
      )
    kwargs = dict(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
    bind = coordinator_bind_address or os.environ.get(BIND_ENV)
    if bind:
      kwargs['coordinator_bind_address'] = bind
  jax.distributed.initialize(**kwargs)
  return True


def is_primary() -> bool:
  """Whether this process writes the job's files."""
  return jax.process_index() == 0


def local_batch_size(global_batch_size: int) -> int:
  """This process's rows of each global batch (processes split it evenly)."""
  processes = jax.process_count()
  if global_batch_size % processes:
    raise errors.SettingError(
      f'batch size {global_batch_size} does not split over '
      f'{processes} processes'
    )
  return global_batch_size // processes


def process_max(value: int) -> int:
  """The largest of every process's `value` (all processes get it)."""
  if jax.process_count() == 1:
    return int(value)
  values = multihost_utils.process_allgather(np.asarray(value, np.int64))
  return int(np.max(values))


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process: for decisions that must not
  differ (whether to run a collective program at all)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def allgather_json(obj: Any) -> list[Any]:
  """Every process's `obj` (JSON-serialisable), in process order."""
  if jax.process_count() == 1:
    return [obj]
  payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(
    multihost_utils.process_allgather(np.asarray(payload.size, np.int64))
  )  # [processes]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: payload.size] = payload
  rows = multihost_utils.process_allgather(padded)  # [processes, length]
  return [
    json.loads(bytes(row[:size]).decode())
    for row, size in zip(np.asarray(rows), sizes)
  ]


def from_primary(read: Callable[[], Any]) -> Any:
  """`read()` run on the primary process only, its result on every process
  (files that only the primary is sure to see)."""
  if jax.process_count() == 1:
    return read()
  return allgather_json(read() if is_primary() else None)[0]


def interleave(shards: Sequence[Sequence[Any]]) -> list[Any]:
  """Undoes the k*n + i sharding: shard i's k-th item is item k*n + i."""
  out = []
  for k in range(max((len(s) for s in shards), default=0)):
    out += [shard[k] for shard in shards if k < len(shard)]
  return out


def gather_in_input_order(local_items: Sequence[Any]) -> list[Any]:
  """This process's per-example outputs -> everyone's, in input order."""
  return interleave(allgather_json(list(local_items)))


def host_rows(array: jax.Array) -> np.ndarray:
  """The rows of a 'data'-sharded global array that this process fed in
  (with one process: the whole array), as numpy."""
  if array.is_fully_addressable or array.is_fully_replicated:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
  rows, seen = [], set()
  for shard in shards:
    if shard.index[0].start not in seen:  # 'model' replicas hold the same rows
      seen.add(shard.index[0].start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)
