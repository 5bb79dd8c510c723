"""The Llama family against transformers on the same weights, and its
early exit against its own static decoder (tiny random models)."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from calm_jax.calibration import ltt
from calm_jax.calibration import records
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.model import hf_llama
from calm_jax.model import hf_tensors
from calm_jax.model import llama
from calm_jax.model import model_files
from calm_jax.storage import files
from calm_jax.storage import provenance

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

DIMS = dict(
  vocab_size=96,
  hidden_size=64,
  num_hidden_layers=3,
  intermediate_size=96,
  rope_theta=10000.0,
  rms_norm_eps=1e-5,
  max_position_embeddings=256,
)
CONFIGS = {
  'gqa_tied': dict(
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
  ),
  'mha_untied': dict(
    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
  ),
}


def _hf_model(kind: str, seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**DIMS, **CONFIGS[kind])
  return transformers.LlamaForCausalLM(config).eval()


def _tokenizer_dir(path):
  """A word-level tokenizer.json (the import copies it; nothing here reads
  text)."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {f'w{i}': i for i in range(DIMS['vocab_size'])}
  tokenizer = tokenizers.Tokenizer(
    tokenizers.models.WordLevel(vocab, unk_token='w0')
  )
  tokenizer.save(str(path / 'tokenizer.json'))


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def imported(request, tmp_path_factory):
  """(HF model, our config, our params) on the same weights."""
  root = tmp_path_factory.mktemp(request.param)
  hf_model = _hf_model(request.param)
  hf_model.save_pretrained(root / 'hf', safe_serialization=True)
  _tokenizer_dir(root / 'hf')
  config = hf_llama.import_hf(str(root / 'hf'), str(root / 'model'))
  params, step = model_files.load_params(str(root / 'model'), config)
  assert step == 0
  meta = json.loads((root / 'model' / 'model.json').read_text())
  assert meta['family'] == 'llama' and meta['vocabulary'] == 'tokenizer.json'
  return hf_model, config, params, root


def _prompts(seed: int, rows: int = 8, longest: int = 12) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [
    rng.integers(1, DIMS['vocab_size'], rng.integers(2, longest + 1)).tolist()
    for _ in range(rows)
  ]


def _padded(prompts) -> np.ndarray:
  out = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
  for row, prompt in enumerate(prompts):
    out[row, : len(prompt)] = prompt
  return out


def test_config_and_tied_head_are_read(imported):
  hf_model, config, params, _ = imported
  assert config.tie_embeddings == hf_model.config.tie_word_embeddings
  assert config.num_kv_heads == hf_model.config.num_key_value_heads
  assert ('logits_dense' in params) != config.tie_embeddings


def test_teacher_forced_logits_match_transformers(imported):
  hf_model, config, params, _ = imported
  prompts = _prompts(1)
  tokens = _padded(prompts)
  lengths = np.array([len(p) for p in prompts])
  ours = np.asarray(
    llama.CalmLlama(config).all_layer_logits(params, tokens, lengths)[-1]
  )
  with torch.no_grad():
    mask = torch.tensor((tokens > 0).astype(np.int64))
    theirs = hf_model(
      torch.tensor(tokens.astype(np.int64)), attention_mask=mask
    ).logits.numpy()
  real = tokens > 0
  scale = np.abs(theirs[real]).max()
  assert np.abs(ours[real] - theirs[real]).max() <= 1e-4 * scale


def test_greedy_tokens_equal_transformers_generate(imported):
  hf_model, config, params, _ = imported
  prompts = _prompts(2)
  new = 64
  model = llama.CalmLlama(config)
  ours = np.asarray(
    jax.jit(lambda p, t: model.decode_static(p, t, new, eos_id=-1).tokens)(
      params, _padded(prompts)
    )
  )
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      )
    assert ours[row].tolist() == out[0, len(prompt) :].tolist(), row


def test_export_round_trips_and_transformers_reloads_it(imported):
  hf_model, config, params, root = imported
  hf_llama.export_hf(str(root / 'model'), str(root / 'export'))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(root / 'export')
  tokens = torch.tensor(_padded(_prompts(3, rows=2)).astype(np.int64))
  with torch.no_grad():
    np.testing.assert_allclose(
      reloaded(tokens).logits.numpy(),
      hf_model(tokens).logits.numpy(),
      atol=1e-5,
    )
  assert (root / 'export' / 'tokenizer.json').is_file()


def _record_on(model_dir: str) -> None:
  """A softmax record certified on `model_dir` as it is now."""
  grid = ltt.descending_grid(1.0, 0.0, 0.5)
  result = ltt.fixed_sequence_test(
    grid, lambda t: (np.zeros(50), 1.0), delta=0.2, epsilon=0.1
  )
  fingerprint = records.fingerprint(
    model=loaded_lib.load(model_dir).fingerprint('softmax'),
    data={},
    decode={'confidence': 'softmax'},
    consistency='textual',
    delta=0.2,
    epsilon=0.1,
    grid_step=0.5,
  )
  record = records.new_record(
    result,
    task='synth_qa',
    record_fingerprint=fingerprint,
    tau=None,
    checkpoint_step=0,
    dtype='float32',
  )
  records.write(model_dir, record)


def test_a_record_matches_its_imported_dir_and_not_another_chat_template(
  imported, tmp_path
):
  model_dir = str(tmp_path / 'model')
  shutil.copytree(imported[-1] / 'model', model_dir)
  _record_on(model_dir)

  def choose():
    return records.choose_threshold(
      model_dir, loaded_lib.load(model_dir).fingerprint, None, 'softmax'
    )

  assert choose().record is not None  # the record read back from JSON
  template = '{{ messages[0].content }}'
  config = tmp_path / 'model' / 'vocab' / 'tokenizer_config.json'
  config.write_text(json.dumps({'chat_template': template}))
  with pytest.raises(
    provenance.ProvenanceError,
    match=r'another model \(vocabulary\.chat_template: null -> "',
  ):
    choose()


def test_a_corrupt_tokenizer_config_is_named(imported, tmp_path):
  model_dir = tmp_path / 'model'
  shutil.copytree(imported[-1] / 'model', model_dir)
  config = model_dir / 'vocab' / 'tokenizer_config.json'
  config.write_bytes(b'{"chat_template": "\xff')
  with pytest.raises(
    files.FileError, match=rf'tokenizer config {config} cannot be read'
  ):
    loaded_lib.load(str(model_dir))


def test_a_misshapen_or_unknown_tensor_is_named(imported):
  hf_model, config, params, root = imported
  _, tensors = hf_tensors.read_hf_checkpoint(str(root / 'hf'))
  bad = dict(tensors)
  bad['model.layers.1.mlp.up_proj.weight'] = np.zeros((5, 64), np.float32)
  with pytest.raises(
    hf_tensors.ConversionError,
    match='tensor model.layers.1.mlp.up_proj.weight has '
    r'shape \(5, 64\)',
  ):
    hf_llama.hf_to_params(bad, config)


REFUSED = {
  'yarn scaling': (
    {'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}},
    "rope_scaling type 'yarn' is not supported",
  ),
  'older dynamic key': (
    {'rope_scaling': {'type': 'dynamic', 'factor': 2.0}, 'rope_parameters': {}},
    "rope_scaling type 'dynamic' is not supported",
  ),
  'sliding window': (
    {'model_type': 'mistral', 'sliding_window': 4096},
    'config.json sliding_window=4096 is not supported',
  ),
  'partial rotary': (
    {'partial_rotary_factor': 0.5},
    'config.json partial_rotary_factor=0.5 is not supported',
  ),
  'attention bias': (
    {'attention_bias': True},
    'config.json attention_bias=True is not supported',
  ),
  'model type': ({'model_type': 'gemma'}, "model_type 'gemma' is not"),
}


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_a_config_field_that_changes_the_computation_is_refused(case):
  fields, message = REFUSED[case]
  hf = {**transformers.LlamaConfig(**DIMS).to_dict(), **fields}
  with pytest.raises(hf_tensors.ConversionError, match=message):
    hf_llama.config_from_hf(hf)


SCALINGS = {
  # Short pretraining context, so that every band of llama3's is used by
  # head_dim 16's wavelengths (6 to 20,000 positions).
  'llama3': {
    'rope_type': 'llama3',
    'factor': 8.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 256,
  },
  'linear': {'type': 'linear', 'factor': 4.0},  # the older key
}


@pytest.mark.parametrize('kind', sorted(SCALINGS))
def test_rope_scaling_matches_transformers(kind, tmp_path):
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      **DIMS, **CONFIGS['gqa_tied'], rope_scaling=dict(SCALINGS[kind])
    )
  ).eval()
  hf_model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  saved = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  saved['rope_scaling'] = SCALINGS[kind]  # as the checkpoint's own file
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(saved))
  _tokenizer_dir(tmp_path / 'hf')
  config = hf_llama.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'model'))
  assert config.rope_scaling == kind
  params, _ = model_files.load_params(str(tmp_path / 'model'), config)
  tokens = _padded(_prompts(5, longest=48))
  real = tokens > 0
  with torch.no_grad():
    theirs = hf_model(
      torch.tensor(tokens.astype(np.int64)),
      attention_mask=torch.tensor(real.astype(np.int64)),
    ).logits.numpy()[real]
  lengths = real.sum(1)

  def ours(cfg):
    logits = llama.CalmLlama(cfg).all_layer_logits(params, tokens, lengths)
    return np.asarray(logits[-1])[real]

  scale = np.abs(theirs).max()
  assert np.abs(ours(config) - theirs).max() <= 1e-4 * scale
  # The scaling is what makes them equal: plain rotary positions miss.
  plain = dataclasses.replace(config, rope_scaling='none')
  assert np.abs(ours(plain) - theirs).max() > 1e-3 * scale
  # Exported and read back, the scaling survives.
  hf_llama.export_hf(str(tmp_path / 'model'), str(tmp_path / 'out'))
  exported = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert hf_llama.config_from_hf(exported) == config


# --- early exit on the decoder-only family -------------------------------------


@pytest.fixture(scope='module')
def tiny():
  config = llama.LlamaConfig(
    vocab_size=96,
    emb_dim=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    rope_theta=10000.0,
  )
  model = llama.CalmLlama(config)
  return model, model.init_params(jax.random.PRNGKey(3))['params']


def _early(model, cfg, max_length=10):
  return jax.jit(
    lambda p, t, threshold: model.decode_early_exit(
      p, t, max_length, exit_config=cfg, threshold=threshold, eos_id=-1
    )
  )


@pytest.mark.parametrize(
  'measure,dtype',
  [
    ('softmax', 'bfloat16'),
    ('state', 'float32'),
    # Each measure and each dtype is in `make test` once; the other pairs
    # are the same rule at the other combinations.
    pytest.param('softmax', 'float32', marks=pytest.mark.slow),
    pytest.param('state', 'bfloat16', marks=pytest.mark.slow),
  ],
)
def test_exits_disabled_equal_the_static_decoder(tiny, dtype, measure):
  model, params = tiny
  model = dataclasses.replace(
    model, config=dataclasses.replace(model.config, dtype=dtype)
  )
  tokens = _padded(_prompts(4))
  static = jax.jit(lambda p, t: model.decode_static(p, t, 10, eos_id=-1))(
    params, tokens
  )
  early = _early(model, model.exit_config(measure))(params, tokens, 1.5)
  np.testing.assert_array_equal(early.tokens, static.tokens)
  assert (np.asarray(early.exit_layers) == 4).all()


@pytest.mark.slow
def test_per_row_exits_at_batch_8_equal_batch_1(tiny):
  model, params = tiny
  prompts = _prompts(5)
  cfg = model.exit_config('softmax')
  decode = _early(model, cfg)
  zero = decode(params, _padded(prompts), 0.0)
  # A threshold that splits the tokens between layers.
  confidences = np.asarray(zero.confidences)
  threshold = float(np.quantile(confidences[np.isfinite(confidences)], 0.6))
  batched = decode(params, _padded(prompts), threshold)
  exits = np.asarray(batched.exit_layers)
  assert len(set(exits.ravel().tolist())) > 1, 'no spread of exits'
  for row, prompt in enumerate(prompts):
    alone = decode(params, _padded([prompt]), threshold)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[row])
    np.testing.assert_array_equal(alone.exit_layers[0], exits[row])


def test_prefill_and_steps_equal_the_teacher_forced_pass(tiny):
  """Generating token by token at full depth reproduces the hidden states
  of one teacher-forced pass over prompt + generated tokens."""
  model, params = tiny
  prompts = _prompts(6, rows=3)
  out = model.decode_static(params, _padded(prompts), 6, eos_id=-1, oracle=True)
  for row, prompt in enumerate(prompts):
    full = np.array([prompt + np.asarray(out.tokens[row]).tolist()])
    logits = model.all_layer_logits(params, full, np.array([full.shape[1]]))
    top = np.asarray(logits[-1, 0]).argmax(-1)
    # The token after each position of the generated part is its argmax.
    generated = np.asarray(out.tokens[row])
    np.testing.assert_array_equal(top[len(prompt) - 1 : -1], generated)
    per_layer = np.asarray(logits[:, 0]).argmax(-1)  # [L, l]
    agrees = per_layer[:, len(prompt) - 1 : -1] == generated[None]
    np.testing.assert_array_equal(
      np.argmax(agrees, 0) + 1, np.asarray(out.exit_layers[row])
    )


def test_a_context_memo_reuses_the_prefill_and_changes_nothing(tiny):
  model, params = tiny
  loaded = loaded_lib.in_memory(model, params)
  tokens = _padded(_prompts(4))
  memo = decoder_lib.ContextMemo()
  plain, shared = (
    decoder_lib.Decoder(loaded, eos_id=-1),
    decoder_lib.Decoder(loaded, eos_id=-1, contexts=memo),
  )
  for mode in (
    modes.FullDepth(),
    modes.EarlyExit(model.exit_config('softmax'), 0.3),
  ):
    a = plain.decode(mode, tokens, max_length=10)
    b = shared.decode(mode, tokens, max_length=10)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
  assert (memo.misses, memo.hits) == (1, 1)
