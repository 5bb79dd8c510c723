"""Exit thresholds and which layers may exit: the paper's constant and
decaying thresholds, and the first_exit / exit_interval / min_exit grid.

A threshold above 1.0 disables exits (a float32 softmax maximum can round to
exactly 1.0, so 1.0 itself would still let some tokens out).
"""

import jax
import jax.numpy as jnp

from calm_jax import arguments

Array = jax.Array

# The one threshold every job passes for "full depth, exits off".
EXITS_OFF = 1.5


def exits_disabled(threshold: float) -> bool:
  return threshold > 1.0


def decayed_threshold(
  base: Array, position: Array, max_length: int, tau: float
) -> Array:
  """`clip(0.9 * base + 0.1 * exp(-tau * t / N), 0, 1)`.

  Args:
    base: the calibrated threshold lambda.
    position: output position t (0-based) of the token being decided.
    max_length: N, the maximum output length.
    tau: decay speed; the paper uses 4 for summarisation and translation.
  """
  decay = jnp.exp(-tau * position / max_length)
  return jnp.clip(0.9 * base + 0.1 * decay, 0.0, 1.0)


def threshold_at(
  base: Array, position: Array, max_length: int, tau: float | None
) -> Array:
  """Threshold for position t: constant when tau is None, else decaying.

  `base` may be traced. Exits stay disabled at every position when base > 1,
  decay or not (the decayed value is clipped to 1).
  """
  base = jnp.asarray(base, jnp.float32)
  value = (
    base
    if tau is None
    else decayed_threshold(
      base, jnp.asarray(position, jnp.float32), max_length, tau
    )
  )
  return jnp.where(base > 1.0, jnp.inf, value)


def trained_exit_layers(
  num_layers: int,
  *,
  first_exit: int = 1,
  exit_interval: int = 1,
  layers: tuple[int, ...] = (),
) -> tuple[int, ...]:
  """1-based layers that emit a prediction in training: `layers` if given,
  else first_exit, first_exit + exit_interval, ...; always the top one."""
  chosen = layers or range(first_exit, num_layers + 1, exit_interval)
  return tuple(sorted(set(chosen) | {num_layers}))


def allowed_exit_layers(
  num_layers: int,
  *,
  first_exit: int = 1,
  exit_interval: int = 1,
  min_exit: int = 1,
) -> tuple[int, ...]:
  """1-based layers below the top at which a token may stop.

  A layer qualifies when it is at or above both `first_exit` and `min_exit`
  and on the `exit_interval` grid that starts at `first_exit`. The top layer
  is where every remaining token stops, so it is not listed.
  """
  arguments.check(
    exit_interval=exit_interval, first_exit=first_exit, min_exit=min_exit
  )
  lowest = max(first_exit, min_exit, 1)
  return tuple(
    layer
    for layer in range(lowest, num_layers)
    if (layer - first_exit) % exit_interval == 0
  )
