"""Hugging Face T5 1.1 import/export against transformers' own T5, built
locally with random weights (no download)."""

import json
import os
import re
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top,g-multiple-import
from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top,g-multiple-import

from calm_jax.jobs import convert as convert_job
from calm_jax.model import hf_t5
from calm_jax.model import hf_tensors
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.model import network

import entry_points  # tests/entry_points.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(REPO, 'tasks', 'vocab', 'calm_synth.model')
# More decoder than encoder layers, as CALM models often have; a vocabulary
# that holds the embedded tasks' 1,024 pieces (for the fine-tuning test).
DIMS = dict(
  vocab_size=1056,
  d_model=64,
  d_kv=16,
  d_ff=96,
  num_layers=2,
  num_decoder_layers=3,
  num_heads=4,
  feed_forward_proj='gated-gelu',
  dropout_rate=0.0,
)


def _save_hf(path: str, *, tied: bool, seed: int = 0):
  """A random HF T5 1.1 saved as safetensors, with a vocabulary beside it."""
  torch.manual_seed(seed)
  config = transformers.T5Config(tie_word_embeddings=tied, **DIMS)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not tied:  # transformers 5 ties the head whatever the config says
    model.lm_head.weight = torch.nn.Parameter(
      torch.randn(DIMS['vocab_size'], DIMS['d_model'])
    )
  model.save_pretrained(path, safe_serialization=True)
  shutil.copyfile(VOCAB, os.path.join(path, hf_t5.HF_VOCAB))
  return model


@pytest.fixture(scope='module')
def untied(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  hf_dir, model_dir = str(root / 'hf'), str(root / 'model')
  hf_model = _save_hf(hf_dir, tied=False)
  config = hf_t5.import_hf(hf_dir, model_dir)
  params, _ = model_files.load_params(model_dir, config)
  return hf_dir, model_dir, hf_model, models.CalmModel(config), params


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, DIMS['vocab_size'], (3, 11))
  encoder[1, 7:] = 0  # a padded row
  decoder = np.concatenate(
    [np.zeros((3, 1), np.int64), rng.integers(2, DIMS['vocab_size'], (3, 6))], 1
  )
  return encoder, decoder


def _hf_forward(hf_model, encoder, decoder):
  with torch.no_grad():
    out = hf_model(
      input_ids=torch.tensor(encoder),
      attention_mask=torch.tensor(encoder > 0),
      decoder_input_ids=torch.tensor(decoder),
    )
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def _check_equal_to_hf(hf_model, model, params):
  encoder, decoder = _inputs()
  hf_encoded, hf_logits = _hf_forward(hf_model, encoder, decoder)
  encoded = model.module.apply(
    {'params': params},
    jnp.asarray(encoder),
    method=network.EncoderDecoder.encode,
  )
  mask = encoder > 0  # padded positions are free to differ
  np.testing.assert_allclose(
    np.asarray(encoded)[mask], hf_encoded[mask], atol=1e-4, rtol=0
  )
  logits = model.all_layer_logits(
    params, jnp.asarray(encoder), jnp.asarray(decoder)
  )
  # The full-depth exit (the top layer) is the reference model's output.
  np.testing.assert_allclose(
    np.asarray(logits[-1]), hf_logits, atol=1e-4, rtol=0
  )


def test_import_computes_what_transformers_computes(untied):
  _, _, hf_model, model, params = untied
  assert model.config.num_decoder_layers == 3
  assert model.config.num_encoder_layers == 2
  _check_equal_to_hf(hf_model, model, params)


def test_greedy_decode_equals_hf_generate(untied):
  _, _, hf_model, model, params = untied
  for seed in range(3):
    encoder, _ = _inputs(seed)
    with torch.no_grad():
      # use_cache=False: generate sizes its cache from the encoder depth.
      hf_tokens = hf_model.generate(
        input_ids=torch.tensor(encoder),
        attention_mask=torch.tensor(encoder > 0),
        max_new_tokens=8,
        do_sample=False,
        num_beams=1,
        use_cache=False,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
      ).numpy()
    ours = np.asarray(model.predict_full_depth(params, jnp.asarray(encoder), 8))
    hf_tokens = hf_tokens[:, 1:]  # drop the start token
    np.testing.assert_array_equal(ours[:, : hf_tokens.shape[1]], hf_tokens)


def test_tied_checkpoint_folds_the_output_scale(tmp_path):
  hf_model = _save_hf(str(tmp_path / 'hf'), tied=True, seed=1)
  with open(tmp_path / 'hf' / 'config.json') as f:
    assert json.load(f)['scale_decoder_outputs'] is True
  config = hf_t5.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'model'))
  params, _ = model_files.load_params(str(tmp_path / 'model'), config)
  _check_equal_to_hf(hf_model, models.CalmModel(config), params)


def test_export_round_trips_every_tensor(untied, tmp_path):
  hf_dir, model_dir, hf_model, _, _ = untied
  out = str(tmp_path / 'exported')
  convert_job.convert(model_dir=model_dir, to_hf=out)
  original = load_file(os.path.join(hf_dir, hf_tensors.SAFETENSORS))
  exported = load_file(os.path.join(out, hf_tensors.SAFETENSORS))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  # transformers reads the export back as the same untied model.
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  encoder, decoder = _inputs(1)
  np.testing.assert_array_equal(
    _hf_forward(reloaded, encoder, decoder)[1],
    _hf_forward(hf_model, encoder, decoder)[1],
  )


def _tensors(hf_dir):
  return load_file(os.path.join(hf_dir, hf_tensors.SAFETENSORS))


def _config(hf_dir):
  with open(os.path.join(hf_dir, 'config.json')) as f:
    return hf_t5.config_from_hf(json.load(f))[0]


def test_missing_extra_and_misshapen_tensors_are_named(untied):
  hf_dir = untied[0]
  config = _config(hf_dir)
  name = 'decoder.block.2.layer.1.EncDecAttention.k.weight'
  tensors = _tensors(hf_dir)
  del tensors[name]
  with pytest.raises(
    hf_tensors.ConversionError, match=f'missing tensor {name}'
  ):
    hf_t5.hf_to_params(tensors, config)
  tensors = _tensors(hf_dir)
  tensors['decoder.block.3.layer.0.SelfAttention.q.weight'] = tensors[
    'decoder.block.0.layer.0.SelfAttention.q.weight'
  ]
  with pytest.raises(
    hf_tensors.ConversionError,
    match='unexpected tensor decoder.block.3.layer.0',
  ):
    hf_t5.hf_to_params(tensors, config)
  tensors = _tensors(hf_dir)
  name = 'encoder.block.1.layer.1.DenseReluDense.wi_1.weight'
  tensors[name] = tensors[name][:80]
  with pytest.raises(
    hf_tensors.ConversionError, match=rf'tensor {name} has shape \(80, 64\)'
  ):
    hf_t5.hf_to_params(tensors, config)


def test_cli_error_is_one_line_and_writes_nothing(untied, tmp_path):
  hf_dir = untied[0]
  broken = tmp_path / 'broken'
  shutil.copytree(hf_dir, broken)
  tensors = _tensors(hf_dir)
  del tensors['encoder.final_layer_norm.weight']
  save_file(tensors, str(broken / hf_tensors.SAFETENSORS))
  target = tmp_path / 'model'
  result = entry_points.run_module(
    'calm_jax.convert',
    f"--gin.FROM_HF='{broken}'",
    f"--gin.MODEL_DIR='{target}'",
  )
  assert result.returncode == 2
  assert result.stderr.strip() == (
    'error: missing tensor encoder.final_layer_norm.weight'
  )
  assert not target.exists()


@pytest.mark.slow
def test_finetune_from_hf_gin_trains_the_imported_model(untied, tmp_path):
  import gin  # pylint: disable=g-import-not-at-top

  from calm_jax import cli  # pylint: disable=g-import-not-at-top
  from calm_jax.jobs import train  # pylint: disable=g-import-not-at-top

  _, imported, _, model, params = untied
  tuned_dir = str(tmp_path / 'tuned')
  gin.clear_config()
  try:
    cli.parse(
      [
        '--gin_file=gin/runs/finetune_from_hf.gin',
        f"--gin.INITIAL_CHECKPOINT_PATH='{imported}'",
        f"--gin.MODEL_DIR='{tuned_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
        '--gin.TRAIN_STEPS=2',
        '--gin.BATCH_SIZE=4',
        '--gin.calm_jax.LogSettings.progress=False',
      ]
    )
    state = train.train()
  finally:
    gin.clear_config()
  assert int(state.step) == 2
  config, _ = model_files.read_model_config(tuned_dir)
  assert config == model.config
  tuned, _ = model_files.load_params(tuned_dir, config)
  # Two Adafactor steps at 1e-3 from the imported weights, not a new init.
  change = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(params))
  )
  assert 0 < change < 0.05


def test_bfloat16_checkpoint_imports_as_float32(untied, tmp_path):
  hf_dir = untied[0]
  model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir)
  model.to(torch.bfloat16).save_pretrained(
    str(tmp_path / 'bf16'), safe_serialization=True
  )
  shutil.copyfile(VOCAB, tmp_path / 'bf16' / hf_t5.HF_VOCAB)
  config = hf_t5.import_hf(str(tmp_path / 'bf16'), str(tmp_path / 'm'))
  params, _ = model_files.load_params(str(tmp_path / 'm'), config)
  shared = model.shared.weight.float().detach().numpy()
  embedding = np.asarray(params['token_embedder']['embedding'])
  assert embedding.dtype == np.float32
  np.testing.assert_array_equal(embedding, shared)


def test_bf16_import_runs_bf16_activations_close_to_transformers(
  untied, tmp_path
):
  hf_dir, _, hf_model, _, _ = untied
  config = hf_t5.import_hf(hf_dir, str(tmp_path / 'm'), dtype='bfloat16')
  assert config.dtype == 'bfloat16'
  stored, _ = model_files.read_model_config(str(tmp_path / 'm'))
  assert stored.dtype == 'bfloat16'
  params, _ = model_files.load_params(str(tmp_path / 'm'), config)
  encoder, decoder = _inputs()
  _, hf_logits = _hf_forward(hf_model, encoder, decoder)
  logits = models.CalmModel(config).all_layer_logits(
    params, jnp.asarray(encoder), jnp.asarray(decoder)
  )[-1]
  assert logits.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: within a few percent of the scale,
  # and the greedy choice agrees on nearly every position.
  scale = np.abs(hf_logits).max()
  assert np.abs(np.asarray(logits) - hf_logits).max() < 0.05 * scale
  agree = np.mean(np.asarray(logits).argmax(-1) == hf_logits.argmax(-1))
  assert agree >= 0.9


def test_relu_t5_is_refused():
  with pytest.raises(hf_tensors.ConversionError, match='gated-gelu'):
    hf_t5.config_from_hf({**DIMS, 'feed_forward_proj': 'relu'})


def _convert(source, target):
  return entry_points.run_module(
    'calm_jax.convert',
    f"--gin.FROM_HF='{source}'",
    f"--gin.MODEL_DIR='{target}'",
  )


def _broken_copy(hf_dir, tmp_path, name='broken'):
  broken = tmp_path / name
  shutil.copytree(hf_dir, broken)
  return broken


@pytest.mark.parametrize(
  'damage, message',
  [
    (
      lambda d: (d / 'config.json').write_text('{"d_model": 6'),
      'HF config {dir}/config.json is not valid JSON',
    ),
    (
      lambda d: (d / 'config.json').write_text('{"d_model": 64}'),
      'config.json lacks integer vocab_size, num_heads, d_kv, d_ff, '
      'num_layers: not a T5 config',
    ),
    (
      lambda d: (d / hf_tensors.SAFETENSORS).write_bytes(
        (d / hf_tensors.SAFETENSORS).read_bytes()[:5000]
      ),
      'cannot read the weights file {dir}/model.safetensors',
    ),
    (lambda d: shutil.rmtree(d), 'no Hugging Face checkpoint at {dir}'),
  ],
)
def test_broken_checkpoints_are_one_line_and_write_nothing(
  untied, tmp_path, damage, message
):
  broken = _broken_copy(untied[0], tmp_path)
  damage(broken)
  target = tmp_path / 'model'
  result = _convert(broken, target)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ' + message.format(dir=broken)), last
  assert not target.exists()
  # With the checkpoint intact again, the same command works.
  assert _convert(untied[0], target).returncode == 0


def test_a_transposed_tensor_names_the_shape_it_needs(untied):
  hf_dir = untied[0]
  tensors = _tensors(hf_dir)
  name = 'decoder.block.0.layer.2.DenseReluDense.wo.weight'  # [64, 96]
  tensors[name] = tensors[name].T
  with pytest.raises(
    hf_tensors.ConversionError,
    match=rf'tensor {name} has shape \(96, 64\); a T5 1.1 '
    r'of these dims holds \(64, 96\) there',
  ):
    hf_t5.hf_to_params(tensors, _config(hf_dir))


def test_the_vocabulary_hint_runs(untied, tmp_path):
  hf_dir = tmp_path / 'hf'
  shutil.copytree(untied[0], hf_dir)
  (hf_dir / hf_t5.HF_VOCAB).unlink()
  target = tmp_path / 'model'
  refused = _convert(str(hf_dir), str(target))
  assert refused.returncode == 2 and not target.exists()
  [flag] = re.findall(r'`([^`]+)`', refused.stderr)
  fixed = entry_points.run_module(
    'calm_jax.convert',
    f"--gin.FROM_HF='{hf_dir}'",
    f"--gin.MODEL_DIR='{target}'",
    *shlex.split(flag.replace('PATH', VOCAB)),  # as a shell passes it
  )
  assert fixed.returncode == 0, fixed.stderr[-2000:]
  assert (target / 'model.json').is_file()
