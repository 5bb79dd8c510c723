r"""Wall-clock benchmark: early-exit decoding vs the static full-depth decoder.

  python -m calm_jax.bench [--gin.BATCH_SIZES=[1,16]] \
    [--gin.DTYPES="['float32','bfloat16']"] [--gin.MODELS="['paper_small']"]
  python -m calm_jax.bench --gin.TABLE="'runs/bench/bench.json'"

Reads gin/runs/bench.gin unless --gin_file is given. Per model, dtype,
batch size, measure and exit pattern: the static and the early-exit decode
loop of the same inputs, compiled, then timed alternately; medians, the
layer- and FLOPs-ideal speed-ups and the efficiency. Writes OUTPUT (JSON).
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('bench', __doc__, argv)


if __name__ == '__main__':
  main()
