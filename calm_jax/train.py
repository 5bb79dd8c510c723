"""Command: `python -m calm_jax.train` (see calm_jax.jobs.train)."""
from calm_jax.jobs.train import main

if __name__ == '__main__':
  main()
