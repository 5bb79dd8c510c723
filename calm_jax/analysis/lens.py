"""What a decoder-only model's layers already know about its own next token.

From a full-depth decode of some prompts (the model's own generations), one
teacher-forced pass over prompt + generation gives every layer's hidden
state at every generated position (`generated_states`; with
`prompt_positions`, at the prompt's positions too). From those:
- `agreement`: per layer, the share of generated tokens that the layer's
  exit (head on its state, through the exit adapters when given) already
  predicts;
- the exit adapters (`model.adapters.fit`, on every position's states) and
  the learned exit classifier (`fit_classifier`, on generated positions)
  are fitted on prompts kept apart from those that calibrate and test.
Everything here runs on host arrays in chunks: the states of a few thousand
tokens of a 30-layer model fit in memory, their logits do not.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from calm_jax.data import examples as examples_lib
from calm_jax.decoding import confidence
from calm_jax.evaluation import engine
from calm_jax.inference import loaded as loaded_lib


@dataclasses.dataclass(frozen=True)
class States:
  """Every layer's raw state at the generated positions of some prompts."""

  hidden: np.ndarray  # [L, n, e] float32
  # [n] the next token at each position: the model's own (its top's) at
  # generated positions, the prompt's at prompt positions.
  tokens: np.ndarray


def _sequences(examples: examples_lib.ExampleSet, decoded: engine.Decoded):
  """(prompt ids, generated ids up to and with EOS) per example."""
  for example, output in zip(examples.examples, decoded.outputs):
    yield list(example.input_ids), list(output['token_ids'])


def generated_states(
  model: loaded_lib.LoadedModel,
  examples: examples_lib.ExampleSet,
  decoded: engine.Decoded,
  batch_size: int = 8,
  prompt_positions: bool = False,
) -> States:
  """One teacher-forced pass per batch over prompt + generation; the
  states at the generated positions, or with `prompt_positions` at every
  position that predicts a next token."""
  pairs = list(_sequences(examples, decoded))
  width = max(len(p) + len(g) for p, g in pairs)
  width = -(-width // 32) * 32  # few compiled shapes
  hidden_fn = jax.jit(model.model.hidden_states)
  hidden, tokens = [], []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start : start + batch_size]
    rows = np.zeros((batch_size, width), np.int32)
    for row, (prompt, generated) in enumerate(chunk):
      rows[row, : len(prompt) + len(generated)] = prompt + generated
    lengths = np.array(
      [len(p) + len(g) for p, g in chunk] + [1] * (batch_size - len(chunk))
    )
    states = np.asarray(hidden_fn(model.params, rows, lengths))  # [L,b,l,e]
    for row, (prompt, generated) in enumerate(chunk):
      # The state at position i predicts the token at i + 1.
      first = 0 if prompt_positions else len(prompt) - 1
      positions = np.arange(first, len(prompt) + len(generated) - 1)
      hidden.append(states[:, row, positions])
      tokens.append(np.asarray(prompt + generated)[positions + 1])
  return States(np.concatenate(hidden, 1), np.concatenate(tokens))


def exit_predictions(
  model: loaded_lib.LoadedModel, states: States, chunk: int = 256
) -> np.ndarray:
  """[L, n]: the token each layer's exit predicts at each position (through
  the model's exit adapters, if it has them)."""
  head = jax.jit(
    lambda p, h: jnp.argmax(
      model.model.head(p, model.model.exit_states(p, h)), -1
    )
  )
  out = []
  for start in range(0, states.hidden.shape[1], chunk):
    out.append(
      np.asarray(head(model.params, states.hidden[:, start : start + chunk]))
    )
  return np.concatenate(out, 1)


def agreement(model: loaded_lib.LoadedModel, states: States) -> np.ndarray:
  """[L]: the share of generated tokens each layer's exit predicts."""
  return (exit_predictions(model, states) == states.tokens[None]).mean(1)


def oracle_layers(predictions: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """[n]: the first 1-based layer whose exit predicts the token."""
  return np.argmax(predictions == tokens[None], axis=0) + 1


def exit_states(model: loaded_lib.LoadedModel, states: States) -> np.ndarray:
  """[L, n, e]: what each exit reads (adapted when the model has adapters)."""
  return np.asarray(
    model.model.exit_states(model.params, jnp.asarray(states.hidden))
  )


def fit_classifier(
  inputs: np.ndarray,
  labels: np.ndarray,
  steps: int = 300,
  learning_rate: float = 1e-2,
  seed: int = 0,
) -> dict:
  """The learned exit classifier (a linear head on a state, shared by the
  layers) on inputs [x, n, e] and labels [x, n] (the layer's exit agrees
  with the top): class-balanced logistic regression per layer, averaged
  over layers, as CALM's second training stage does."""
  params = confidence.init_classifier(inputs.shape[-1])
  inputs = jnp.asarray(inputs, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  # Standardise the states for the optimiser; folded back at the end.
  mean = inputs.mean((0, 1))
  scale = inputs.std((0, 1)) + 1e-6
  positive = jnp.clip(labels.mean(1, keepdims=True), 1e-3, 1 - 1e-3)
  weights = labels * 0.5 / positive + (1 - labels) * 0.5 / (1 - positive)

  def loss(p):
    logit = confidence.classifier_logit(p, (inputs - mean) / scale)
    bce = optax.sigmoid_binary_cross_entropy(logit, labels)
    return jnp.mean(weights * bce)

  optimizer = optax.adam(learning_rate)
  state = optimizer.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss)(p)
    updates, s = optimizer.update(grads, s)
    return optax.apply_updates(p, updates), s

  del seed  # full-batch: deterministic
  for _ in range(steps):
    params, state = step(params, state)
  kernel = params['kernel'] / scale[:, None]
  bias = params['bias'] - (mean / scale) @ params['kernel']
  return {'kernel': np.asarray(kernel), 'bias': np.asarray(bias)}


def classifier_accuracy(
  classifier: dict, inputs: np.ndarray, labels: np.ndarray
) -> float:
  """Balanced accuracy of the classifier's decisions (p > 0.5)."""
  logit = np.asarray(
    confidence.classifier_logit(classifier, jnp.asarray(inputs))
  )
  decided = logit > 0
  positive = labels.astype(bool)
  hits = [
    decided[positive].mean() if positive.any() else 1.0,
    (~decided[~positive]).mean() if (~positive).any() else 1.0,
  ]
  return float(np.mean(hits))


def select_layers(array: np.ndarray, layers: Optional[tuple[int, ...]]):
  """The rows of a per-layer array [L, ...] for 1-based `layers`."""
  return array if layers is None else array[np.asarray(layers) - 1]
