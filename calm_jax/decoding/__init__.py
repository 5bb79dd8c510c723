"""Model-free decoding: the static and early-exit loops over a step-function
Protocol, the confidence measures and the (decaying) thresholds. No gin, no
TensorFlow."""
