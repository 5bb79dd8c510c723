"""Decoding loops, free of model code.

The loops only see the model through `StepFns` (a Protocol): embed the
previous token, compute one decoder layer's self-attention keys/values for the
current position, run the rest of one layer, and apply the exit head. The
caller builds the callbacks (see `models.CalmModel.step_fns`), so the same
loop drives any model with this shape, or a fake one in tests.

Two loops share these callbacks:
- `static_decode`: every row runs every layer (the baseline), optionally
  recording the consistency oracle's exit layer;
- `early_exit_decode`: CALM. The decoder layers are unrolled in Python. For
  each layer, the K/V of the current position are computed for every row
  outside any branch and written to the cache: for a row that already exited,
  the state entering a skipped layer is its frozen exit state, so this write
  IS CALM's state propagation (the exit state copied to the skipped
  layers, which the paper found keeps quality where copying K/V does not).
  Only the rest of the layer runs under `lax.switch`, on the smallest
  static bucket of rows that holds every row still climbing (gathered, run,
  scattered back), or not at all.
  Keeping cache writes out of the branches avoids XLA:CPU copying the cache
  in each branch, which made exit@1 several times slower at long caches.

Conventions as in t5x: decoding starts from token 0 (pad doubles as BOS),
stops a row at EOS, and fills positions after EOS with 0.

Einsum/shape letters: b batch, t max decode length (cache length), h heads,
d head dim, e embed, v vocab.
"""

import dataclasses
from typing import Any
from typing import Optional
from typing import Protocol

import flax
import jax
import jax.numpy as jnp

from calm_jax import arguments
from calm_jax.decoding import confidence as confidence_lib
from calm_jax.decoding import thresholds

Array = jax.Array


class StepFns(Protocol):
  """What a decoding loop needs from a model, for one position."""

  num_layers: int

  def embed(self, tokens: Array) -> Array:
    """[b] previous tokens -> [b, 1, e] input of layer 0."""

  def layer_kv(
    self, layer: int, x: Array, position: Array
  ) -> tuple[Array, Array]:
    """Input of layer `layer` [b, g, e] at output positions `position` ->
    its self-attn K, V [b, g, h, d] (a model with rotary positions rotates
    them; T5 ignores the position).

    Positions, here and in `layer_step`: [] one position for every row
    (g = 1); [b] each row's own (g = 1); [b, g] each row's block of g
    consecutive positions (the speculative loop's verify pass).
    """

  def layer_step(
    self,
    layer: int,
    x: Array,
    keys: Array,
    values: Array,
    position: Array,
    rows: Optional[Array] = None,
  ) -> Array:
    """Rest of layer `layer` for x [r, 1, e] over its cache [r, t, h, d].

    `rows` [r] says which batch rows x holds (to pick their encoder
    context); None means all rows in order.
    """

  def exit_hidden(self, h: Array, layer: int | Array) -> Array:
    """The state an exit reads of layer `layer`'s output h [b, e] (1-based;
    0 is the embedding; an array [b]: per row): h itself, or a learned exit
    adapter's translation of it (the Llama family). Propagation never uses
    it: skipped layers see the raw exit state."""

  def logits(self, h: Array) -> Array:
    """Exit head: raw hidden state [b, e] -> logits [b, v]."""


@flax.struct.dataclass
class KVCache:
  """Self-attention cache, one entry per decoder layer."""

  keys: tuple[Array, ...]  # layers x [b, t, h, d]
  values: tuple[Array, ...]  # layers x [b, t, h, d]

  @classmethod
  def zeros(cls, num_layers: int, shape: tuple[int, ...], dtype) -> 'KVCache':
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(keys=zeros, values=zeros)

  def write(self, layer: int, position: Array, k: Array, v: Array) -> 'KVCache':
    """Stores k, v [b, g, h, d] from `position` on, in layer `layer`: one
    position for every row ([]), or each row's own ([b]: the speculative
    loop, whose rows advance by different counts)."""
    if jnp.ndim(position) == 0:
      put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
        cache, new.astype(cache.dtype), position, axis=1
      )
    else:
      put = lambda cache, new: jax.vmap(
        lambda c, n, p: jax.lax.dynamic_update_slice_in_dim(c, n, p, axis=0)
      )(cache, new.astype(cache.dtype), position)
    keys = list(self.keys)
    values = list(self.values)
    keys[layer] = put(keys[layer], k)
    values[layer] = put(values[layer], v)
    return KVCache(keys=tuple(keys), values=tuple(values))


def full_depth_layer(
  fns: StepFns, layer: int, x: Array, cache: KVCache, position: Array
) -> tuple[Array, KVCache]:
  """Runs one layer for every row: write its K/V, then attend and MLP."""
  k, v = fns.layer_kv(layer, x, position)
  cache = cache.write(layer, position, k, v)
  x = fns.layer_step(layer, x, cache.keys[layer], cache.values[layer], position)
  return x, cache


def finish_tokens(
  next_token: Array, done: Array, eos_id: int
) -> tuple[Array, Array]:
  """Pads rows that already ended and marks rows that end now."""
  next_token = jnp.where(done, 0, next_token)
  return next_token, done | (next_token == eos_id)


@flax.struct.dataclass
class DecodeOutput:
  tokens: Array  # [b, t] int32, 0 after EOS
  exit_layers: Array  # [b, t] int32, 1-based layer each token used; 0 = pad
  # [b, t] float32: the measure's value at the layer the token exited; NaN
  # for a token that ran through the top layer (no exit test is made there),
  # so every token of the static decoder is NaN too.
  confidences: Array
  layer_evals: Array  # [] int32: (row, layer) evaluations actually run
  # Per-row counts of the exact mode ({'passes': [b], 'accepted': [b],
  # ...}, see `speculative.SpecOutput`); None for the other loops.
  extras: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Token selection: greedy when temperature == 0."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


# Sampling draws from one PRNG key per row, made from the decode's key and
# the row's index in the global batch: a row's sample depends on neither its
# batch-mates nor how the batch is split over devices, so a decode on any
# mesh samples what one device samples.


def row_keys(rng: Array, batch_size: int, first_row: Any = 0) -> Array:
  """[b] keys (raw: [b, 2]), one per row, from the decode's key: row i's
  is the key folded with first_row + i, its index in the global batch (a
  'data' shard passes its first row). Keys already per row are returned
  as they are."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim > (0 if typed else 1):
    return rng
  return jax.vmap(lambda row: jax.random.fold_in(rng, row))(
    first_row + jnp.arange(batch_size)
  )


def fold_rows(keys: Array, data: Any) -> Array:
  """Each row's key folded with the same `data` (a position, a round)."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def uniform_rows(keys: Array, shape: tuple[int, ...]) -> Array:
  """[b, *shape] uniforms, each row from its own key."""
  return jax.vmap(lambda key: jax.random.uniform(key, shape))(keys)


def categorical_rows(keys: Array, logits: Array) -> Array:
  """[b] samples of [b, v] logits, each row from its own key."""
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def select_tokens(logits: Array, keys: Array, sampling: Sampling) -> Array:
  """[b, v] logits -> [b] tokens: argmax, or temperature/top-k/top-p sample
  (`keys`: one per row, or one key that `row_keys` spreads over them)."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  keys = row_keys(keys, logits.shape[0])
  return categorical_rows(keys, filtered_logits(logits, sampling))


def filtered_logits(logits: Array, sampling: Sampling) -> Array:
  """[..., v] logits a sample is drawn from: over the temperature, -inf
  outside the top k and outside the top-p nucleus."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  # A top_k of the vocabulary or more keeps every token (no filter).
  if 0 < sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (at least one token).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_index = jnp.sum(mass_before < sampling.top_p, axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[..., None], -1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


@flax.struct.dataclass
class LoopState:
  """Position loop state, shared by the static and early-exit decoders."""

  position: Array  # [] int32: index of the token being produced
  tokens: Array  # [b, t + 1] int32: column 0 is the start token
  done: Array  # [b] bool: row has emitted EOS
  cache: KVCache
  exit_layers: Array  # [b, t] int32
  confidences: Array  # [b, t] float32
  layer_evals: Array  # [] int32
  rng: Array  # [b] keys, one per row (`row_keys`)

  @classmethod
  def start(
    cls,
    num_layers: int,
    batch_size: int,
    max_length: int,
    cache_shape: tuple[int, int],
    cache_dtype,
    rng: Array,
    start_tokens: Optional[Array] = None,
  ) -> 'LoopState':
    """The state before position 0; `start_tokens` [b] is each row's first
    input (None: token 0, T5's start token)."""
    heads, head_dim = cache_shape
    tokens = jnp.zeros((batch_size, max_length + 1), jnp.int32)
    if start_tokens is not None:
      tokens = tokens.at[:, 0].set(start_tokens.astype(jnp.int32))
    return cls(
      position=jnp.zeros((), jnp.int32),
      tokens=tokens,
      done=jnp.zeros((batch_size,), bool),
      cache=KVCache.zeros(
        num_layers, (batch_size, max_length, heads, head_dim), cache_dtype
      ),
      exit_layers=jnp.zeros((batch_size, max_length), jnp.int32),
      confidences=jnp.zeros((batch_size, max_length), jnp.float32),
      layer_evals=jnp.zeros((), jnp.int32),
      rng=row_keys(rng, batch_size),
    )

  def advance(
    self,
    next_token: Array,
    cache: KVCache,
    exit_layer: Array,
    confidence: Array,
    layer_evals: Array,
    eos_id: int,
  ) -> 'LoopState':
    """Appends one position; rows that had ended get token 0 and layer 0."""
    next_token, done = finish_tokens(next_token, self.done, eos_id)
    put = lambda a, v: a.at[:, self.position].set(v)
    return self.replace(
      position=self.position + 1,
      tokens=self.tokens.at[:, self.position + 1].set(next_token),
      done=done,
      cache=cache,
      exit_layers=put(self.exit_layers, jnp.where(self.done, 0, exit_layer)),
      confidences=put(self.confidences, jnp.where(self.done, 0.0, confidence)),
      layer_evals=self.layer_evals + layer_evals,
      rng=fold_rows(self.rng, self.position),
    )

  def output(self) -> DecodeOutput:
    return DecodeOutput(
      tokens=self.tokens[:, 1:],
      exit_layers=self.exit_layers,
      confidences=self.confidences,
      layer_evals=self.layer_evals,
    )


def _run_positions(step, state: LoopState, max_length: int) -> DecodeOutput:
  running = lambda s: (s.position < max_length) & ~jnp.all(s.done)
  return jax.lax.while_loop(running, step, state).output()


def oracle_exit_layers(layer_logits: list[Array]) -> Array:
  """First 1-based layer whose argmax equals the top layer's, [b]."""
  predictions = jnp.stack([jnp.argmax(l, -1) for l in layer_logits])  # [L, b]
  agrees = predictions == predictions[-1:]
  return (jnp.argmax(agrees, axis=0) + 1).astype(jnp.int32)


def static_decode(
  fns: StepFns,
  *,
  batch_size: int,
  max_length: int,
  cache_shape: tuple[int, int],
  cache_dtype=jnp.float32,
  eos_id: int = 1,
  sampling: Sampling = Sampling(),
  rng: Optional[Array] = None,
  oracle: bool = False,
  start_tokens: Optional[Array] = None,
) -> DecodeOutput:
  """Full-depth decoding: every row runs every layer.

  With `oracle=True` it also records, per token, the consistency oracle's
  exit: the first layer whose argmax equals the full model's (computing every
  layer's logits, so for analysis only). The oracle's tokens are the full
  model's tokens, and the cache holds the true states of every layer.
  `start_tokens` [b]: each row's first input (None: token 0).
  """
  num_layers = fns.num_layers
  state = LoopState.start(
    num_layers,
    batch_size,
    max_length,
    cache_shape,
    cache_dtype,
    jax.random.PRNGKey(0) if rng is None else rng,
    start_tokens,
  )

  def step(s: LoopState) -> LoopState:
    x = fns.embed(s.tokens[:, s.position])
    cache, layer_logits = s.cache, []
    for layer in range(num_layers):
      x, cache = full_depth_layer(fns, layer, x, cache, s.position)
      if oracle and layer < num_layers - 1:
        layer_logits.append(fns.logits(fns.exit_hidden(x[:, 0], layer + 1)))
    logits = fns.logits(x[:, 0])
    exit_layer = (
      oracle_exit_layers(layer_logits + [logits])
      if oracle
      else jnp.full((batch_size,), num_layers, jnp.int32)
    )
    next_token = select_tokens(logits, s.rng, sampling)
    evals = jnp.sum(~s.done).astype(jnp.int32) * num_layers
    return s.advance(
      next_token,
      cache,
      exit_layer,
      jnp.full((batch_size,), jnp.nan, jnp.float32),
      evals,
      eos_id,
    )

  return _run_positions(step, state, max_length)


@dataclasses.dataclass(frozen=True)
class ExitConfig:
  """Static settings of the early-exit loop (they shape the compiled code).

  Attributes:
    confidence: a name from `confidence.MEASURES`.
    exit_layers: 1-based layers below the top at which a token may stop
      (see `thresholds.allowed_exit_layers`).
    tau: decay of the threshold over positions; None keeps it constant.
    bucket_sizes: row counts a layer may run on when only some rows still
      climb; None means the halvings of the batch (B, B/2, ..., 1). A single
      size (B,) is the original release's min-over-batch behaviour.
    propagation: what skipped layers' caches get for an exited token:
      'hidden' (CALM: K/V of the exit state), 'kv_copy' (the exit layer's own
      K/V, an ablation) or 'none' (zeros, an ablation).
    sampling: token selection.
  """

  confidence: str = 'softmax'
  exit_layers: tuple[int, ...] = ()
  tau: Optional[float] = None
  bucket_sizes: Optional[tuple[int, ...]] = None
  propagation: str = 'hidden'
  sampling: Sampling = Sampling()

  def __post_init__(self):
    confidence_lib.get(self.confidence)
    arguments.check(propagation=self.propagation)

  @classmethod
  def create(
    cls,
    num_layers: int,
    *,
    confidence: str,
    first_exit: int = 1,
    exit_interval: int = 1,
    min_exit: int = 1,
    layers: Optional[tuple[int, ...]] = None,
    **kwargs,
  ) -> 'ExitConfig':
    """Config whose exit layers follow the grid (or the given `layers`)
    and the measure's floor; the top layer is never listed."""
    floor = max(min_exit, confidence_lib.lowest_exit_layer(confidence))
    allowed = thresholds.allowed_exit_layers(
      num_layers,
      first_exit=first_exit,
      exit_interval=exit_interval,
      min_exit=floor,
    )
    if layers is not None:
      allowed = tuple(l for l in allowed if l in layers)
    return cls(confidence=confidence, exit_layers=allowed, **kwargs)

  def fingerprint(self) -> dict:
    """The settings that change what this config decodes (the bucket sizes
    change only the speed)."""
    return {
      'confidence': self.confidence,
      'exit_layers': list(self.exit_layers),
      'tau': self.tau,
      'propagation': self.propagation,
      'sampling': dataclasses.asdict(self.sampling),
    }

  def for_threshold(self, threshold: float) -> 'ExitConfig':
    """No confidence checks when the threshold disables exits: they could
    never pass, and the softmax measure would pay a vocabulary head at every
    layer for nothing."""
    if thresholds.exits_disabled(threshold):
      return dataclasses.replace(self, exit_layers=())
    return self

  def buckets(self, batch_size: int) -> tuple[int, ...]:
    """Ascending bucket sizes, always including the whole batch."""
    if self.bucket_sizes is None:
      sizes, size = {batch_size}, batch_size
      while size > 1:
        size = (size + 1) // 2
        sizes.add(size)
    else:
      sizes = {s for s in self.bucket_sizes if 0 < s < batch_size}
      sizes.add(batch_size)
    return tuple(sorted(sizes))


@flax.struct.dataclass
class Climb:
  """One position's rows while they climb the decoder layers."""

  hidden: Array  # [b, 1, e] latest state; frozen at the exit once exited
  active: Array  # [b] bool: row still climbing
  exit_layer: Array  # [b] int32: layer it stopped at, 0 while climbing
  confidence: Array  # [b] float32: latest confidence, frozen at the exit
  token: Array  # [b] int32: argmax of the exit's logits if known, else -1
  exit_kv: tuple[Array, Array]  # [b, 1, h, d] K/V of the last layer run
  evals: Array  # [] int32: rows run so far at this position


def _propagated_kv(
  climb: Climb, k: Array, v: Array, propagation: str
) -> tuple[Array, Array]:
  """K/V written for this layer: computed ones, or an ablation for exited rows.

  Under 'hidden' nothing changes: k, v were computed from the frozen exit
  state, which is CALM's propagation.
  """
  if propagation == 'hidden':
    return k, v
  stopped = ~climb.active[:, None, None, None]
  if propagation == 'kv_copy':
    return (
      jnp.where(stopped, climb.exit_kv[0], k),
      jnp.where(stopped, climb.exit_kv[1], v),
    )
  return jnp.where(stopped, 0.0, k), jnp.where(stopped, 0.0, v)


def _layer_on_rows(
  fns: StepFns,
  cfg: ExitConfig,
  layer: int,
  check: bool,
  climb: Climb,
  cache: KVCache,
  position: Array,
  rows: Optional[Array],
  classifier: Any,
):
  """Layer `layer` (and its confidence if `check`) on `rows` (None = all).

  Returns the new states [r, 1, e], confidences [r] and exit tokens [r]
  (-1 where the measure gives no logits).
  """
  take = (lambda a: a) if rows is None else (lambda a: a[rows])
  x = take(climb.hidden)
  out = fns.layer_step(
    layer,
    x,
    take(cache.keys[layer]),
    take(cache.values[layer]),
    position if jnp.ndim(position) == 0 else take(position),
    rows,
  )
  size = x.shape[0]
  if not check:
    return (
      out,
      jnp.zeros((size,), jnp.float32),
      jnp.full((size,), -1, jnp.int32),
    )
  measure = confidence_lib.get(cfg.confidence)
  conf, logits = measure(
    fns.exit_hidden(out[:, 0], layer + 1),
    fns.exit_hidden(x[:, 0], layer),
    fns.logits,
    classifier,
  )
  token = (
    jnp.full((size,), -1, jnp.int32)
    if logits is None
    else jnp.argmax(logits, -1).astype(jnp.int32)
  )
  return out, conf.astype(jnp.float32), token


def _bucketed_layer(
  fns: StepFns,
  cfg: ExitConfig,
  layer: int,
  check: bool,
  climb: Climb,
  cache: KVCache,
  position: Array,
  classifier: Any,
):
  """Runs the layer on the smallest bucket holding every climbing row.

  Branch 0 skips the layer (no row climbs). A full-batch bucket runs in
  place; smaller ones gather the climbing rows first (stable order), run,
  and scatter back. Rows outside `active` come back unchanged or as filler.
  """
  batch = climb.hidden.shape[0]
  sizes = cfg.buckets(batch)
  num_active = jnp.sum(climb.active)
  order = jnp.argsort(~climb.active, stable=True)  # climbing rows first

  def skip():
    return (
      climb.hidden,
      jnp.zeros((batch,), jnp.float32),
      jnp.full((batch,), -1, jnp.int32),
    )

  def bucket(size):
    def run():
      rows = None if size == batch else order[:size]
      out, conf, token = _layer_on_rows(
        fns, cfg, layer, check, climb, cache, position, rows, classifier
      )
      if rows is None:
        return out, conf, token
      full_conf, full_token = skip()[1:]
      return (
        climb.hidden.at[rows].set(out),
        full_conf.at[rows].set(conf),
        full_token.at[rows].set(token),
      )

    return run

  index = jnp.where(
    num_active == 0, 0, 1 + jnp.sum(jnp.asarray(sizes) < num_active)
  )
  return jax.lax.switch(index, [skip] + [bucket(s) for s in sizes])


def climb_layer(
  fns: StepFns,
  cfg: ExitConfig,
  layer: int,
  climb: Climb,
  cache: KVCache,
  position: Array,
  threshold: Array,
  classifier: Any,
  forced: Optional[Array] = None,
) -> tuple[Climb, KVCache]:
  """K/V write for every row, then the layer on climbing rows, then exits.

  `forced` [b] (benchmarks only) replaces the confidence test: a row exits
  at the first checked layer >= its forced layer; confidences are still
  computed, so the cost is the real one.
  """
  k, v = fns.layer_kv(layer, climb.hidden, position)
  k, v = _propagated_kv(climb, k, v, cfg.propagation)
  cache = cache.write(layer, position, k, v)
  check = (layer + 1) in cfg.exit_layers
  out, conf, token = _bucketed_layer(
    fns, cfg, layer, check, climb, cache, position, classifier
  )
  active = climb.active
  ran = active[:, None, None]
  passes = conf >= threshold if forced is None else layer + 1 >= forced
  exits = active & passes if check else jnp.zeros_like(active)
  climb = climb.replace(
    hidden=jnp.where(ran, out, climb.hidden),
    active=active & ~exits,
    exit_layer=jnp.where(exits, layer + 1, climb.exit_layer),
    confidence=jnp.where(active, conf, climb.confidence)
    if check
    else climb.confidence,
    token=jnp.where(exits, token, climb.token),
    exit_kv=(
      jnp.where(ran[..., None], k, climb.exit_kv[0]),
      jnp.where(ran[..., None], v, climb.exit_kv[1]),
    ),
    evals=climb.evals + jnp.sum(active).astype(jnp.int32),
  )
  return climb, cache


def emit_tokens(
  fns: StepFns, cfg: ExitConfig, climb: Climb, rng: Array
) -> Array:
  """Next tokens: reused exit argmaxes where known, else the exit-state head.

  Every row's `hidden` is its exit state, so one head evaluation gives each
  row its own exit layer's prediction; it is skipped when every row already
  has its token from the softmax measure.
  """
  # Each row reads its own exit layer (0 while climbing: it reached the top).
  exits = jnp.where(climb.exit_layer == 0, fns.num_layers, climb.exit_layer)
  head = lambda: select_tokens(
    fns.logits(fns.exit_hidden(climb.hidden[:, 0], exits)), rng, cfg.sampling
  )
  if not cfg.sampling.greedy:
    return head()
  known = climb.token >= 0
  return jnp.where(
    known, climb.token, jax.lax.cond(jnp.all(known), lambda: climb.token, head)
  )


def early_exit_decode(
  fns: StepFns,
  cfg: ExitConfig,
  *,
  threshold: Array,
  batch_size: int,
  max_length: int,
  cache_shape: tuple[int, int],
  cache_dtype=jnp.float32,
  eos_id: int = 1,
  classifier: Any = None,
  rng: Optional[Array] = None,
  forced_exit_layers: Optional[Array] = None,
  start_tokens: Optional[Array] = None,
) -> DecodeOutput:
  """CALM decoding: each row of each position stops at its own exit layer.

  Args:
    fns: the model's step callbacks.
    cfg: static exit settings.
    threshold: base threshold lambda (a traced scalar: changing it does not
      recompile); above 1.0 disables exits.
    batch_size, max_length, cache_shape, cache_dtype, eos_id: as in
      `static_decode`.
    classifier: parameters of the learned exit classifier, if used.
    rng: PRNG key for sampling.
    forced_exit_layers: [b, t] exit layer per token, overriding the
      confidence test (for benchmarks of fixed exit patterns).
    start_tokens: [b] each row's first input (None: token 0).
  """
  num_layers = fns.num_layers
  state = LoopState.start(
    num_layers,
    batch_size,
    max_length,
    cache_shape,
    cache_dtype,
    jax.random.PRNGKey(0) if rng is None else rng,
    start_tokens,
  )
  threshold = jnp.asarray(threshold, jnp.float32)

  def step(s: LoopState) -> LoopState:
    x = fns.embed(s.tokens[:, s.position])
    zeros_kv = jnp.zeros((batch_size, 1, *cache_shape), cache_dtype)
    climb = Climb(
      hidden=x,
      active=~s.done,
      exit_layer=jnp.zeros((batch_size,), jnp.int32),
      confidence=jnp.zeros((batch_size,), jnp.float32),
      token=jnp.full((batch_size,), -1, jnp.int32),
      exit_kv=(zeros_kv, zeros_kv),
      evals=jnp.zeros((), jnp.int32),
    )
    bound = thresholds.threshold_at(threshold, s.position, max_length, cfg.tau)
    forced = (
      None if forced_exit_layers is None else forced_exit_layers[:, s.position]
    )
    cache = s.cache
    for layer in range(num_layers):
      climb, cache = climb_layer(
        fns, cfg, layer, climb, cache, s.position, bound, classifier, forced
      )
    reached_top = climb.exit_layer == 0
    exit_layer = jnp.where(reached_top, num_layers, climb.exit_layer)
    confidence = jnp.where(reached_top, jnp.nan, climb.confidence)
    next_token = emit_tokens(fns, cfg, climb, s.rng)
    return s.advance(
      next_token, cache, exit_layer, confidence, climb.evals, eos_id
    )

  return _run_positions(step, state, max_length)
