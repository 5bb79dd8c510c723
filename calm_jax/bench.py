"""Command: `python -m calm_jax.bench` (see calm_jax.jobs.bench)."""
from calm_jax.jobs.bench import main

if __name__ == '__main__':
  main()
