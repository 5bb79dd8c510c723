r"""Batch decoding with early exit, of a SeqIO task or of your own file.

  python -m calm_jax.decode --gin_file=gin/runs/decode.gin \
    --gin.MODEL_DIR="'runs/demo/model'" \
    --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" \
    [--gin.CONFIDENCE="'softmax'"] [--gin.THRESHOLD=0.9]

  python -m calm_jax.decode --gin_file=gin/runs/decode.gin \
    --gin.MODEL_DIR="'runs/demo/model'" --gin.INPUT_FILE="'in.jsonl'"

Without THRESHOLD, the calibration record certified for the task and this
very model sets it (else full depth). Input files: JSONL (fields
calm_jax.DecodeInputs.input_field / target_field), TSV (input<TAB>target) or one
input per line. Writes OUTPUT_DIR/<task or file>.jsonl in input order
(inputs, targets, prediction, tokens, exit_layers, confidences),
summary.json and run.json.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('decode', __doc__, argv)


if __name__ == '__main__':
  main()
