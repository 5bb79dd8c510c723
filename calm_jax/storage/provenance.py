"""Provenance: fingerprints of everything that determines a decode.

A certified threshold holds for the decodes it was certified on: the same
parameters (backbone and exit classifier), model config and activation
dtype, vocabulary, task, split, examples, feature lengths and decoding
settings. Calibration records and cached decodes carry a fingerprint of all
of these; a cache entry is found only under an identical fingerprint, and a
record whose model fingerprint differs from the model dir's is refused with
the list of what changed. No JAX below the array digest, no TensorFlow.
"""

import hashlib
import json
from typing import Any
from typing import Iterator
from typing import Mapping
from typing import Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from calm_jax import errors


class ProvenanceError(errors.UserError, ValueError):
  """A record or output that does not belong to this model or run."""


def host_array(x) -> np.ndarray:
  """A leaf as one contiguous host array (gathered across processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def host_leaves(tree: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(path, host array) of every leaf of a pytree, in tree order."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield jax.tree_util.keystr(path), host_array(leaf)


def digest_tree(tree: Any) -> str:
  """sha256 of a pytree of arrays: every leaf's path, dtype, shape, bytes."""
  h = hashlib.sha256()
  for key, array in host_leaves(tree):
    h.update(key.encode())
    h.update(f'{array.dtype.str}{array.shape}'.encode())
    h.update(array.tobytes())
  return h.hexdigest()


def digest_file(path: str) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def canonical(obj: Any) -> str:
  """The one JSON text of `obj` that fingerprints hash."""
  return json.dumps(obj, sort_keys=True, separators=(',', ':'), default=str)


def same(stored: Any, current: Any) -> bool:
  """Whether two fingerprints are equal as JSON. A stored one was read back
  from JSON (a tuple came back a list), so `==` would refuse a record on
  the very dir it was made on."""
  return canonical(stored) == canonical(current)


DIGEST = 'digest'  # the key of a sealed JSON object's own sha256


def sealed(obj: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON object with its own digest: the sha256 of the canonical JSON of
  everything else in it (a reader checks it with `seal_intact`)."""
  body = {k: v for k, v in obj.items() if k != DIGEST}
  return {**body, DIGEST: hashlib.sha256(canonical(body).encode()).hexdigest()}


def seal_intact(obj: Mapping[str, Any]) -> bool:
  """False when a sealed object's content no longer matches its digest (a
  bit flipped, or a hand edit); True for one written without a seal."""
  return DIGEST not in obj or sealed(obj)[DIGEST] == obj[DIGEST]


def short_hash(obj: Any, length: int = 12) -> str:
  return hashlib.sha256(canonical(obj).encode()).hexdigest()[:length]


def _flatten(obj: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(obj, Mapping):
    out = {}
    for key, value in obj.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: obj}


def _show(value: Any) -> str:
  text = json.dumps(value, default=str)
  # Digests are long: their first 12 characters name them well enough.
  return text[:13] + '..."' if len(text) > 40 and text[0] == '"' else text


def changes(stored: Mapping, current: Mapping) -> list[str]:
  """'key: stored -> current' for every leaf that differs."""
  old, new = _flatten(stored), _flatten(current)
  return [
    f'{key}: {_show(old.get(key))} -> {_show(new.get(key))}'
    for key in sorted(set(old) | set(new))
    if not same(old.get(key), new.get(key))
  ]


def describe_changes(
  stored: Mapping, current: Mapping, limit: Optional[int] = 4
) -> str:
  found = changes(stored, current)
  shown = found if limit is None else found[:limit]
  more = len(found) - len(shown)
  return '; '.join(shown) + (f' (and {more} more)' if more > 0 else '')
