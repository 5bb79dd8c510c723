"""The exact mode: self-speculative decoding with the early-exit decoder as
the draft and the full decoder as the verifier, per row in a batch.

One `lax.while_loop` of rounds. In each round every row
1. drafts up to `gamma` tokens with the early-exit decoder (any confidence
   measure and threshold, or every token forced to one exit layer), one
   position at a time from its own position; a row stops drafting early
   when its draft confidence falls below `min_confidence`;
2. verifies them in one full-depth pass over its positions pos .. pos +
   gamma (the last accepted token and the drafts as inputs): every layer
   writes its true keys/values for those positions first, then attends,
   so the cache entries the draft wrote there are overwritten before any
   later step reads them;
3. accepts the longest prefix of drafts that equals the full model's
   choice, plus the full model's own next token (greedy), or, sampling,
   each draft x with probability min(1, p(x) / q(x)) and on the first
   rejection a token from normalise(max(0, p - q)) (Leviathan et al. 2023),
   so that the output is exactly the full model's: its greedy tokens, or
   its sampling distribution.
Rows advance by different counts (each keeps its own position); EOS inside
the accepted tokens ends the row, and no row goes past `max_length`.

Loop states are `flax.struct.dataclass`es; shapes: b batch, T token buffer
(max_length + gamma + 1), g gamma, v vocab.
"""

import dataclasses
from typing import Any
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from calm_jax.decoding import loops
from calm_jax.decoding import thresholds

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DraftConfig:
  """How the draft proposes tokens.

  Attributes:
    exits: the early-exit settings of the draft (measure, exit layers,
      propagation, sampling); with `forced_layer`, every token stops there.
    gamma: drafted tokens per round at most.
    forced_layer: a fixed exit layer instead of the confidence test.
    min_confidence: a row stops drafting once its draft's confidence is
      below it (0: always `gamma` drafts).
  """

  exits: loops.ExitConfig
  gamma: int = 4
  forced_layer: Optional[int] = None
  min_confidence: float = 0.0

  def fingerprint(self) -> dict:
    return {
      'draft': self.exits.fingerprint(),
      'gamma': self.gamma,
      'forced_layer': self.forced_layer,
      'min_confidence': self.min_confidence,
    }


@flax.struct.dataclass
class SpecOutput:
  tokens: Array  # [b, t] int32, 0 after EOS
  passes: Array  # [b] int32: verify passes of the row
  accepted: Array  # [b] int32: drafted tokens the verifier accepted
  drafted: Array  # [b] int32: tokens drafted
  draft_layers: Array  # [b] int32: layers run by drafts (every layer climbed)
  verify_layers: Array  # [b] int32: layers run by verify passes
  near_ties: Array  # [b] int32: emitted tokens whose top-2 gap was < 1e-4


# SpecOutput's per-row counts: zero at the start, the decode output's extras.
COUNTS = (
  'passes',
  'accepted',
  'drafted',
  'draft_layers',
  'verify_layers',
  'near_ties',
)


@flax.struct.dataclass
class SpecState:
  tokens: Array  # [b, T] emitted tokens
  length: Array  # [b] tokens emitted (the position of the next input)
  last: Array  # [b] the last emitted token (the start token at first)
  done: Array  # [b] bool: ended (EOS or max_length)
  cache: loops.KVCache  # layers x [b, T, h, d]
  passes: Array  # [b]
  accepted: Array  # [b]
  drafted: Array  # [b]
  draft_layers: Array  # [b]
  verify_layers: Array  # [b]
  near_ties: Array  # [b]
  rng: Array  # [b] keys, one per row (`loops.row_keys`)


@flax.struct.dataclass
class Draft:
  """One round's drafts."""

  tokens: Array  # [b, g]
  probs: Array  # [b, g, v] the draft's distribution (sampling), else [b, g, 1]
  count: Array  # [b] drafts made before the confidence bound stopped it
  layers: Array  # [b] layers the drafts ran
  cache: loops.KVCache


def _draft_step(
  fns, cfg: DraftConfig, cache, token, position, threshold, classifier, rng
):
  """One drafted position per row: the early-exit climb from `token`.

  Returns the drafted token [b], its distribution [b, v] when sampling
  (else [b, 1]), its confidence [b] (1 for a row that reached the top), the
  layers each row ran [b] and the cache.
  """
  batch = token.shape[0]
  zeros_kv = jnp.zeros(
    (batch, 1, *cache.keys[0].shape[2:]), cache.keys[0].dtype
  )
  climb = loops.Climb(
    hidden=fns.embed(token),
    active=jnp.ones((batch,), bool),
    exit_layer=jnp.zeros((batch,), jnp.int32),
    confidence=jnp.zeros((batch,), jnp.float32),
    token=jnp.full((batch,), -1, jnp.int32),
    exit_kv=(zeros_kv, zeros_kv),
    evals=jnp.zeros((), jnp.int32),
  )
  forced = (
    None
    if cfg.forced_layer is None
    else jnp.full((batch,), cfg.forced_layer, jnp.int32)
  )
  layers = jnp.zeros((batch,), jnp.int32)
  for layer in range(fns.num_layers):
    layers = layers + climb.active
    climb, cache = loops.climb_layer(
      fns,
      cfg.exits,
      layer,
      climb,
      cache,
      position,
      threshold,
      classifier,
      forced,
    )
  confidence = jnp.where(climb.exit_layer == 0, 1.0, climb.confidence)
  sampling = cfg.exits.sampling
  if sampling.greedy:  # the exits' own argmax, reused where known
    drafted = loops.emit_tokens(fns, cfg.exits, climb, rng)
    return drafted, jnp.zeros((batch, 1)), confidence, layers, cache
  exits = jnp.where(climb.exit_layer == 0, fns.num_layers, climb.exit_layer)
  logits = fns.logits(fns.exit_hidden(climb.hidden[:, 0], exits))
  return (
    loops.select_tokens(logits, rng, sampling),
    _distribution(logits, sampling),
    confidence,
    layers,
    cache,
  )


def draft(
  fns,
  cfg: DraftConfig,
  state: SpecState,
  threshold: Array,
  classifier: Any,
  max_length: int,
) -> Draft:
  """Up to gamma drafted tokens per row, from each row's own position."""
  token, cache, going = state.last, state.cache, ~state.done
  tokens, probs, count = [], [], jnp.zeros_like(state.length)
  layers = jnp.zeros_like(state.length)
  for j in range(cfg.gamma):
    position = state.length + j
    bound = thresholds.threshold_at(
      threshold, position, max_length, cfg.exits.tau
    )
    token, q, confidence, ran, cache = _draft_step(
      fns,
      cfg,
      cache,
      token,
      position,
      bound,
      classifier,
      loops.fold_rows(state.rng, 2 * j),
    )
    tokens.append(token)
    probs.append(q)
    layers = layers + jnp.where(going, ran, 0)
    count = count + going
    going = going & (confidence >= cfg.min_confidence)
  return Draft(
    tokens=jnp.stack(tokens, 1),
    probs=jnp.stack(probs, 1),
    count=count,
    layers=layers,
    cache=cache,
  )


def _distribution(logits: Array, sampling: loops.Sampling) -> Array:
  """The probabilities `select_tokens` samples from (temperature, top-k,
  top-p applied), [..., v]."""
  return jax.nn.softmax(loops.filtered_logits(logits, sampling), axis=-1)


def verify(fns, state: SpecState, drafts: Draft):
  """The full model over each row's block [last, d_1 .. d_g] at its
  positions pos .. pos + g: logits [b, g + 1, v] and the cache with the
  true keys/values of the block written over the draft's."""
  inputs = jnp.concatenate([state.last[:, None], drafts.tokens], 1)
  return verify_block(fns, drafts.cache, inputs, state.length)


def verify_block(fns, cache: loops.KVCache, inputs: Array, start: Array):
  """The full-depth pass over each row's block of inputs [b, g + 1] at
  positions start .. start + g ([b]): logits [b, g + 1, v] and the cache
  with the block's true keys/values (what one verify pass costs)."""
  x = jnp.concatenate(
    [fns.embed(inputs[:, j]) for j in range(inputs.shape[1])], 1
  )  # [b, g+1, e]
  positions = start[:, None] + jnp.arange(inputs.shape[1])
  for layer in range(fns.num_layers):
    k, v = fns.layer_kv(layer, x, positions)
    cache = cache.write(layer, start, k, v)
    x = fns.layer_step(
      layer, x, cache.keys[layer], cache.values[layer], positions
    )
  return fns.logits(x), cache


def _accept_greedy(drafts: Draft, logits: Array):
  """(tokens to emit [b, g + 1], how many [b]): the drafts that equal the
  full model's argmax, then the full model's own next token."""
  full = jnp.argmax(logits, -1).astype(jnp.int32)  # [b, g + 1]
  gamma = drafts.tokens.shape[1]
  match = (drafts.tokens == full[:, :gamma]) & (
    jnp.arange(gamma) < drafts.count[:, None]
  )
  accepted = jnp.sum(jnp.cumprod(match, axis=1), axis=1)  # [b]
  emit = jnp.where(
    jnp.arange(gamma + 1) < accepted[:, None],
    jnp.pad(drafts.tokens, ((0, 0), (0, 1))),
    jnp.take_along_axis(full, accepted[:, None], 1),
  )
  return emit, accepted


def _accept_sampled(drafts: Draft, logits: Array, sampling, rng):
  """Rejection sampling: the output distribution is the full model's."""
  p = _distribution(logits, sampling)  # [b, g + 1, v]
  q = drafts.probs  # [b, g, v]
  gamma = drafts.tokens.shape[1]
  rows = jnp.arange(p.shape[0])[:, None]
  steps = jnp.arange(gamma)[None]
  p_x = p[rows, steps, drafts.tokens]
  q_x = q[rows, steps, drafts.tokens]
  u = loops.uniform_rows(loops.fold_rows(rng, 1), p_x.shape[1:])
  keep = (u * q_x <= p_x) & (steps < drafts.count[:, None])
  accepted = jnp.sum(jnp.cumprod(keep, axis=1), axis=1)
  # At the first rejection: normalise(max(0, p - q)); after every draft
  # was kept: p of the next position.
  at = jnp.take_along_axis(p, accepted[:, None, None], 1)[:, 0]  # [b, v]
  q_at = jnp.take_along_axis(
    jnp.pad(q, ((0, 0), (0, 1), (0, 0))), accepted[:, None, None], 1
  )[:, 0]
  rejected = (accepted < drafts.count)[:, None]
  residual = jnp.where(rejected, jnp.maximum(at - q_at, 0.0), at)
  residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, at)
  extra = loops.categorical_rows(loops.fold_rows(rng, 2), jnp.log(residual))
  emit = jnp.where(
    jnp.arange(gamma + 1) < accepted[:, None],
    jnp.pad(drafts.tokens, ((0, 0), (0, 1))),
    extra[:, None],
  )
  return emit, accepted


def _near_ties(logits: Array, count: Array) -> Array:
  """Emitted positions whose full-model top-2 logit gap is under 1e-4
  (where float rounding between a batched pass and single steps could
  flip the argmax), per row."""
  top2 = jax.lax.top_k(logits, 2)[0]
  close = (top2[..., 0] - top2[..., 1]) < 1e-4
  return jnp.sum(close & (jnp.arange(logits.shape[1]) < count[:, None]), 1)


def _advance(
  state: SpecState,
  emit: Array,
  accepted: Array,
  drafts: Draft,
  cache,
  logits,
  eos_id: int,
  max_length: int,
  num_layers: int,
) -> SpecState:
  """Writes each row's emitted tokens at its own position; EOS and the
  length limit end a row."""
  count = accepted + 1
  is_eos = (emit == eos_id) & (jnp.arange(emit.shape[1]) < count[:, None])
  first_eos = jnp.argmax(is_eos, axis=1)
  count = jnp.where(jnp.any(is_eos, 1), first_eos + 1, count)
  count = jnp.minimum(count, max_length - state.length)
  count = jnp.where(state.done, 0, count)
  emit = jnp.where(jnp.arange(emit.shape[1]) < count[:, None], emit, 0)
  tokens = jax.vmap(lambda t, e, p: jax.lax.dynamic_update_slice(t, e, (p,)))(
    state.tokens, emit, state.length
  )
  length = state.length + count
  last = jnp.take_along_axis(emit, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0]
  ended = jnp.any(is_eos & (jnp.arange(emit.shape[1]) < count[:, None]), 1)
  running = ~state.done
  layers = logits.shape[1] * num_layers  # g + 1 positions, every layer
  return state.replace(
    tokens=tokens,
    length=length,
    last=jnp.where(state.done, state.last, last),
    done=state.done | ended | (length >= max_length),
    cache=cache,
    passes=state.passes + running,
    accepted=state.accepted
    + jnp.where(running, jnp.minimum(accepted, count), 0),
    drafted=state.drafted + jnp.where(running, drafts.count, 0),
    draft_layers=state.draft_layers + drafts.layers,
    verify_layers=state.verify_layers + running * layers,
    near_ties=state.near_ties
    + jnp.where(running, _near_ties(logits, count), 0),
    rng=loops.fold_rows(state.rng, 7),
  )


def speculative_decode(
  fns,
  cfg: DraftConfig,
  *,
  threshold: Array,
  batch_size: int,
  max_length: int,
  cache_shape: tuple[int, int],
  cache_dtype=jnp.float32,
  eos_id: int = 1,
  classifier: Any = None,
  rng: Optional[Array] = None,
  start_tokens: Optional[Array] = None,
) -> SpecOutput:
  """Exactly the full model's output (greedy tokens, or its sampling
  distribution), drafted by its own early exits (see the module docstring).

  `fns` must take per-row positions (`loops.StepFns`); the other arguments
  are the early-exit loop's. Verify writes up to gamma positions past a
  row's end, so the cache holds max_length + gamma + 1 positions.
  """
  width = max_length + cfg.gamma + 1
  heads, head_dim = cache_shape
  state = SpecState(
    tokens=jnp.zeros((batch_size, width), jnp.int32),
    length=jnp.zeros((batch_size,), jnp.int32),
    last=(
      jnp.zeros((batch_size,), jnp.int32)
      if start_tokens is None
      else start_tokens.astype(jnp.int32)
    ),
    done=jnp.zeros((batch_size,), bool),
    cache=loops.KVCache.zeros(
      fns.num_layers, (batch_size, width, heads, head_dim), cache_dtype
    ),
    **{name: jnp.zeros((batch_size,), jnp.int32) for name in COUNTS},
    rng=loops.row_keys(
      jax.random.PRNGKey(0) if rng is None else rng, batch_size
    ),
  )
  threshold = jnp.asarray(threshold, jnp.float32)
  sampling = cfg.exits.sampling

  def round_(s: SpecState) -> SpecState:
    drafts = draft(fns, cfg, s, threshold, classifier, max_length)
    logits, cache = verify(fns, s, drafts)
    if sampling.greedy:
      emit, accepted = _accept_greedy(drafts, logits)
    else:
      emit, accepted = _accept_sampled(
        drafts, logits, sampling, loops.fold_rows(s.rng, 99)
      )
    return _advance(
      s,
      emit,
      accepted,
      drafts,
      cache,
      logits,
      eos_id,
      max_length,
      fns.num_layers,
    )

  final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
  return SpecOutput(
    tokens=final.tokens[:, :max_length],
    passes=final.passes,
    accepted=final.accepted,
    drafted=final.drafted,
    draft_layers=final.draft_layers,
    verify_layers=final.verify_layers,
    near_ties=final.near_ties,
  )


def as_decode_output(out: SpecOutput, num_layers: int) -> loops.DecodeOutput:
  """The exact mode's output in the loops' shape: every token is the full
  model's (exit layer: the top, no confidence), and the per-row counts as
  `extras`."""
  emitted = out.tokens.shape
  extras = {name: getattr(out, name) for name in COUNTS}
  return loops.DecodeOutput(
    tokens=out.tokens,
    exit_layers=jnp.full(emitted, num_layers, jnp.int32),
    confidences=jnp.full(emitted, jnp.nan, jnp.float32),
    layer_evals=jnp.sum(out.draft_layers + out.verify_layers),
    extras=extras,
  )
