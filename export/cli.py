"""``mvld-export``: export a trained model to ONNX or a TensorRT engine."""

from mvld.planned import run_planned_command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-export``."""
    return run_planned_command(
        "mvld-export",
        "Export the encoder, decoder and score network to ONNX with a parity check "
        "(`mvld-export onnx --model CKPT --out DIR`), or build a TensorRT engine "
        "(`mvld-export trt --onnx FILE --precision fp16`).",
        issue=7,
        argv=argv,
    )
