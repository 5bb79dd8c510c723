"""Command: `python -m calm_jax.convert` (see calm_jax.jobs.convert)."""
from calm_jax.jobs.convert import main

if __name__ == '__main__':
  main()
