"""The decode layer, below the Python API and the evaluation engine: a
loaded model dir (`loaded.load`), the decode modes that build their own
programs (`modes`), and the `Decoder` that compiles and runs them. No gin,
no TensorFlow."""
