"""Optimizers and learning-rate schedules (optax); no gin here."""

import dataclasses
from typing import Callable

import optax

from calm_jax import arguments


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


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation that also knows its learning-rate schedule
  (for the logs: optax keeps it inside the update function)."""

  transform: optax.GradientTransformation
  learning_rate: Callable[[int], float]

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
  if grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
  return Optimizer(opt, lr if callable(lr) else (lambda _: lr))
