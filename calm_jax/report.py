r"""The reproduction report: the paper's findings re-measured (`make reproduce`).

  python -m calm_jax.report [--gin.MODEL_DIR="'runs/demo/model'"] \
    [--gin.OUTPUT="'docs/REPRODUCTION.md'"] [--gin.TASKS="['synth_qa']"]

Reads gin/runs/report.gin unless --gin_file is given. Calibrates every
measure on validation data and measures on test data: the paper's Table 2,
the oracle, truncated models, the state-propagation ablation, decaying vs
constant thresholds and the split protocol of the guarantee; writes OUTPUT,
reproduction.json next to it and figures/. Decodes are cached in the model
dir, so an interrupted run resumes.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('report', __doc__, argv)


if __name__ == '__main__':
  main()
