"""torch → ONNX: writing, checking (parity) and cutting down bundles."""
