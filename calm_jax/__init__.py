"""calm_jax: Confident Adaptive Language Modeling (early-exit T5) in JAX.

`calm_jax.load(model_dir)` returns a model for notebooks and services (see
`calm_jax.api`). Submodules import lazily so that `import calm_jax.model.network`
stays free of TensorFlow and gin.
"""


def load(model_dir: str, **kwargs):
  """Loads a trained model dir; see `calm_jax.api.CalmLM`."""
  from calm_jax import api  # pylint: disable=g-import-not-at-top
  return api.CalmLM(model_dir, **kwargs)
