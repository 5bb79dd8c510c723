"""Straight-line programs of one decode position, for cost accounting.

XLA's cost analysis counts a loop body once, whatever its trip count, and
a conditional as its costliest branch. The decode loops (`loops`,
`speculative`) are while loops over positions with a `lax.switch` per layer,
so their compiled cost says nothing about what one token costs when it
exits after layer k. These functions are the same work with no loop and no
branch, built from the loops' own pieces over the same `StepFns`:

- `token_at_exit`: one position where every row exits after layer k: the
  layers up to k (with the confidence measure at each checked exit), the
  K/V of the frozen exit state for every layer above k (the state
  propagation), and the token;
- `full_depth_token`: one position of the static decoder;
- `speculative.verify_block`: one verify pass over gamma + 1 positions.

No model code here, as in the loops. Shapes: b batch, t cache length,
h heads, d head dim, e embed.
"""

import jax
import jax.numpy as jnp

from calm_jax.decoding import confidence as confidence_lib
from calm_jax.decoding import loops

Array = jax.Array


def token_at_exit(
  fns: loops.StepFns,
  cfg: loops.ExitConfig,
  exit_layer: int,
  cache: loops.KVCache,
  tokens: Array,
  position: Array,
  classifier=None,
) -> tuple[Array, Array, loops.KVCache]:
  """Previous tokens [b] -> (next tokens [b], confidences [x, b] of the
  checked exits it ran, cache) when every row stops after 1-based
  `exit_layer`. Every confidence is an output, as in the loop, where each
  one decides an exit: a program that dropped them would let the compiler
  drop their cost.

  Layers below it run on every row, with `cfg`'s measure at each of its
  checked exits at or below `exit_layer`; layers above it only write the
  K/V of the exit state. The token reuses the measure's logits when it has
  them (softmax) and applies the head otherwise, as `loops.emit_tokens`.
  """
  batch = tokens.shape[0]
  x = fns.embed(tokens)  # [b, 1, e]
  confidences = [jnp.zeros((batch,), jnp.float32)]
  token = None  # the exit's argmax, when its measure computed the logits
  for layer in range(fns.num_layers):
    k, v = fns.layer_kv(layer, x, position)
    cache = cache.write(layer, position, k, v)
    if layer >= exit_layer:
      continue  # skipped: its K/V above is all it computes
    check = (layer + 1) in cfg.exit_layers
    x, layer_conf, layer_token = loops._layer_on_rows(  # pylint: disable=protected-access
      fns, cfg, layer, check, _all_rows(x), cache, position, None, classifier
    )
    if check:
      confidences.append(layer_conf)
      gives = cfg.confidence in confidence_lib.GIVES_LOGITS
      token = layer_token if gives and layer + 1 == exit_layer else None
  if token is None:
    logits = fns.logits(fns.exit_hidden(x[:, 0], exit_layer))
    token = loops.select_tokens(logits, jax.random.PRNGKey(0), cfg.sampling)
  return token, jnp.stack(confidences), cache


def full_depth_token(
  fns: loops.StepFns, cache: loops.KVCache, tokens: Array, position: Array
) -> tuple[Array, loops.KVCache]:
  """One position of the static decoder: every layer, then the head."""
  x = fns.embed(tokens)
  for layer in range(fns.num_layers):
    x, cache = loops.full_depth_layer(fns, layer, x, cache, position)
  return jnp.argmax(fns.logits(x[:, 0]), -1).astype(jnp.int32), cache


def _all_rows(hidden: Array) -> loops.Climb:
  """A climb state in which every row is running (what `_layer_on_rows`
  reads of it: the hidden state)."""
  batch = hidden.shape[0]
  return loops.Climb(
    hidden=hidden,
    active=jnp.ones((batch,), bool),
    exit_layer=jnp.zeros((batch,), jnp.int32),
    confidence=jnp.zeros((batch,), jnp.float32),
    token=jnp.full((batch,), -1, jnp.int32),
    exit_kv=(hidden, hidden),
    evals=jnp.zeros((), jnp.int32),
  )
