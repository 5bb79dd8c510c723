"""calm_jax: Confident Adaptive Language Modeling (CALM) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
  'jax==0.10.2',
  'jaxlib==0.10.2',
  'flax==0.12.8',
  'optax==0.2.8',
  'orbax-checkpoint==0.12.8',
  'chex==0.1.92',
  'gin-config==0.5.0',
  'seqio==0.0.20',
  'tensorflow==2.21.0',
  'tensorflow-text==2.21.1',
  'tensorflow-datasets==4.9.10',
  'importlib_resources==7.1.0',
  'sentencepiece==0.2.3',
  'rouge-score==0.1.2',
  'sacrebleu==2.6.0',
  'clu==0.0.12',
  'numpy==2.4.6',
  'protobuf==7.36.2',
  'tqdm==4.70.1',
  'tensorboard==2.21.0',
  'matplotlib==3.11.2',
  'safetensors==0.8.0',
]

# Hugging Face interop: the reference implementation for the equality tests,
# and torch for pytorch_model.bin files. torch is pinned to the CPU build
# (a range could pull a multi-GB CUDA one).
HF_REQUIRES = [
  'transformers==5.24.0',
  'torch==2.13.0',
  # GGUF files: gguf reads and dequantizes them (our importer, and
  # transformers' reader of their tokenizers); accelerate lets transformers
  # load a GGUF model as the reference of the parity tests.
  'gguf==0.19.0',
  'accelerate==1.16.0',
]

setuptools.setup(
  name='calm_jax',
  version='0.1.0',
  description='Confident Adaptive Language Modeling (early-exit T5) in JAX',
  # The top-level tasks/ and gin/ folders install inside the package, as
  # calm_jax.tasks and calm_jax/gin (no generic top-level name).
  packages=[
    *setuptools.find_packages(include=['calm_jax', 'calm_jax.*']),
    'calm_jax.tasks',
    'calm_jax.gin',
  ],
  package_dir={'calm_jax.tasks': 'tasks', 'calm_jax.gin': 'gin'},
  package_data={
    'calm_jax.tasks': ['vocab/*.model', 'vocab/*.vocab'],
    'calm_jax.gin': ['*/*.gin'],
  },
  python_requires='>=3.10',
  install_requires=INSTALL_REQUIRES,
  extras_require={
    'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'ruff==0.17.6'],
    'hf': HF_REQUIRES,
  },
)
