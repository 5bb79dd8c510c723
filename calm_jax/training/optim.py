"""Optimizers and learning-rate schedules (optax); no gin here."""

import dataclasses
from typing import Callable

import jax
import optax

from calm_jax import arguments
from calm_jax.model import layout


def learning_rate_schedule(
  learning_rate: float, *, schedule: str, warmup_steps: int, total_steps: int
):
  """Linear warm-up, then constant, T5's rsqrt decay, or cosine decay."""
  if schedule == 'constant':
    decay = optax.constant_schedule(learning_rate)
  elif schedule == 'rsqrt':
    start = max(warmup_steps, 1)
    decay = lambda step: learning_rate * (start / (step + start)) ** 0.5
  else:  # cosine
    decay = optax.cosine_decay_schedule(
      learning_rate, max(total_steps - warmup_steps, 1), alpha=0.05
    )
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def layerwise(
  rule: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """`rule` applied to each layer of a scanned stack on its own, as if the
  layers were unrolled: a parameter under a 'layers' key (`model/layout`)
  is a stack [L, ...], and the rule runs vmapped over its leading axis.
  Adafactor needs this, not only for speed: its parameter scale and its
  update clipping are RMS over a whole parameter, so over all layers at
  once on an unsplit stack."""
  vmapped = optax.GradientTransformation(
    init=jax.vmap(rule.init),
    update=lambda u, s, p=None: jax.vmap(rule.update)(u, s, p),
  )

  def label(path, leaf) -> str:
    # One vmap per depth: T5's encoder and decoder stacks may differ.
    if layout.in_stacked_layer(path):
      return f'stack of {leaf.shape[0]}'
    return 'single'

  def split(tree) -> optax.GradientTransformation:
    labels = jax.tree_util.tree_map_with_path(label, tree)
    rules = {
      name: rule if name == 'single' else vmapped
      for name in set(jax.tree_util.tree_leaves(labels))
    }
    return optax.multi_transform(rules, labels)

  return optax.GradientTransformation(
    init=lambda params: split(params).init(params),
    update=lambda u, s, p=None: split(u).update(u, s, p),
  )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation that also knows its learning-rate schedule
  (for the logs: optax keeps it inside the update function)."""

  update_rule: optax.GradientTransformation  # Adafactor's or AdamW's
  learning_rate: Callable[[int], float]
  grad_clip_norm: float = 0.0  # of all gradients together; 0: none
  # Parameters stacked by scan_layers get the rule one layer at a time
  # (`layerwise`); the train job sets it from the model's layout.
  per_layer: bool = False

  @property
  def transform(self) -> optax.GradientTransformation:
    rule = layerwise(self.update_rule) if self.per_layer else self.update_rule
    if self.grad_clip_norm > 0:
      return optax.chain(optax.clip_by_global_norm(self.grad_clip_norm), rule)
    return rule

  def init(self, params):
    return self.transform.init(params)

  def update(self, updates, state, params=None):
    return self.transform.update(updates, state, params)


def make_optimizer(
  name: str = 'adafactor',
  *,
  learning_rate: float = 1e-3,
  schedule: str = 'constant',
  warmup_steps: int = 0,
  total_steps: int = 1,
  weight_decay: float = 0.0,
  grad_clip_norm: float = 0.0,
) -> Optimizer:
  """Adafactor (the paper's) or AdamW, with optional global-norm clipping.
  Every setting is checked here, when the job's config is applied, before
  any file is written."""
  arguments.check(
    optimizer=name,
    learning_rate=learning_rate,
    schedule=schedule,
    warmup_steps=warmup_steps,
    total_steps=total_steps,
    weight_decay=weight_decay,
    grad_clip_norm=grad_clip_norm,
  )
  lr = learning_rate_schedule(
    learning_rate,
    schedule=schedule,
    warmup_steps=warmup_steps,
    total_steps=total_steps,
  )
  if name == 'adafactor':
    opt = optax.adafactor(lr, weight_decay_rate=weight_decay or None)
  else:  # adamw
    opt = optax.adamw(lr, weight_decay=weight_decay)
  return Optimizer(opt, lr if callable(lr) else (lambda _: lr), grad_clip_norm)
