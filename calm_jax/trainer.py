"""The training loop: sharded jitted step, orbax checkpoints, resume, progress.

The state lives on a ('data', 'model') mesh (partitioning.py): parameters
and optimizer state sharded by the logical axis rules, batches split over
'data', and the step jitted with those in/out shardings. Checkpoints are
saved sharded and restored onto whatever mesh the run has, so a run may
resume on another mesh shape.

No gin and no TensorFlow: batches arrive through a callable that starts the
(deterministic) data pipeline at a given step, which is how a resumed run
continues at the same data position. With several processes, each process
yields its own rows of every global batch.
"""
import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding

from calm_jax import checkpoints
from calm_jax import confidence
from calm_jax import models
from calm_jax import partitioning

Batch = Mapping[str, np.ndarray]


class ScalarWriter(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a training run optimizes.

  Attributes:
    init: rng -> initial trainable parameters.
    loss: (params, batch, dropout_rng or None) -> (loss, metrics).
    exit_layers: names of the entries of per-exit metric vectors.
    dropout: whether the loss wants a dropout rng.
    param_axes: logical PartitionSpecs of the parameters (None: replicate).
    load: optional param shardings -> parameters read from elsewhere (a
      fine-tune's starting point), used instead of `init` for a new run;
      `init` still gives the shapes.
  """
  init: Callable[[jax.Array], Any]
  loss: Callable[..., tuple[jax.Array, dict]]
  exit_layers: tuple[int, ...]
  dropout: bool = False
  param_axes: Any = None
  load: Optional[Callable[[Any], Any]] = None


def model_objective(model: models.CalmModel) -> Objective:
  """Stage 1: the whole network with CALM's weighted per-exit loss."""
  return Objective(
      init=lambda rng: model.init_params(rng)['params'],
      loss=lambda p, batch, rng: model.loss(p, batch, dropout_rng=rng),
      exit_layers=model.config.exit_layers,
      dropout=model.config.dropout_rate > 0,
      param_axes=model.param_axes())


def classifier_objective(model: models.CalmModel, backbone: Any) -> Objective:
  """Stage 2: the exit classifier alone; the trained backbone stays frozen
  (it is a constant of the loss, so neither gradients nor optimizer state
  touch it)."""
  return Objective(
      init=lambda rng: confidence.init_classifier(model.config.emb_dim),
      loss=lambda c, batch, rng: model.classifier_loss(c, backbone, batch),
      exit_layers=model.classifier_exit_layers())


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken
  params: Any
  opt_state: Any


def init_state(objective: Objective, optimizer: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  params = objective.init(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live on the mesh."""
  mesh: Mesh
  state: TrainState          # of NamedShardings
  abstract_state: TrainState  # of ShapeDtypeStructs carrying those shardings

  @property
  def batch(self) -> NamedSharding:
    return partitioning.batch_sharding(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return partitioning.replicated(self.mesh)


def placement(objective: Objective, optimizer: optax.GradientTransformation,
              mesh: Mesh) -> Placement:
  """Shardings of the train state: parameters by the rules, optimizer state
  like the parameters it mirrors, the step replicated."""
  shapes = jax.eval_shape(
      lambda: init_state(objective, optimizer, jax.random.PRNGKey(0)))
  replicated = partitioning.replicated(mesh)
  if objective.param_axes is None:
    params = jax.tree_util.tree_map(lambda _: replicated, shapes.params)
  else:
    params = partitioning.param_shardings(objective.param_axes, mesh)
  shardings = TrainState(
      step=replicated, params=params,
      opt_state=partitioning.shardings_like_params(
          shapes.opt_state, shapes.params, params, mesh))
  return Placement(mesh=mesh, state=shardings,
                   abstract_state=partitioning.with_shardings(shapes,
                                                              shardings))


def make_train_step(objective: Objective,
                    optimizer: optax.GradientTransformation,
                    place: Placement):
  """(state, batch, rng) -> (state, metrics), jitted over the mesh with the
  placement's shardings, state donated."""

  def step(state: TrainState, batch: Batch, rng: jax.Array):
    dropout_rng = (jax.random.fold_in(rng, state.step) if objective.dropout
                   else None)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), metrics

  jitted = jax.jit(step, donate_argnums=(0,),
                   in_shardings=(place.state, place.batch, place.replicated),
                   out_shardings=(place.state, place.replicated))

  def sharded_step(state: TrainState, batch: Batch, rng: jax.Array):
    with partitioning.activation_rules(place.mesh):  # traced in here
      return jitted(state, batch, rng)

  return sharded_step


def restore_or_init(objective, optimizer, mgr, rng, place: Placement
                    ) -> TrainState:
  """The latest checkpoint's state (resharded onto this run's mesh), or a
  fresh one, created directly in its shards."""
  step = mgr.latest_step()
  target = place.abstract_state
  if step is not None:
    restored = checkpoints.restore(mgr, step, params=target.params,
                                   opt_state=target.opt_state)
    return TrainState(
        step=partitioning.replicate(np.int32(step), place.mesh),
        params=restored['params'], opt_state=restored['opt_state'])
  if objective.load is None:
    return jax.jit(lambda r: init_state(objective, optimizer, r),
                   out_shardings=place.state)(rng)
  params = objective.load(place.state.params)
  return TrainState(
      step=partitioning.replicate(np.int32(0), place.mesh), params=params,
      opt_state=jax.jit(optimizer.init,
                        out_shardings=place.state.opt_state)(params))


def scalar_metrics(metrics: Mapping[str, Any], exit_layers) -> dict:
  """Flattens per-exit vectors into loss/layer_3 style scalars."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      for layer, v in zip(exit_layers, value):
        out[f'{name}/layer_{layer}'] = float(v)
  return out


class _Progress:
  """Progress bar plus periodic scalar logging with a steps/s window."""

  def __init__(self, *, start: int, total: int, exit_layers, writer,
               enabled: bool):
    self.bar = tqdm.tqdm(total=total, initial=start, disable=not enabled,
                         desc='train', unit='step', dynamic_ncols=True)
    self.exit_layers, self.writer = exit_layers, writer
    self.window_start, self.window_steps = time.perf_counter(), 0

  def step(self, step: int, metrics, log: bool) -> None:
    self.bar.update(1)
    self.window_steps += 1
    if not log:
      return
    scalars = scalar_metrics(jax.device_get(metrics), self.exit_layers)
    elapsed = max(time.perf_counter() - self.window_start, 1e-9)
    scalars['steps_per_second'] = self.window_steps / elapsed
    self.window_start, self.window_steps = time.perf_counter(), 0
    self.bar.set_postfix(loss=f'{scalars["loss"]:.3f}',
                         steps_s=f'{scalars["steps_per_second"]:.2f}')
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)


def train_loop(*, objective: Objective,
               optimizer: optax.GradientTransformation, model_dir: str,
               batches_from: Callable[[int], Iterator[Batch]],
               num_steps: int, checkpoint_period: int = 500,
               keep_checkpoints: int = 3, log_every: int = 50, seed: int = 0,
               writer: Optional[ScalarWriter] = None,
               progress: bool = True,
               checkpoint_subdir: str = checkpoints.CHECKPOINT_SUBDIR,
               mesh: Optional[Mesh] = None) -> TrainState:
  """Trains to `num_steps`, resuming from the latest checkpoint in model_dir.

  Runs on `mesh` (default: every device on 'data'). Saves every
  `checkpoint_period` steps, at the end, and on Ctrl-C, so no finished step
  is lost; orbax commits each checkpoint atomically.
  """
  mesh = mesh or partitioning.make_mesh()
  place = placement(objective, optimizer, mesh)
  mgr = checkpoints.manager(model_dir, max_to_keep=keep_checkpoints,
                            subdir=checkpoint_subdir)
  rng = partitioning.replicate(jax.random.PRNGKey(seed), mesh)
  state = restore_or_init(objective, optimizer, mgr, rng, place)
  start = int(state.step)
  if start >= num_steps:
    mgr.close()
    return state
  train_step = make_train_step(objective, optimizer, place)
  bar = _Progress(start=start, total=num_steps, writer=writer,
                  exit_layers=objective.exit_layers,
                  enabled=progress and jax.process_index() == 0)
  batches = batches_from(start)
  try:
    for step in range(start + 1, num_steps + 1):
      batch = next(batches, None)
      if batch is None:
        raise ValueError(f'no training data: the dataset ended after '
                         f'{step - 1 - start} batches (at step {step})')
      state, metrics = train_step(
          state, partitioning.global_batch(batch, mesh), rng)
      bar.step(step, metrics, step % log_every == 0 or step == num_steps)
      if step % checkpoint_period == 0:
        checkpoints.save(mgr, step, state.params, state.opt_state)
  except KeyboardInterrupt:
    print(f'\ninterrupted: saving step {int(state.step)}')
    raise
  finally:
    bar.bar.close()
    if int(state.step) > start and mgr.latest_step() != int(state.step):
      checkpoints.save(mgr, int(state.step), state.params, state.opt_state,
                       force=True)
    mgr.wait_until_finished()
    mgr.close()
  return state
