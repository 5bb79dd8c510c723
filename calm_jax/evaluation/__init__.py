"""The evaluation engine every job uses: decode examples at full depth or
with early exit, cache by provenance, score with the task metric, time
alternately; plus the metrics. No gin, no TensorFlow."""
