"""The decode layer: one loaded model's compiled decode programs.

`Decoder` sits below both the Python API (`calm_jax.api.CalmLM`) and the
evaluation engine; the benchmark times through it. It asks a mode for its
program (`modes.Mode.build`), jits it once per (program, length), compiles
it ahead of time once per argument shape with a notice saying what and how
long, and runs it on host batches: on one device, or on a mesh where every
'data' shard runs its own loop over its rows (parameters replicated over
'data', split over 'model' by the partitioning rules; greedy results equal
the one-device decode, sampling folds the shard index into the rng).

The caches belong to the instance: dropping a Decoder frees its programs,
and nothing outlives the model it was built for.
"""

import dataclasses
import hashlib
import time
from typing import Any
from typing import Callable
from typing import Hashable
from typing import Optional
from typing import Sequence
import weakref

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from calm_jax import console
from calm_jax.decoding import loops
from calm_jax.inference import limits
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.parallel import multihost
from calm_jax.parallel import partitioning
from calm_jax.storage import provenance

# Per 'data' shard: the decode's rows, and the summed evaluation count.
_SHARDED_OUTPUT = loops.DecodeOutput(
  tokens=P('data'),
  exit_layers=P('data'),
  confidences=P('data'),
  layer_evals=P(),
  extras=P('data'),  # the exact mode's per-row counts (None otherwise)
)


@dataclasses.dataclass(frozen=True)
class Runner:
  """A compiled decode with every argument but the inputs bound."""

  call: Callable[[Any], loops.DecodeOutput]
  compile_seconds: float  # of its compile (0 if it was compiled before)

  def __call__(self, inputs: Any) -> loops.DecodeOutput:
    """Dispatches the decode of `inputs` (not waited for)."""
    return self.call(inputs)


def token_confidences(values) -> list[Optional[float]]:
  """Per-token confidences for JSON: 4 decimals, None where no exit test
  decided the token (it ran through the top layer)."""
  return [None if np.isnan(c) else round(float(c), 4) for c in values]


def jit_program(model: Any, program: modes.Program, mesh=None) -> Callable:
  """A mode's program over encoder tokens, jitted: (params, classifier,
  encoder tokens [b, s], threshold, rng, forced) -> DecodeOutput. On a
  mesh, each 'data' shard encodes and decodes its own rows (shard_map over
  'data'; 'model' stays under the automatic partitioner) and the
  evaluation count is summed. What `Decoder` runs and the TPU planner
  compiles."""

  def decode(params, classifier, encoder_tokens, threshold, rng, forced):
    # One sampling key per row, from the row's index in the global batch
    # (`loops.row_keys`): each row samples the same on any mesh.
    rows = encoder_tokens.shape[0]
    first_row = jax.lax.axis_index('data') * rows if mesh is not None else 0
    keys = loops.row_keys(rng, rows, first_row)
    context = model.encode_context(params, encoder_tokens)
    return program(params, classifier, context, threshold, keys, forced)

  if mesh is None:
    return jax.jit(decode)

  def decode_shard(params, classifier, encoder_tokens, threshold, rng, forced):
    out = decode(params, classifier, encoder_tokens, threshold, rng, forced)
    return out.replace(layer_evals=jax.lax.psum(out.layer_evals, 'data'))

  return partitioning.per_data_shard(
    decode_shard,
    mesh,
    in_specs=(P(), P(), P('data'), P(), P(), P('data')),
    out_specs=_SHARDED_OUTPUT,
  )


class Decoder:
  """Compiles and runs decode programs of one `LoadedModel`."""

  def __init__(
    self,
    model: loaded_lib.LoadedModel,
    *,
    eos_id: Optional[int] = None,
    contexts: Optional['ContextMemo'] = None,
  ):
    """`eos_id` None: the model's vocabulary's (T5's 1 without one).
    `contexts`: keep the encoded contexts of decoded inputs there, so
    that decoding the same inputs again (another mode, another threshold)
    skips the encoder or prompt prefill (one device only)."""
    self.model = model
    self.eos_id = model.eos_id if eos_id is None else eos_id
    self.mesh = model.mesh if model.sharded else None
    if contexts is not None and self.mesh is not None:
      raise ValueError('a context memo serves one-device decoders only')
    self.contexts = contexts
    self._programs: dict[Hashable, Callable] = {}
    self._compiled: dict[Hashable, Any] = {}

  # -- programs --
  def program(
    self,
    mode: modes.Mode,
    max_length: int,
    *,
    encoded: bool = False,
    eos_id: Optional[int] = None,
  ) -> Callable:
    """The jitted program of `mode`. Its arguments are (params,
    classifier, encoder tokens [b, s], threshold, rng, forced); with
    `encoded`, the encoded context (`model.encode_context`) replaces the
    encoder tokens, so that the encoder runs outside it (the benchmark
    times the decode loop alone; one device only)."""
    eos_id = self.eos_id if eos_id is None else eos_id
    key = (mode.program_key(), max_length, encoded, eos_id)
    if key not in self._programs:
      self._programs[key] = self._jit(
        mode.build(self.model.model, max_length, eos_id), encoded
      )
    return self._programs[key]

  def _jit(self, program: modes.Program, encoded: bool) -> Callable:
    if encoded:
      if self.mesh is not None:
        raise ValueError('programs over an encoded context run on one device')
      return jax.jit(program)
    return jit_program(self.model.model, program, self.mesh)

  def compiled(self, fn: Callable, args: tuple, what: str) -> tuple[Any, float]:
    """`fn` compiled for the shapes of `args` (announced the first time),
    and the seconds this call spent compiling (0 if it was cached)."""
    shapes = tuple(
      jax.tree_util.tree_map(
        lambda x: (getattr(x, 'shape', ()), str(getattr(x, 'dtype', ''))),
        args,
        is_leaf=lambda x: x is None,
      )
    )
    key = (fn, str(shapes))
    if key in self._compiled:
      return self._compiled[key], 0.0
    start = time.perf_counter()
    with console.compiling(what):
      self._compiled[key] = fn.lower(*args).compile()
    return self._compiled[key], time.perf_counter() - start

  # -- arguments --
  def arguments(
    self,
    mode: modes.Mode,
    inputs: Any,
    *,
    seed: int = 0,
    max_length: int,
    indices: Sequence[int] = (),
  ) -> tuple:
    """The program's arguments for host `inputs` (encoder tokens [b, s],
    or an encoded context), placed on the mesh when there is one."""
    rows = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    if isinstance(inputs, np.ndarray):  # encoder tokens, not a context
      size = limits.DecodeSize.of(mode, rows, inputs.shape[1], max_length)
      devices = self.mesh.size if self.mesh is not None else 1
      limits.check(self.model.config, size, devices=devices)
    forced = mode.forced_layers(indices, (rows, max_length))
    classifier = (
      self.model.classifier_for('classifier') if mode.uses_classifier else None
    )
    return (
      self.model.params,
      classifier,
      self._place(inputs),
      self._put(np.float32(mode.threshold)),
      self._put(jax.random.PRNGKey(seed)),
      self._place(forced),
    )

  def _place(self, x):
    if self.mesh is not None:
      return partitioning.global_batch(x, self.mesh)
    return jax.tree_util.tree_map(jnp.asarray, x)

  def _put(self, x):
    return partitioning.replicate(x, self.mesh) if self.mesh else x

  def fetch(self, out: loops.DecodeOutput) -> loops.DecodeOutput:
    """A program's output as host arrays of this process's rows."""
    get = multihost.host_rows if self.mesh else np.asarray
    return jax.tree_util.tree_map(get, out)

  # -- running --
  def runner(
    self,
    mode: modes.Mode,
    example_inputs: Any,
    *,
    max_length: int,
    encoded: bool = False,
    eos_id: Optional[int] = None,
    seed: int = 0,
    indices: Sequence[int] = (),
  ) -> Runner:
    """A compiled decode for inputs shaped like `example_inputs`, every
    other argument bound: what timing loops call."""
    fn = self.program(mode, max_length, encoded=encoded, eos_id=eos_id)
    args = self.arguments(
      mode, example_inputs, seed=seed, max_length=max_length, indices=indices
    )
    rows = jax.tree_util.tree_leaves(example_inputs)[0].shape[0]
    compiled, seconds = self.compiled(
      fn, args, f'{mode.describe()} (batch {rows}, length {max_length})'
    )
    params, classifier, _, threshold, rng, forced = args
    return Runner(
      lambda inputs: compiled(
        params, classifier, self._place(inputs), threshold, rng, forced
      ),
      seconds,
    )

  def _compiled_decode(
    self, mode: modes.Mode, args: tuple, max_length: int
  ) -> Any:
    rows = jax.tree_util.tree_leaves(args[2])[0].shape[0]
    return self.compiled(
      self.program(mode, max_length, encoded=self.contexts is not None),
      args,
      f'{mode.describe()} (batch {rows}, length {max_length})',
    )[0]

  def encode(self, encoder_tokens: np.ndarray) -> Any:
    """The encoded context of encoder tokens [b, s] (T5's encoder output,
    a decoder-only model's prefilled prompt): what programs built with
    `encoded=True` take (one device)."""
    encode, _ = self.compiled(
      self._encoder(),
      (self.model.params, jnp.asarray(encoder_tokens)),
      f'encoder (batch {encoder_tokens.shape[0]})',
    )
    return encode(self.model.params, jnp.asarray(encoder_tokens))

  def _program_inputs(self, encoder_tokens: np.ndarray) -> Any:
    """What a program takes for these encoder tokens: the tokens, or with
    a context memo their encoded context (encoded once per input)."""
    if self.contexts is None:
      return encoder_tokens
    return self.contexts.get(
      self.model, encoder_tokens, lambda: self.encode(encoder_tokens)
    )

  def _encoder(self) -> Callable:
    key = ('encode_context',)
    if key not in self._programs:
      self._programs[key] = jax.jit(self.model.model.encode_context)
    return self._programs[key]

  def prepare(
    self, mode: modes.Mode, encoder_tokens: np.ndarray, *, max_length: int
  ) -> None:
    """Compiles the decode of inputs shaped like `encoder_tokens` now, so
    that a timed decode holds no compile."""
    args = self.arguments(
      mode, self._program_inputs(encoder_tokens), max_length=max_length
    )
    self._compiled_decode(mode, args, max_length)

  def decode(
    self,
    mode: modes.Mode,
    encoder_tokens: np.ndarray,
    *,
    max_length: int,
    seed: int = 0,
    indices: Sequence[int] = (),
  ) -> loops.DecodeOutput:
    """Decodes host encoder tokens [b, s] (`indices`: the examples of the
    rows, for modes that force per-example exits); host outputs."""
    args = self.arguments(
      mode,
      self._program_inputs(encoder_tokens),
      seed=seed,
      max_length=max_length,
      indices=indices,
    )
    return self.fetch(self._compiled_decode(mode, args, max_length)(*args))

  def layer_logits(
    self, encoder_tokens: np.ndarray, target_tokens: np.ndarray
  ) -> jax.Array:
    """Teacher-forced logits of every layer's exit at each target position
    [L, b, t, v] (`model.target_logits`)."""
    model = self.model.model
    key = ('layer_logits',)
    if key not in self._programs:
      self._programs[key] = jax.jit(model.target_logits)
    args = (
      self.model.params,
      jnp.asarray(encoder_tokens),
      jnp.asarray(target_tokens),
    )
    compiled, _ = self.compiled(
      self._programs[key],
      args,
      f'all-layer logits (batch {len(encoder_tokens)})',
    )
    return compiled(*args)


class ContextMemo:
  """Encoded contexts (T5's encoder output, a decoder-only model's
  prefilled prompt cache) of recently decoded inputs, up to a byte budget,
  oldest dropped first. Keyed by the inputs' bytes and the full-depth
  fingerprint of the model (config, dtype, parameters), so decoders of
  one backbone may share it: exit adapters and classifiers do not change
  the context."""

  def __init__(self, max_bytes: int = 2 << 30):
    self.max_bytes = max_bytes
    self._entries: dict[tuple[str, bytes], Any] = {}  # oldest first
    self._sizes: dict[tuple[str, bytes], int] = {}
    # Keys by model object, dropped with it (an id could be reused).
    self._models = weakref.WeakKeyDictionary()
    self.hits = self.misses = 0

  def _model_key(self, model: loaded_lib.LoadedModel) -> str:
    if model not in self._models:
      self._models[model] = provenance.short_hash(model.fingerprint('full'), 16)
    return self._models[model]

  def get(
    self,
    model: loaded_lib.LoadedModel,
    encoder_tokens: np.ndarray,
    encode: Callable[[], Any],
  ) -> Any:
    """The context of `encoder_tokens` under `model`, from `encode()` the
    first time."""
    tokens = np.ascontiguousarray(encoder_tokens)
    key = (
      self._model_key(model),
      hashlib.sha256(
        repr((tokens.shape, tokens.dtype.str)).encode() + tokens.tobytes()
      ).digest(),
    )
    if key in self._entries:
      self.hits += 1
      self._entries[key] = self._entries.pop(key)  # now the newest
      return self._entries[key]
    self.misses += 1
    context = encode()
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(context))
    while self._entries and sum(self._sizes.values()) + size > self.max_bytes:
      oldest = next(iter(self._entries))
      del self._entries[oldest], self._sizes[oldest]
    if size <= self.max_bytes:
      self._entries[key], self._sizes[key] = context, size
    return context
