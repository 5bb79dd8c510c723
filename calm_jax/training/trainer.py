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
import sys
import time
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Mapping
from typing import Optional
from typing import Protocol

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
import numpy as np
import optax
import tqdm

from calm_jax import console
from calm_jax import errors
from calm_jax.decoding import confidence
from calm_jax.model import models
from calm_jax.parallel import partitioning
from calm_jax.storage import checkpoints

Batch = Mapping[str, np.ndarray]


class ScalarWriter(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...


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
    param_axes=model.param_axes(),
  )


def classifier_objective(model: models.CalmModel, backbone: Any) -> Objective:
  """Stage 2: the exit classifier alone; the trained backbone stays frozen
  (it is a constant of the loss, so neither gradients nor optimizer state
  touch it)."""
  return Objective(
    init=lambda rng: confidence.init_classifier(model.config.emb_dim),
    loss=lambda c, batch, rng: model.classifier_loss(c, backbone, batch),
    exit_layers=model.classifier_exit_layers(),
  )


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken
  params: Any
  opt_state: Any


def init_state(
  objective: Objective, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  params = objective.init(rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
  )


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live on the mesh."""

  mesh: Mesh
  state: TrainState  # of NamedShardings
  abstract_state: TrainState  # of ShapeDtypeStructs carrying those shardings
  rules: partitioning.Rules = partitioning.RULES  # parameters and activations

  @property
  def batch(self) -> NamedSharding:
    return partitioning.batch_sharding(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return partitioning.replicated(self.mesh)


def placement(
  objective: Objective,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rules: partitioning.Rules = partitioning.RULES,
) -> Placement:
  """Shardings of the train state: parameters by the rules, optimizer state
  like the parameters it mirrors, the step replicated."""
  shapes = jax.eval_shape(
    lambda: init_state(objective, optimizer, jax.random.PRNGKey(0))
  )
  replicated = partitioning.replicated(mesh)
  if objective.param_axes is None:
    params = jax.tree_util.tree_map(lambda _: replicated, shapes.params)
  else:
    params = partitioning.param_shardings(objective.param_axes, mesh, rules)
    partitioning.check_params_split(shapes.params, params)
  shardings = TrainState(
    step=replicated,
    params=params,
    opt_state=partitioning.shardings_like_params(
      shapes.opt_state, shapes.params, params, mesh
    ),
  )
  return Placement(
    mesh=mesh,
    state=shardings,
    abstract_state=partitioning.with_shardings(shapes, shardings),
    rules=rules,
  )


def step_fn(
  objective: Objective,
  optimizer: optax.GradientTransformation,
  guard: bool = True,
) -> Callable:
  """(state, batch, rng) -> (state, metrics): one optimizer step, before
  jit (what `TrainStep` jits over its mesh and the TPU planner compiles).

  `guard`: a step whose loss or gradients are not finite leaves the state
  as it was (False: only for measuring what the guard costs)."""

  def apply(args):
    params, opt_state, grads = args
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(state: TrainState, batch: Batch, rng: jax.Array):
    dropout_rng = (
      jax.random.fold_in(rng, state.step) if objective.dropout else None
    )
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, dropout_rng)
    metrics['grad_norm'] = optax.global_norm(grads)
    # A NaN or infinity anywhere in the gradients makes their norm one too.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    metrics['finite'] = finite
    args = (state.params, state.opt_state, grads)
    # A branch, not an elementwise select of new and old: the update runs
    # in place of the donated state, and a bad step runs nothing (the
    # select measured 2-4% of the demo's step time, the branch < 1%).
    params, opt_state = (
      jax.lax.cond(finite, apply, lambda a: (a[0], a[1]), args)
      if guard
      else apply(args)
    )
    return TrainState(
      step=state.step + 1, params=params, opt_state=opt_state
    ), metrics

  return step


class TrainStep:
  """(state, batch, rng) -> (state, metrics), jitted over the mesh with the
  placement's shardings, state donated; compiled ahead of the first step
  with a notice, so that neither the wait nor the progress bar's rate is a
  mystery."""

  def __init__(
    self,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    place: Placement,
    guard: bool = True,
  ):
    """`guard`: a step whose loss or gradients are not finite leaves the
    state as it was (False: only for measuring what the guard costs)."""
    self.place = place
    step = step_fn(objective, optimizer, guard)
    self._jitted = jax.jit(
      step,
      donate_argnums=(0,),
      in_shardings=(place.state, place.batch, place.replicated),
      out_shardings=(place.state, place.replicated),
    )
    self._programs = {}  # one per batch shape: a mixture's tasks differ

  def compile(self, state: TrainState, batch: Batch, rng: jax.Array):
    """The program for this batch's shapes (compiled once, announced)."""
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if key not in self._programs:
      rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
      lengths = [
        batch[k].shape[1]
        for k in ('encoder_input_tokens', 'decoder_target_tokens')
        if k in batch
      ]
      shape = ', lengths ' + '/'.join(map(str, lengths)) if lengths else ''
      with console.compiling(f'train step (batch {rows}{shape})'):
        with partitioning.activation_rules(self.place.mesh, self.place.rules):
          self._programs[key] = self._jitted.lower(state, batch, rng).compile()
    return self._programs[key]

  def __call__(self, state: TrainState, batch: Batch, rng: jax.Array):
    return self.compile(state, batch, rng)(state, batch, rng)


def make_train_step(
  objective: Objective,
  optimizer: optax.GradientTransformation,
  place: Placement,
) -> TrainStep:
  return TrainStep(objective, optimizer, place)


def make_eval_step(objective: Objective, place: Placement):
  """params, batch -> the objective's metrics without dropout (jitted)."""
  jitted = jax.jit(
    lambda params, batch: objective.loss(params, batch, None)[1],
    in_shardings=(place.state.params, place.batch),
    out_shardings=place.replicated,
  )

  def evaluate(params, batch):
    with partitioning.activation_rules(place.mesh, place.rules):
      return jitted(params, batch)

  return evaluate


def mean_metrics(per_batch: list) -> dict:
  """The average of each metric (scalars and per-exit vectors) over batches."""
  host = jax.device_get(per_batch)
  return {name: np.mean([m[name] for m in host], axis=0) for name in host[0]}


def restore_or_init(
  objective, optimizer, mgr, rng, place: Placement, fallback: bool = True
) -> TrainState:
  """The newest intact checkpoint's state (verified against its manifest,
  resharded onto this run's mesh), or a fresh one, created directly in its
  shards. Damaged newer steps are reported and moved aside (to
  MODEL_DIR/damaged/) so that the run can save those steps again."""
  target = place.abstract_state
  if mgr.latest_step() is not None:
    restored, step = checkpoints.restore_verified(
      mgr, params=target.params, opt_state=target.opt_state, fallback=fallback
    )
    newer = [s for s in mgr.all_steps() if s > step]
    if newer:  # on every process: each one's manager must forget them
      for path in checkpoints.move_aside(mgr, newer):
        console.info(f'moved the damaged step to {path}')
    return TrainState(
      step=partitioning.replicate(np.int32(step), place.mesh),
      params=restored['params'],
      opt_state=restored['opt_state'],
    )
  if objective.load is None:
    return jax.jit(
      lambda r: init_state(objective, optimizer, r), out_shardings=place.state
    )(rng)
  params = objective.load(place.state.params)
  return TrainState(
    step=partitioning.replicate(np.int32(0), place.mesh),
    params=params,
    opt_state=jax.jit(optimizer.init, out_shardings=place.state.opt_state)(
      params
    ),
  )


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
  """Progress bar plus periodic scalar logging with a steps/s window; a
  line per log step on the console with the loss, the learning rate and
  the per-exit accuracies, which also go to TensorBoard."""

  def __init__(
    self,
    *,
    start: int,
    total: int,
    exit_layers,
    writer,
    enabled: bool,
    learning_rate=None,
  ):
    self.bar = tqdm.tqdm(
      total=total,
      initial=start,
      disable=not enabled,
      desc='train',
      unit='step',
      dynamic_ncols=True,
    )
    self.exit_layers, self.writer = exit_layers, writer
    self.learning_rate, self.enabled = learning_rate, enabled
    self.window_start, self.window_steps = time.perf_counter(), 0

  def step(self, step: int, metrics, log: bool) -> None:
    self.bar.update(1)
    self.window_steps += 1
    if not log:
      return
    scalars = scalar_metrics(jax.device_get(metrics), self.exit_layers)
    elapsed = max(time.perf_counter() - self.window_start, 1e-9)
    scalars['steps_per_second'] = self.window_steps / elapsed
    if self.learning_rate is not None:
      scalars['learning_rate'] = float(self.learning_rate(step))
    self.window_start, self.window_steps = time.perf_counter(), 0
    self.bar.set_postfix(
      loss=f'{scalars["loss"]:.3f}',
      steps_s=f'{scalars["steps_per_second"]:.2f}',
    )
    self.line(f'step {step}: {summary_line(scalars, self.exit_layers)}')
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)

  def validation(self, step: int, metrics: Mapping[str, Any]) -> None:
    scalars = scalar_metrics(metrics, self.exit_layers)
    self.line(
      f'step {step} validation: {summary_line(scalars, self.exit_layers)}'
    )
    if self.writer is not None:
      self.writer.write_scalars(
        step, {f'validation/{k}': v for k, v in scalars.items()}
      )

  def line(self, text: str) -> None:
    if jax.process_index() == 0:
      self.bar.write(text, file=sys.stderr)


def summary_line(scalars: Mapping[str, float], exit_layers) -> str:
  """'loss 2.31, lr 1.0e-03, accuracy by exit 0.41 0.52 ...' (what the
  scalars hold)."""
  parts = [f'loss {scalars["loss"]:.3f}']
  if 'learning_rate' in scalars:
    parts.append(f'lr {scalars["learning_rate"]:.2e}')
  per_exit = [scalars.get(f'accuracy_per_exit/layer_{l}') for l in exit_layers]
  if per_exit and all(v is not None for v in per_exit):
    parts.append('accuracy by exit ' + ' '.join(f'{v:.3f}' for v in per_exit))
  return ', '.join(parts)


class NonFiniteStepError(errors.UserError, RuntimeError):
  """Training produced a NaN or infinite loss or gradient."""


class _FiniteGuard:
  """Reads the steps' `finite` flags in batches (one device sync per log
  or save, not per step) and stops the run past `max_bad_steps` bad ones.
  A bad step's update was never applied (see `make_train_step`)."""

  def __init__(self, max_bad_steps: int, last_good: Callable[[], str]):
    self.max_bad_steps, self.last_good = max_bad_steps, last_good
    self.pending: list[tuple[int, jax.Array]] = []
    self.bad_steps = 0

  def add(self, step: int, finite: jax.Array) -> None:
    self.pending.append((step, finite))

  def check(self) -> None:
    flags = jax.device_get([flag for _, flag in self.pending])
    steps = [step for step, _ in self.pending]
    self.pending = []
    for step, finite in zip(steps, flags):
      if finite:
        continue
      self.bad_steps += 1
      if self.bad_steps > self.max_bad_steps:
        raise NonFiniteStepError(
          f'step {step}: the loss or the gradients are NaN or infinite; '
          f'the update was not applied and the run stops (last good '
          f'checkpoint: {self.last_good()}); lower the learning rate, or '
          'skip up to N such steps with `--gin.calm_jax.train.max_bad_steps=N`'
        )
      console.warn(
        f'step {step} is not finite; its update was skipped '
        f'({self.bad_steps} of at most {self.max_bad_steps})'
      )


def train_loop(
  *,
  objective: Objective,
  optimizer: optax.GradientTransformation,
  model_dir: str,
  batches_from: Callable[[int], Iterator[Batch]],
  num_steps: int,
  checkpoint_period: int = 500,
  keep_checkpoints: int = 3,
  log_every: int = 50,
  seed: int = 0,
  writer: Optional[ScalarWriter] = None,
  progress: bool = True,
  checkpoint_subdir: str = checkpoints.CHECKPOINT_SUBDIR,
  mesh: Optional[Mesh] = None,
  rules: partitioning.Rules = partitioning.RULES,
  max_bad_steps: int = 0,
  restore_fallback: bool = True,
  validation_batches: Optional[Callable[[], Iterable[Batch]]] = None,
  eval_every: int = 0,
  shape_batches: Optional[Callable[[], Iterable[Batch]]] = None,
) -> TrainState:
  """Trains to `num_steps`, resuming from the newest intact checkpoint.

  Every `eval_every` steps (0: never) and at the end, the objective's
  metrics on `validation_batches()` (no dropout) go to the console and to
  TensorBoard under validation/. `shape_batches()` gives one batch of each
  shape the run will meet (a mixture's tasks have their own lengths): all
  are compiled before the first step, each with a notice.

  Runs on `mesh` (default: every device on 'data'), its parameters and
  activations split by `rules` (`partitioning.rules_for`). Saves every
  `checkpoint_period` steps, at the end, and on Ctrl-C (orbax commits
  atomically; a manifest of array hashes is verified on restore). Steps
  that are not finite are not applied; past `max_bad_steps` of them the run
  stops (NonFiniteStepError) and saves nothing more.
  """
  mesh = mesh or partitioning.make_mesh()
  place = placement(objective, optimizer, mesh, rules)
  mgr = checkpoints.manager(
    model_dir, max_to_keep=keep_checkpoints, subdir=checkpoint_subdir
  )
  rng = partitioning.replicate(jax.random.PRNGKey(seed), mesh)
  state = restore_or_init(
    objective, optimizer, mgr, rng, place, restore_fallback
  )
  start = int(state.step)
  if start >= num_steps:
    mgr.close()
    return state
  train_step = make_train_step(objective, optimizer, place)
  batches = batches_from(start)
  first = partitioning.global_batch(
    _next_batch(batches, start + 1, start), mesh
  )
  for batch in [first, *(shape_batches() if shape_batches else [])]:
    train_step.compile(
      state,
      partitioning.global_batch(batch, mesh) if batch is not first else batch,
      rng,
    )
  bar = _Progress(
    start=start,
    total=num_steps,
    writer=writer,
    exit_layers=objective.exit_layers,
    enabled=progress and jax.process_index() == 0,
    learning_rate=getattr(optimizer, 'learning_rate', None),
  )
  validate = (
    _validation(objective, place, validation_batches, mesh)
    if validation_batches is not None and eval_every > 0
    else None
  )
  guard = _FiniteGuard(max_bad_steps, lambda: _last_saved(mgr))
  stopped = False  # by the guard: nothing more is saved
  try:
    for step in range(start + 1, num_steps + 1):
      batch = (
        first
        if step == start + 1
        else partitioning.global_batch(_next_batch(batches, step, start), mesh)
      )
      state, metrics = train_step(state, batch, rng)
      guard.add(step, metrics['finite'])
      log = step % log_every == 0 or step == num_steps
      if log or step % checkpoint_period == 0:
        guard.check()
      bar.step(step, metrics, log)
      if validate and (step % eval_every == 0 or step == num_steps):
        bar.validation(step, validate(state.params))
      if step % checkpoint_period == 0:
        checkpoints.save(mgr, step, state.params, state.opt_state)
    guard.check()
  except KeyboardInterrupt:
    console.info(f'\ninterrupted: saving step {int(state.step)}')
    raise
  except NonFiniteStepError:
    stopped = True
    raise
  finally:
    bar.bar.close()
    _close(mgr, None if stopped or int(state.step) <= start else state)
  return state


def _validation(
  objective: Objective,
  place: Placement,
  validation_batches: Callable[[], Iterable[Batch]],
  mesh,
):
  """params -> the objective's mean metrics over the validation batches."""
  evaluate = make_eval_step(objective, place)
  batches = [partitioning.global_batch(b, mesh) for b in validation_batches()]
  return lambda params: mean_metrics([evaluate(params, b) for b in batches])


def _next_batch(batches: Iterator[Batch], step: int, start: int) -> Batch:
  batch = next(batches, None)
  if batch is None:
    raise errors.SettingError(
      f'no training data: the dataset ended after '
      f'{step - 1 - start} batches (at step {step})'
    )
  return batch


def _close(mgr, unsaved: Optional[TrainState]) -> None:
  """Saves `unsaved` unless its step is saved already; waits; closes."""
  if unsaved is not None and mgr.latest_step() != int(unsaved.step):
    checkpoints.save(
      mgr, int(unsaved.step), unsaved.params, unsaved.opt_state, force=True
    )
  mgr.wait_until_finished()
  mgr.close()


def _last_saved(mgr) -> str:
  mgr.wait_until_finished()
  step = mgr.latest_step()
  return 'none saved yet' if step is None else f'{mgr.directory}/{step}'
