"""The network: T5 1.1 layers, the encoder-decoder wiring and its config, and
the model glue (CALM's weighted per-layer loss, decode entry points). No gin,
no TensorFlow."""
