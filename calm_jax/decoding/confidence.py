"""Confidence measures, one score per row: the paper's softmax response,
hidden-state saturation and learned early-exit classifier, and the oracle.

Every measure has the signature

  measure(hidden, previous_hidden, logits_fn, classifier) -> (confidence [b],
                                                              logits or None)

with `hidden` the raw state [b, e] after the layer just run and
`previous_hidden` the state that entered it. Measures that need the exit's
vocabulary distribution call `logits_fn(hidden)` and hand the logits back so
that the loop can reuse them for the emitted token. Pick one by name with
`get`.
"""

from typing import Any
from typing import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from calm_jax import arguments
from calm_jax import errors

Array = jax.Array
LogitsFn = Callable[[Array], Array]


def top2(values: Array) -> tuple[Array, Array]:
  """Largest two entries along the last axis.

  The optimization barrier keeps XLA:CPU from turning `top_k(., 2)` over a
  32k vocabulary into a full sort when its outputs are used separately
  (measured on XLA:CPU at a 32k vocabulary: a full sort costs ~60 times
  more at batch 1; a test checks the compiled HLO).
  """
  best, _ = jax.lax.optimization_barrier(jax.lax.top_k(values, 2))
  return best[..., 0], best[..., 1]


def softmax_response(hidden, previous_hidden, logits_fn, classifier=None):
  """Top-1 minus top-2 probability of the exit's softmax."""
  del previous_hidden, classifier
  logits = logits_fn(hidden)
  first, second = top2(logits)
  # p1 - p2 = (exp(l1) - exp(l2)) / Z, without materialising the softmax.
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return jnp.exp(first - log_z) - jnp.exp(second - log_z), logits


def softmax_max(hidden, previous_hidden, logits_fn, classifier=None):
  """Largest probability of the exit's softmax."""
  del previous_hidden, classifier
  logits = logits_fn(hidden)
  return jnp.exp(jnp.max(logits, -1) - jax.nn.logsumexp(logits, -1)), logits


def state_saturation(hidden, previous_hidden, logits_fn=None, classifier=None):
  """Cosine similarity of h_i and h_{i-1}, per row (not over the batch),
  computed in float32 whatever the activation dtype."""
  del logits_fn, classifier
  hidden = hidden.astype(jnp.float32)
  previous_hidden = previous_hidden.astype(jnp.float32)
  dot = jnp.sum(hidden * previous_hidden, axis=-1)
  norms = jnp.linalg.norm(hidden, axis=-1) * jnp.linalg.norm(
    previous_hidden, axis=-1
  )
  return dot / jnp.maximum(norms, 1e-12), None


def init_classifier(embed_dim: int) -> dict[str, Array]:
  """Parameters of the exit classifier: a linear head [e] -> 1 logit."""
  return {
    'kernel': jnp.zeros((embed_dim, 1), jnp.float32),
    'bias': jnp.zeros((1,), jnp.float32),
  }


def classifier_logit(params: Any, hidden: Array) -> Array:
  """Logit of the learned exit classifier on the raw state, [..., e] -> [...]."""
  logit = hidden.astype(jnp.float32) @ params['kernel'] + params['bias']
  return logit[..., 0]


def classifier_head(params: Any, hidden: Array) -> Array:
  """Learned exit classifier probability sigmoid(h W + b), [..., e] -> [...]."""
  return jax.nn.sigmoid(classifier_logit(params, hidden))


def learned_classifier(
  hidden, previous_hidden, logits_fn=None, classifier: Optional[Any] = None
):
  """P(this layer's argmax equals the top layer's), from the classifier."""
  del previous_hidden, logits_fn
  if classifier is None:
    raise errors.SettingError(
      "confidence 'classifier' needs trained classifier "
      'parameters (train them with gin/runs/train_classifier.gin)'
    )
  return classifier_head(classifier, hidden), None


# Keyed by the names `arguments.CONFIDENCE_MEASURES` defines (a test checks
# that they match).
MEASURES: dict[str, Callable] = {
  'softmax': softmax_response,
  'softmax_max': softmax_max,
  'state': state_saturation,
  'classifier': learned_classifier,
}
# The measures that compute the exit's logits (the loops reuse their argmax
# as the token instead of applying the head again).
GIVES_LOGITS = ('softmax', 'softmax_max')
# The oracle needs the full model's prediction; the static decoder records
# it (`loops.static_decode(oracle=True)`).
ORACLE = arguments.ORACLE
NAMES = (*arguments.CONFIDENCE_MEASURES, ORACLE)


def lowest_exit_layer(name: str) -> int:
  """State saturation compares with the previous layer's state; layer 1 has
  none (its confidence would be 0), so that measure exits from layer 2."""
  return 2 if name == 'state' else 1


def get(name: str) -> Callable:
  """The measure called `name`; an unknown name lists the valid ones."""
  arguments.check(confidence=name)
  if name not in MEASURES:
    raise errors.SettingError(
      f'the {name!r} measure is a decode mode of '
      'its own, not a per-layer confidence'
    )
  return MEASURES[name]
