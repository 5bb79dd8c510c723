"""calm_jax: Confident Adaptive Language Modeling (early-exit T5) in JAX.

`calm_jax.load(model_dir)` returns a model for notebooks and services (see
`calm_jax.api`). The package is laid out by layer (docs/architecture.md);
importing it loads nothing, so that the commands answer --help at once.
"""


def load(model_dir: str, **kwargs):
  """Loads a trained model dir; see `calm_jax.api.CalmLM`."""
  # Imported here, not at the top: the commands import this package, and
  # their --help must not wait for JAX.
  from calm_jax import api  # pylint: disable=g-import-not-at-top

  return api.CalmLM(model_dir, **kwargs)
