r"""The exact mode measured: exactness and speed against full depth and CALM.

  python -m calm_jax.exact_mode
  python -m calm_jax.exact_mode --gin.calm_jax.exact_mode.exactness_inputs=50

Reads gin/runs/exact_mode.gin unless --gin_file is given. On the demo model
(make demo) and on the paper's small dims with random weights: the exact
mode's greedy tokens against the static decoder's at several batch sizes,
and full depth vs calibrated CALM vs the exact mode in turns at batch 1, 8
and 32. Writes docs/exact_mode.md and docs/exact_mode.json.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('exact_mode', __doc__, argv)


if __name__ == '__main__':
  main()
