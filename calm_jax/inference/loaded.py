"""A model dir loaded for decoding: config, parameters, classifier,
vocabulary, and the fingerprint of what its decodes depend on."""

import dataclasses
import functools
from typing import Any
from typing import Optional

import jax
from jax.sharding import Mesh

from calm_jax import arguments
from calm_jax.data import examples
from calm_jax.data import vocabularies
from calm_jax.decoding import loops
from calm_jax.model import adapters
from calm_jax.model import layout
from calm_jax.model import llama
from calm_jax.model import model_files
from calm_jax.parallel import partitioning
from calm_jax.storage import checkpoints
from calm_jax.storage import files
from calm_jax.storage import provenance


@dataclasses.dataclass(eq=False)
class LoadedModel:
  """One model dir's step in memory (on a mesh of several devices, in its
  shards). Build it with `load`."""

  model_dir: str
  config: model_files.Config
  model: Any  # the family's CALM model (`model_files.model_for`)
  params: Any
  step: int
  vocab_path: Optional[str]  # None: a model built in memory
  vocab: Optional[vocabularies.Vocabulary]
  feature_lengths: dict[str, int]  # the lengths the model was trained with
  classifier: Optional[Any]  # the exit classifier, if trained
  mesh: Optional[Mesh] = None  # None or one device: unsharded

  @property
  def eos_id(self) -> int:
    """The id that ends an output (T5's 1 for a model without a vocabulary)."""
    return examples.EOS_ID if self.vocab is None else self.vocab.eos_id

  @property
  def sharded(self) -> bool:
    return self.mesh is not None and self.mesh.size > 1

  def with_dtype(self, dtype: str) -> 'LoadedModel':
    """The same parameters (float32) with another activation dtype."""
    config = dataclasses.replace(self.config, dtype=dtype)
    return dataclasses.replace(
      self, config=config, model=dataclasses.replace(self.model, config=config)
    )

  @functools.cached_property
  def _digests(self) -> dict[str, Optional[str]]:
    network = {k: v for k, v in self.params.items() if k != llama.ADAPTERS}
    adapters = self.params.get(llama.ADAPTERS)
    return {
      # In the unrolled layout: both layouts are the same model.
      'params': provenance.digest_tree(layout.to_layout(network, False)),
      'adapters': None
      if adapters is None
      else provenance.digest_tree(adapters),
      'vocabulary': None if self.vocab is None else self.vocab.fingerprint(),
      'classifier': (
        None
        if self.classifier is None
        else provenance.digest_tree(self.classifier)
      ),
    }

  def fingerprint(self, measure: str) -> dict:
    """What of the model dir determines a decode with this measure: the
    config (dtype included, the parameter layout not), step and content hash of the parameters, the
    vocabulary (with a tokenizer's chat template), the exit adapters' hash when it has them (a full-depth
    decode, measure 'full', reads none), and the exit classifier's hash
    when the measure uses it."""
    digests = self._digests
    fingerprint = {
      'config': layout.without_layout(self.config),
      'step': self.step,
      'params': digests['params'],
      'vocabulary': digests['vocabulary'],
    }
    if digests['adapters'] is not None and measure != 'full':
      fingerprint['adapters'] = digests['adapters']
    if measure == 'classifier':
      fingerprint['classifier'] = digests['classifier']
    return fingerprint

  def classifier_for(self, measure: str) -> Optional[Any]:
    """The classifier's parameters when the measure needs them."""
    if measure != 'classifier':
      return None
    if self.classifier is None:
      raise checkpoints.CheckpointError(
        f'{self.model_dir} has no exit classifier: train one with '
        f'`{model_files.train_classifier_command(self.model_dir)}`'
      )
    return self.classifier

  def exit_config(self, measure: str, **options) -> loops.ExitConfig:
    """This model's exit layers with a measure and `ExitConfig.create`'s
    options (min_exit, tau, propagation, sampling, bucket_sizes). A
    min_exit above the top layer is refused (it would silently decode at
    full depth)."""
    arguments.check(
      min_exit=options.get('min_exit', 1),
      num_layers=self.config.num_decoder_layers,
    )
    return self.model.exit_config(measure, **options)


def load(
  model_dir: str,
  *,
  step: Optional[int] = None,
  mesh: Optional[Mesh] = None,
  dtype: Optional[str] = None,
  use_adapters: bool = True,
) -> LoadedModel:
  """Loads a model dir's step (default: the newest intact one); with a mesh
  of several devices, straight into its shards. `dtype` ('float32' or
  'bfloat16') replaces the activation dtype the model was trained with;
  parameters stay float32. A Llama-family model dir's exit adapters (if it
  has them, and `use_adapters`) join its parameters, so every exit reads
  through them and the fingerprint covers them."""
  config, vocab_path = model_files.read_model_config(model_dir)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  model = model_files.model_for(config)
  sharded = mesh is not None and mesh.size > 1
  shardings = (
    partitioning.param_shardings(model.param_axes(), mesh) if sharded else None
  )
  params, step = model_files.load_params(model_dir, config, step, shardings)
  exit_adapters = (
    adapters.load(model_dir, config)
    if use_adapters and model_files.family_of(config) == 'llama'
    else None
  )
  if exit_adapters is not None:
    params = {**params, llama.ADAPTERS: exit_adapters}
  vocab = vocabularies.load(files.local_copy(vocab_path))
  classifier = model_files.load_classifier(model_dir, config)
  if sharded and classifier is not None:
    classifier = partitioning.replicate(jax.device_get(classifier), mesh)
  return LoadedModel(
    model_dir=model_dir,
    config=config,
    model=model,
    params=params,
    step=step,
    vocab_path=vocab_path,
    vocab=vocab,
    feature_lengths=model_files.read_feature_lengths(model_dir),
    classifier=classifier,
    mesh=mesh,
  )


def in_memory(
  model: Any,
  params: Any,
  *,
  classifier: Optional[Any] = None,
  name: str = '<in memory>',
) -> LoadedModel:
  """A model that lives only in memory (random weights for benchmarks and
  tests): no vocabulary, step 0, the default feature lengths."""
  return LoadedModel(
    model_dir=name,
    config=model.config,
    model=model,
    params=params,
    step=0,
    vocab_path=None,
    vocab=None,
    feature_lengths=dict(model_files.DEFAULT_FEATURE_LENGTHS),
    classifier=classifier,
  )
