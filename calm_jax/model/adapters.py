"""Exit adapters: cheap learned maps that make a frozen model's intermediate
layers readable by its own head ("tuned lens" translators, Belrose et al.
2023), fitted by least squares.

For each layer l, an affine map A_l h + b_l (initialised at, and pulled
towards, the identity) is fitted so that it carries the layer's state to
the top layer's state at the same position, on hidden states of the model's
own generations: ridge regression, closed form, seconds on a CPU. An exit
then reads head(final_norm(A_l h_l + b_l)): every confidence measure and
the exit's own prediction use the adapted state, while skipped layers still
get the raw exit state's keys and values (CALM's propagation).

They live in MODEL_DIR/adapters (a verified orbax checkpoint) with
adapters.json, what they were fitted on; a model dir loads them with its
parameters (`params['adapters']`), so its fingerprint covers them.
"""

from typing import Any
from typing import Optional

import jax
import numpy as np

from calm_jax.model import llama
from calm_jax.storage import checkpoints
from calm_jax.storage import files
from calm_jax.storage import provenance

SUBDIR = 'adapters'
INFO = 'adapters.json'


def fit(hidden: np.ndarray, ridge: float = 1.0) -> dict[str, np.ndarray]:
  """Adapters of every layer from hidden states [L, n, e] (layer l's raw
  output at n positions; the last layer is the top).

  Minimises |A_l h + b_l - h_top|^2 + ridge * n / 1000 * |A_l - I|^2 per
  layer. Returns {'kernel': [L + 1, e, e], 'bias': [L + 1, e]}: index 0
  (the embedding) and L (the top) are the identity.
  """
  layers, n, e = hidden.shape
  target = hidden[-1].astype(np.float64)
  kernel = np.tile(np.eye(e, dtype=np.float32), (layers + 1, 1, 1))
  bias = np.zeros((layers + 1, e), np.float32)
  penalty = ridge * n / 1000 * np.eye(e + 1)
  penalty[-1, -1] = 0.0  # the bias is not pulled anywhere
  prior = np.concatenate([np.eye(e), np.zeros((1, e))])
  for layer in range(layers - 1):
    x = np.concatenate([hidden[layer], np.ones((n, 1))], 1).astype(np.float64)
    w = np.linalg.solve(x.T @ x + penalty, x.T @ target + penalty @ prior)
    kernel[layer + 1], bias[layer + 1] = w[:-1], w[-1]
  return {'kernel': kernel, 'bias': bias}


def save(model_dir: str, adapters: dict, info: dict) -> None:
  """Writes the adapters (replacing any) and what they were fitted on."""
  mgr = checkpoints.manager(model_dir, subdir=SUBDIR, max_to_keep=1)
  step = (mgr.latest_step() or 0) + 1
  checkpoints.save_params_only(mgr, step, adapters)
  mgr.close()
  files.atomic_write_json(
    files.join(model_dir, INFO),
    provenance.sealed(
      {**info, 'sha256': provenance.digest_tree(adapters), 'step': step}
    ),
  )


def _check_info(model_dir: str, restored: Any) -> None:
  """adapters.json, when there is one: sealed, and naming these arrays."""
  path = files.join(model_dir, INFO)
  if not files.exists(path):
    return
  info = files.read_json(path, what='adapters info')
  if not isinstance(info, dict) or not provenance.seal_intact(info):
    raise checkpoints.CheckpointError(
      f'{path} was changed after it was written: its content does not match '
      'its digest; fit the adapters again'
    )
  if info.get('sha256') not in (None, provenance.digest_tree(restored)):
    raise checkpoints.CheckpointError(
      f'{path} describes other adapters than {model_dir}/{SUBDIR} holds; '
      'fit the adapters again'
    )


def load(model_dir: str, config: llama.LlamaConfig) -> Optional[Any]:
  """The model dir's adapters, or None if it has none."""
  if not files.is_dir(files.join(model_dir, SUBDIR)):
    return None
  mgr = checkpoints.manager(model_dir, subdir=SUBDIR)
  if mgr.latest_step() is None:
    return None
  layers, e = config.num_layers, config.emb_dim
  target = {
    'kernel': jax.ShapeDtypeStruct((layers + 1, e, e), np.float32),
    'bias': jax.ShapeDtypeStruct((layers + 1, e), np.float32),
  }
  try:
    restored, _ = checkpoints.restore_verified(mgr, params=target)
  finally:
    mgr.close()
  _check_info(model_dir, restored['params'])
  return restored['params']
