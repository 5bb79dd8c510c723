"""The fused exit loss's choice of mode and its TPU program (its values and
gradients: test_models.py against every exit's logits, test_scale_out.py
on a mesh)."""

import jax
import pytest

from calm_jax.model import fused_loss
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.parallel import partitioning
from calm_jax.planning import programs
from calm_jax.planning import tpu

HAS_LIBTPU = tpu._libtpu_folder() is not None  # pylint: disable=protected-access


def test_auto_fuses_only_when_compiling_for_tpu():
  assert not fused_loss.use_fused('auto')  # this CPU
  assert fused_loss.use_fused('auto', 'tpu')
  assert fused_loss.use_fused('auto', 'tpu', embed=2048)
  assert not fused_loss.use_fused('auto', 'tpu', embed=4096)  # XXL, 8B
  assert fused_loss.use_fused('fused', 'cpu')
  assert not fused_loss.use_fused('streamed', 'tpu')
  with pytest.raises(ValueError, match="unknown exit_loss 'pallas'"):
    fused_loss.use_fused('pallas')


def test_blocks_fit_the_on_chip_budget_and_the_tile():
  for n, v, e in ((16384, 16064, 512), (4096, 64128, 4096), (24, 40, 16)):
    for block in fused_loss.choose_blocks(n, v, e, 2):
      assert block.tokens % 128 == 0 and block.vocab % 128 == 0
      assert block.tokens <= -(-n // 128) * 128
      assert block.vocab <= -(-v // 128) * 128
  # The d-states kernel's [tokens, embed] float32 output block makes large
  # embeddings take smaller token blocks; the forward's outputs are per
  # token, so it takes the larger blocks.
  forward, dstates, _ = fused_loss.choose_blocks(16384, 16064, 512, 2)
  large = fused_loss.choose_blocks(16384, 64128, 4096, 2)[1]
  assert large.tokens < dstates.tokens < forward.tokens


@pytest.mark.tpu
@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed')
def test_on_a_tpu_mesh_auto_compiles_the_kernels():
  mesh = partitioning.make_mesh((2, 2), tpu.devices('v5e:2x2'))
  config = network.T5Config(
    vocab_size=1000,
    emb_dim=128,
    num_heads=2,
    head_dim=64,
    mlp_dim=256,
    num_encoder_layers=1,
    num_decoder_layers=2,
    dtype='bfloat16',
  )
  params = programs.abstract_params(models.CalmModel(config), mesh)
  batch = programs.train_batch(mesh, 8, 16, 8)
  texts = {}
  for mode in ('auto', 'streamed'):
    model = models.CalmModel(config, exit_loss=mode)
    grad = jax.jit(jax.grad(lambda p, b, m=model: m.loss(p, b)[0]))
    with partitioning.activation_rules(mesh, partitioning.RULES):
      texts[mode] = grad.lower(params, batch).compile().as_text()
  assert 'tpu_custom_call' in texts['auto']
  assert 'tpu_custom_call' not in texts['streamed']
