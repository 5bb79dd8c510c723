"""Training: the sharded train step, its loop (checkpoints, resume, the
non-finite guard, progress) and the optimizers. No gin, no TensorFlow."""
