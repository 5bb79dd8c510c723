"""Command: `python -m calm_jax.decode` (see calm_jax.jobs.decode)."""
from calm_jax.jobs.decode import main

if __name__ == '__main__':
  main()
