"""Learn then Test: per-example consistency losses, p-values and the
fixed-sequence search for the fastest certified threshold; calibration
records and which one applies to a model. No gin, no TensorFlow."""
