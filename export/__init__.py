"""Export trained models to ONNX and TensorRT, with parity checks against the source."""
